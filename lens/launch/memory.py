"""The memory plan: what one GPU holds for a run config, before anything is launched.

Parameter counts come from the model's `config.json` with the model built on the meta device (no weights are read
or downloaded): a local HF folder, the hub cache, or, for the recipes' models when neither has it, the public
config shipped in `model_configs/`. The plan mirrors what the trainer allocates (lens.train.parallel):

  ddp   every rank: fp32 trainable copies, fp32 gradients (DDP's buckets, for every trainable tensor, and in the
        backward the gradients autograd sums over the passes that use a copy before adding them to the buckets),
        AdamW's two fp32 moments (for the tensors that get a gradient), on GPU autocast's bf16 weight copies.
  fsdp  the fp32 weights, gradients and AdamW moments sharded over the ranks (1/world each); gathered weights in the
        compute dtype (bf16 on GPU): the root (embeddings, heads, projections) for the whole step, the last block
        of each copy until the end of the backward and the block in flight; the unsharded fp32 gradient when
        micro-batches accumulate without a sync (else one unit's, before its reduce-scatter).
  both  the frozen model in model.dtype; activations saved for the backward at train.micro_batch_size.

Activations are an estimate from the shapes of the passes that carry gradients (bench/memory.py measures the whole
plan against real peaks).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lens.config import LensConfig
from lens.errors import ConfigError, InputError

GiB = 1024 ** 3
BUNDLED = Path(__file__).parent / "model_configs"
# `workers.gpuMemory` presets: memory of common (spot) GPUs.
GPU_PRESETS = {"t4": 16, "l4": 24, "a10g": 24, "rtx4090": 24, "l40s": 48, "a100-40gb": 40, "a100-80gb": 80,
               "h100": 80, "h200": 141, "b200": 180}
USABLE = 0.92  # of a GPU's memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def gpu_memory_bytes(value: str | int | float, key: str = "workers.gpuMemory") -> int:
    """A GPU's memory (the values key `key`): a quantity ("80Gi", "24G", 40) or a preset name ("l4", "a100-40gb",
    "h100")."""
    text = str(value).strip()
    if text.lower() in GPU_PRESETS:
        return GPU_PRESETS[text.lower()] * GiB
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(Gi|G|GB)?", text)
    if not m:
        raise ConfigError(f"values.{key}", value,
                          "a size like 80Gi or one of " + ", ".join(sorted(GPU_PRESETS)))
    return int(float(m.group(1)) * (GiB if m.group(2) in (None, "Gi") else 1e9))


def model_config(name: str):
    """The model's transformers config: a local folder or .gguf file, the hub cache, a public config.json shipped
    here (the recipes' models), else config.json alone from the hub."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    bundled = BUNDLED / (name.replace("/", "--") + ".json")
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    if bundled.exists():
        data = json.loads(bundled.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    try:
        return AutoConfig.from_pretrained(name)  # config.json only, never weights
    except (OSError, ValueError):
        raise InputError(f"memory plan: no config.json for model.name={name!r} (not a local folder or .gguf, not in "
                         f"the hub cache, not among {', '.join(sorted(p.stem for p in BUNDLED.glob('*.json')))}, "
                         f"hub unreachable); download it once (huggingface-cli download {name} config.json) or "
                         f"pass a local folder") from None


@dataclass
class Shapes:
    """Parameter counts of one copy of the model, counted on the meta device."""

    total: int  # unique parameters (tied embeddings once)
    blocks: list[int]
    d: int
    ff: int
    vocab: int
    n_layers: int

    @property
    def root(self) -> int:
        return self.total - sum(self.blocks)


def model_shapes(name: str) -> Shapes:
    import torch
    from transformers import AutoModelForCausalLM

    from lens.models.blocks import block_list

    config = model_config(name)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config)
    blocks, embed = block_list(lm), lm.get_input_embeddings().weight
    text = config.get_text_config()
    return Shapes(total=sum(p.numel() for p in lm.parameters()),
                  blocks=[sum(p.numel() for p in b.parameters()) for b in blocks], d=embed.shape[1],
                  ff=getattr(text, "intermediate_size", 4 * embed.shape[1]), vocab=embed.shape[0],
                  n_layers=len(blocks))


@dataclass
class Plan:
    """Bytes on one GPU (the rank with the most to hold)."""

    mode: str
    world: int
    weights: float
    gathered: float
    gradients: float
    optimizer: float
    frozen: float
    activations: float
    gpu: float | None = None

    @property
    def total(self) -> float:
        return self.weights + self.gathered + self.gradients + self.optimizer + self.frozen + self.activations

    @property
    def fits(self) -> bool:
        return self.gpu is None or self.total <= USABLE * self.gpu


def _prompt_tokens(prompt: str) -> int:
    """Tokens of a prompt without its tokenizer: about one per 3.5 characters (English BPE), at least 2."""
    return max(2, math.ceil(len(prompt) / 3.5))


def plan(cfg: LensConfig, shapes: Shapes, world: int, mode: str, *, gpu: bool = True,
         gpu_bytes: float | None = None) -> Plan:
    """The per-GPU plan of `cfg` on `world` ranks under `mode` ("ddp" or "fsdp"); `gpu`: bf16 compute (autocast /
    FSDP mixed precision) as on CUDA, else fp32 as on CPU."""
    s, d = shapes, shapes.d
    frozen_bytes = _DTYPE_BYTES[cfg.model.dtype]
    compute = 2 if gpu else 4
    enc_blocks = cfg.encoder_layer + 1
    # Trainable tensors: each trainable copy (the encoder's blocks past encoder.layer never get a gradient), plus
    # the lens's own projections and prompts.
    n_patch = s.n_layers if cfg.decoder.patch_layers == -1 else cfg.decoder.patch_layers
    own = (d * d + d) * (1 + (n_patch if cfg.decoder.per_layer_proj else 0)) + (d * d + 2 * d) \
        + d * (_prompt_tokens(cfg.decoder.prompt) + _prompt_tokens(cfg.encoder.prompt))
    copies, reached = 0, []  # params of the trainable copies; of each copy, those that get gradients
    if cfg.decoder.train_base:
        copies += s.total
        reached.append(s.total)
    if cfg.encoder.train_base:
        copies += s.total
        reached.append(s.root + sum(s.blocks[:enc_blocks]))
    trainable, with_grad = copies + own, sum(reached) + own
    n_copies = cfg.decoder.train_base + cfg.encoder.train_base
    roots = trainable - sum(s.blocks) * n_copies
    micro_per_step = math.ceil(math.ceil(cfg.train.batch_size / world) / cfg.train.micro_batch_size)
    if mode == "ddp":
        weights, gradients, optimizer = 4 * trainable, 4 * trainable, 8 * with_grad
        gathered = 2 * trainable if gpu else 0  # autocast's bf16 copies, cached for the forward
        # In the backward, autograd sums the gradient of a parameter that several passes use (every generated
        # token, the prompt's cache) in a buffer of its own (in the compute dtype: of autocast's copy on GPU),
        # added into DDP's bucket after the last pass: one copy's whole gradient at once, plus the newest pass's
        # part of the largest tensor (an embedding) in fp32.
        gradients += compute * (max(reached, default=0) + own) + 4 * (s.vocab * d if reached else d * d)
    else:
        weights, gradients, optimizer = 4 * trainable / world, 4 * with_grad / world, 8 * with_grad / world
        # The root for the whole step, the last block of each copy until the end of the backward, one in flight.
        gathered = compute * (roots + (n_copies + 1) * max(s.blocks))
        if micro_per_step > 1 and not cfg.train.sync_every_micro_batch:
            gradients += 4 * with_grad  # unsharded gradients kept (in fp32) between micro-batches
        else:
            gradients += compute * (roots + max(s.blocks))  # one unit's unsharded gradient before its reduce-scatter
    return Plan(mode, world, weights, gathered, gradients, optimizer, frozen_bytes * s.total,
                activation_bytes(cfg, shapes, gpu), gpu_bytes)


def activation_bytes(cfg: LensConfig, s: Shapes, gpu: bool) -> float:
    """Bytes saved for the backward of one micro-batch: per token and block about 10 d + 4 ff values in the compute
    dtype (residuals, norms, q/k/v, attention and MLP inputs), fp32 logits x 3 (logits, softmax, their gradient)."""
    a = 2 if gpu else 4
    per_token_block = a * (10 * s.d + 4 * s.ff)
    logit = 4 * 3 * s.vocab
    t, lw = cfg.decoder.t_text, cfg.loss
    dec_tokens, enc_tokens = _prompt_tokens(cfg.decoder.prompt) + t, _prompt_tokens(cfg.encoder.prompt) + t + 1
    rows = cfg.train.micro_batch_size * (lw.group_size if lw.grpo_weight > 0 else 1)
    total = rows * enc_tokens * (cfg.encoder_layer + 1) * per_token_block  # encoder: reconstruct A
    total += rows * dec_tokens * s.n_layers * per_token_block + rows * t * logit  # decoder: generate / score
    if lw.kl_weight > 0:  # the frozen model with A_hat patched in: blocks after model.layer carry gradients
        total += cfg.train.micro_batch_size * cfg.data.seq_len * (s.n_layers - cfg.model.layer) * per_token_block \
            + cfg.train.micro_batch_size * logit
    if lw.lm_weight > 0 and lw.grpo_weight == 0:  # fluency: the frozen model scores the explanation
        total += rows * (_prompt_tokens(lw.lm_prefix) + t) * s.n_layers * per_token_block + rows * t * logit
    return total


def table(plans: list[Plan], model: str) -> str:
    """One row per plan: the columns of memory one GPU holds, in GiB, against the GPU."""
    head = (f"memory plan per GPU for {model} (GiB)\n"
            f"{'mode':<5} {'world':>5} {'weights':>8} {'gathered':>8} {'grads':>8} {'adamw':>8} {'frozen':>8} "
            f"{'activ.':>8} {'total':>8} {'gpu':>6}  fits")
    rows = []
    for p in plans:
        gpu = f"{p.gpu / GiB:6.0f}" if p.gpu else f"{'-':>6}"
        rows.append(f"{p.mode:<5} {p.world:>5} {p.weights / GiB:8.1f} {p.gathered / GiB:8.1f} "
                    f"{p.gradients / GiB:8.1f} {p.optimizer / GiB:8.1f} {p.frozen / GiB:8.1f} "
                    f"{p.activations / GiB:8.1f} {p.total / GiB:8.1f} {gpu}  {'yes' if p.fits else 'NO'}")
    return "\n".join([head, *rows])


def advice(cfg: LensConfig, shapes: Shapes, chosen: Plan, gpu_key: str = "workers.gpuMemory") -> str:
    """One line naming what to change when `chosen` does not fit."""
    total, gpu = chosen.total / GiB, chosen.gpu / GiB
    options = []
    if chosen.mode == "ddp" and (cfg.decoder.train_base or cfg.encoder.train_base):
        fsdp = plan(cfg, shapes, chosen.world, "fsdp", gpu_bytes=chosen.gpu)
        options.append(f"train.parallel=fsdp ({fsdp.total / GiB:.1f} GiB)")
    if chosen.mode == "fsdp":
        if not cfg.train.sync_every_micro_batch:
            synced = plan(_with_train(cfg, sync_every_micro_batch=True), shapes, chosen.world, "fsdp",
                          gpu_bytes=chosen.gpu)
            options.append(f"train.sync_every_micro_batch=true ({synced.total / GiB:.1f} GiB)")
        more = plan(cfg, shapes, chosen.world * 2, "fsdp", gpu_bytes=chosen.gpu)
        options.append(f"twice the GPUs ({more.total / GiB:.1f} GiB at {chosen.world * 2})")
    if cfg.train.micro_batch_size > 1:
        half = max(1, cfg.train.micro_batch_size // 2)
        smaller = plan(_with_train(cfg, micro_batch_size=half), shapes, chosen.world, chosen.mode,
                       gpu_bytes=chosen.gpu)
        options.append(f"train.micro_batch_size={half} ({smaller.total / GiB:.1f} GiB)")
    return (f"memory plan: {chosen.mode} on {chosen.world} GPUs needs {total:.1f} GiB per GPU, more than "
            f"{USABLE:.0%} of {gpu_key}={gpu:.0f} GiB; try " + ", or ".join(options))


def _with_train(cfg: LensConfig, **changes) -> LensConfig:
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


def check(cfg: LensConfig, world: int, gpu_memory, gpus: bool = True,
          gpu_key: str = "workers.gpuMemory") -> tuple[str, Plan]:
    """The table for `cfg` on `world` ranks (ddp and fsdp, the chosen mode marked) and the chosen plan; raises
    InputError (exit 2) with one line of advice when the chosen mode cannot fit."""
    from lens.train.parallel import resolve_mode

    shapes = model_shapes(cfg.model.name)
    gpu_bytes = gpu_memory_bytes(gpu_memory, gpu_key) if gpu_memory and gpus else None
    mode = resolve_mode(cfg, world)
    plans = [plan(cfg, shapes, world, m, gpu=gpus, gpu_bytes=gpu_bytes) for m in ("ddp", "fsdp")]
    chosen = plans[0] if mode == "ddp" else plans[1]
    text = table(plans, cfg.model.name) + f"\nchosen: train.parallel={cfg.train.parallel} -> {mode}"
    if not chosen.fits:
        raise InputError(text + "\n" + advice(cfg, shapes, chosen, gpu_key))
    return text, chosen


def report(cfg: LensConfig, values: dict) -> Plan:
    """Print the plan for the chart values' shape (at the elastic lower bound, where each rank holds the most) to
    stderr; exit 2 (InputError) when `workers.gpuMemory` is set and the run cannot fit."""
    import sys

    import yaml

    from lens.launch.cluster import CHART
    from lens.launch.values import merge_values

    # A key the given values leave out is the chart's default, as helm renders it.
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    workers = merge_values(defaults, values)["workers"]
    gpus = int(workers["gpus"])
    world = int(workers["minReplicas"]) * max(gpus, 1)
    text, chosen = check(cfg, world, workers.get("gpuMemory") or None, gpus=gpus > 0)
    print(text, file=sys.stderr)
    return chosen
