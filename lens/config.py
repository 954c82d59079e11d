"""The one typed config schema for every command.

A run config is a YAML file in `conf/` composed with Hydra (so `defaults:` lists and `key=value` overrides work),
merged onto these dataclasses (unknown keys and wrong types are errors), then checked field by field in
`__post_init__` and across fields in `LensConfig.__post_init__`. Checks that need the model (layer in range) are in
`check_against_model`. Every failure is a `ConfigError` naming the key, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lens.errors import ConfigError

def parse_duration(text: str | int, steps_per_epoch: int, key: str = "duration") -> int:
    """A duration in optimizer steps. `"500s"` and `"500os"`: optimizer steps; `"2e"`, `"0.5e"`: epochs (fractions
    allowed, rounded to the nearest step); a bare integer means steps."""
    if isinstance(text, int):
        steps = text
    else:
        m = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*(os|s|e)\s*$", str(text))
        if not m:
            raise ConfigError(key, text, 'a duration like "500s" (steps), "10os" (optimizer steps) or "0.5e" (epochs)')
        number, unit = float(m.group(1)), m.group(2)
        if unit in ("s", "os"):
            if number != int(number):
                raise ConfigError(key, text, "a whole number of steps (fractions are for epochs: \"0.5e\")")
            steps = int(number)
        else:
            steps = int(round(number * steps_per_epoch))
    if steps < 0:
        raise ConfigError(key, text, "a non-negative duration")
    return steps


def _check_duration(key: str, text: str) -> None:
    parse_duration(text, steps_per_epoch=1, key=key)


def _one_of(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(map(str, choices)))


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(key, value, "a non-negative number" if allow_zero else "a positive number")


_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def _no_url_credentials(key: str, value: Any) -> None:
    """A URL with `user:password@` would put the secret into the ConfigMap, every checkpoint and W&B."""
    if isinstance(value, str) and _URL_USERINFO.match(value):
        raise ConfigError(key, _URL_USERINFO.sub(r"\1***@", value), "a URL without credentials (user:password@): "
                          "give them as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (on a cluster: secrets.aws)")


def _attr(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class RunConfig:
    name: str = "smollm2-135m-lens"
    """Run id: names the Helm release, the W&B run, the rendezvous id and the storage prefix."""
    dir: str = "runs/${run.name}"
    """Where checkpoints, the resolved config and metrics go (a local path or s3://bucket/prefix)."""
    seed: int = 0
    """Seeds everything: data order, positions, Gumbel noise, initialisation."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?", self.name):
            raise ConfigError("run.name", self.name, "a name of lowercase letters, digits and '-' that starts with a "
                              "letter, at most 52 characters (it names Kubernetes objects: a DNS-1035 label)")


@dataclass
class ModelConfig:
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """HF hub id, a local HF model directory, or a .gguf file."""
    layer: int = 15
    """The block L whose output (the residual stream after block L, 0-based) is explained."""
    dtype: str = "float32"
    """Weights of the frozen model: float32 or bfloat16. Trainable parameters are always fp32 masters."""
    revision: str = "main"
    """Hub revision (branch, tag or commit) of a hub-id model.name. Its mirror keeps the commit of its first copy."""
    cache: Optional[str] = None
    """Mirror of a hub model's files (safetensors, configs, tokenizer): copied from the hub once, by the first
    process that needs them, to <cache>/<model.name>@<model.revision>/ (local path or s3://), and read from there by
    every start, so restarts never read the hub. None: s3://<bucket>/models of the first of run.dir,
    data.activations, data.tokens on S3, else this machine's $LENS_CACHE/models. "none": no mirror. Local folders,
    .gguf files and the offline SmolLM2 conversion are never mirrored."""

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16"))
        if not re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9._/]*", self.revision) or ".." in self.revision:
            raise ConfigError("model.revision", self.revision, "a hub branch, tag or commit, e.g. main")
        if self.cache is not None and not self.cache.strip():
            raise ConfigError("model.cache", self.cache, "a local path or s3:// URI, none (no mirror), or null "
                              "(derived from run.dir)")
        if self.layer < 0:
            raise ConfigError("model.layer", self.layer, "a block index >= 0")


@dataclass
class DecoderConfig:
    prompt: str = "<bos>Short explanation of <embed>. Language, topic, sentiment, claims, speaker, style, etc:"
    """Decoder prompt; `<embed>` marks the slot for the projected activation, `<bos>` the tokenizer's BOS."""
    t_text: int = 8
    """Explanation length in tokens."""
    train_base: bool = False
    """Train the decoder's own copy of the LM weights (otherwise it shares the frozen orig weights)."""
    patch_layers: int = 0
    """Also overwrite the residual at the slot before each of the first N blocks (-1: all blocks)."""
    per_layer_proj: bool = False
    """With patch_layers: one projection per patched layer instead of one shared."""

    def __post_init__(self) -> None:
        if self.prompt.count("<embed>") != 1:
            raise ConfigError("decoder.prompt", self.prompt, "a prompt with exactly one <embed> slot")
        if self.t_text < 1:
            raise ConfigError("decoder.t_text", self.t_text, "an integer >= 1")
        if self.patch_layers < -1:
            raise ConfigError("decoder.patch_layers", self.patch_layers, "0 (off), N >= 1, or -1 (all blocks)")


@dataclass
class EncoderConfig:
    prompt: str = "<bos>Text: <text>. The word this describes is"
    """Encoder soft prompt; `<text>` marks where the explanation goes."""
    train_base: bool = False
    """Train the encoder's own copy of the LM weights."""
    layer: Optional[int] = None
    """Block L' whose output at the last position is read (default: model.layer)."""
    use_current_token: bool = True
    """Append the embedding of the token at p after the explanation."""

    def __post_init__(self) -> None:
        if self.prompt.count("<text>") != 1:
            raise ConfigError("encoder.prompt", self.prompt, "a prompt with exactly one <text> slot")


@dataclass
class ScheduleConfig:
    start: float = 1.0
    """Value at step 0."""
    end: Optional[float] = None
    """Final value (None: constant at `start`)."""
    kind: str = "linear"
    """Shape of the move from start to end: linear or cosine."""
    hold: str = "0s"
    """Stay at `start` this long first."""
    ramp: str = "1e"
    """Then move to `end` over this long, and stay there."""

    def check(self, key: str) -> None:
        _one_of(f"{key}.kind", self.kind, ("linear", "cosine"))
        _check_duration(f"{key}.hold", self.hold)
        _check_duration(f"{key}.ramp", self.ramp)


@dataclass
class LossConfig:
    mse_weight: float = 0.0
    """Normalised MSE ||A - A_hat||^2 / ||A||^2."""
    kl_weight: float = 1.0
    """Functional KL of the orig model's next-token distribution with A vs A_hat patched in."""
    lm_weight: float = 1.0
    """Fluency KL to the orig model's own next-token distribution (times the alpha schedule)."""
    entropy_weight: float = 0.0
    """-weight * entropy of the decoder's token distributions (times the entropy schedule)."""
    entropy_cap: Optional[float] = None
    """Clamp the entropy from above before weighting, which makes the entropy bonus a floor."""
    grpo_weight: float = 0.0
    """> 0 switches to GRPO: hard-sampled explanations, decoder trained by the policy term, encoder by MSE."""
    group_size: int = 8
    """GRPO: explanations sampled per activation."""
    grpo_beta: float = 0.0
    """GRPO: weight of the k3 KL to the LM under the natural prefix."""
    temperature: float = 1.0
    """GRPO: sampling temperature."""
    resample_ablation: bool = False
    """Train on A_hat + (A' - A_hat') with A' from another context (needs dumped A' pairs)."""
    lm_prefix: str = "<bos>Short explanation of something. Language, topic, sentiment, claims, speaker, style, etc:"
    """Natural prefix under which the LM scores the explanation (fluency KL and the GRPO KL)."""

    def __post_init__(self) -> None:
        for name in ("mse_weight", "kl_weight", "lm_weight", "entropy_weight", "grpo_weight", "grpo_beta"):
            _positive(f"loss.{name}", getattr(self, name), allow_zero=True)
        _positive("loss.temperature", self.temperature)
        if self.grpo_weight > 0:
            if self.group_size < 2:
                raise ConfigError("loss.group_size", self.group_size, "an integer >= 2 when loss.grpo_weight > 0")
            if self.mse_weight == 0:
                raise ConfigError("loss.mse_weight", 0, "> 0 with loss.grpo_weight > 0 (GRPO trains the encoder by "
                                  "MSE only)")
            for name in ("kl_weight", "lm_weight", "entropy_weight"):  # GRPO's decoder loss is the policy term
                if getattr(self, name) > 0:
                    raise ConfigError(f"loss.{name}", getattr(self, name), "0 with loss.grpo_weight > 0 (GRPO trains "
                                      "the decoder by the policy term and loss.grpo_beta only; the term is still "
                                      "logged)")


@dataclass
class SchedulesConfig:
    tau: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(1.0, 0.1, "cosine", "0.1e", "1e"))
    """Gumbel-softmax temperature."""
    alpha: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(0.0, 1.0, "linear", "0s", "0.5e"))
    """Multiplier of loss.lm_weight."""
    entropy: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(1.0))
    """Multiplier of loss.entropy_weight."""

    def __post_init__(self) -> None:
        for name in ("tau", "alpha", "entropy"):
            getattr(self, name).check(f"schedules.{name}")
        for end in ("start", "end"):
            value = getattr(self.tau, end)
            if value is not None and value <= 0:
                raise ConfigError(f"schedules.tau.{end}", value, "a positive Gumbel-softmax temperature")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-5
    """Floor of the decay: the LR ends exactly here."""
    warmup: str = "0.05e"
    """Linear warmup from 0 to lr."""
    decay: str = "cosine"
    """After warmup: cosine (to min_lr at train.max_steps) or constant."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    lr_mult: dict = field(default_factory=lambda: {"proj": 1.0, "prompt": 1.0, "base": 0.1,
                                                   "decoder": 1.0, "encoder": 1.0})
    """LR multipliers by role (proj, prompt, base) and by module (decoder, encoder); a group gets the product."""

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.min_lr", self.min_lr, allow_zero=True)
        if self.min_lr > self.lr:
            raise ConfigError("optim.min_lr", self.min_lr, f"a value <= optim.lr ({self.lr})")
        _check_duration("optim.warmup", self.warmup)
        _one_of("optim.decay", self.decay, ("cosine", "constant"))
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas", self.betas, "two numbers in [0, 1)")
        roles = ("proj", "prompt", "base", "decoder", "encoder")
        for k, v in self.lr_mult.items():
            if k not in roles:
                raise ConfigError(f"optim.lr_mult.{k}", v, "a multiplier keyed by one of " + ", ".join(roles))
            _positive(f"optim.lr_mult.{k}", float(v), allow_zero=True)
        self.lr_mult = {r: float(self.lr_mult.get(r, 1.0)) for r in roles}


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Optimizer steps to train."""
    batch_size: int = 32
    """Global batch (samples per optimizer step), fixed whatever the number of processes."""
    micro_batch_size: int = 8
    """Samples per forward/backward on one process; gradient accumulation covers the rest."""
    checkpoint_every: int = 100
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Committed checkpoints to keep (the newest ones)."""
    async_checkpoint: bool = False
    """Upload checkpoints in the background (dcp.async_save): a save blocks training only while this rank's
    shards are copied to host memory; the checkpoint counts once the upload finished (a preemption waits for it)."""
    log_every: int = 10
    """Steps between log lines."""
    eval_every: int = 100
    """Steps between held-out evaluations (0: only at the end)."""
    eval_samples: int = 256
    """Held-out activations per evaluation."""
    eval_explanations: int = 4
    """Held-out positions explained at every evaluation (log lines and a W&B table): fixed ones, evenly spaced over
    the eval_samples, so the same positions are shown at every evaluation and after a resume (0: none)."""
    parallel: str = "auto"
    """Data parallelism: "ddp" (every rank holds the whole lens, gradients all-reduced), "fsdp" (FSDP2: trainable
    copies, their gradients and AdamW state sharded over the ranks per transformer block) or "auto" (fsdp when a
    base is trainable and there are several ranks, ddp otherwise)."""
    sync_every_micro_batch: bool = False
    """fsdp: reduce-scatter the gradients after every micro-batch instead of once per step. Less memory (no
    unsharded gradient is kept between micro-batches), more traffic: for GPUs too small for the gradient."""
    collective_timeout: int = 300
    """Seconds a rank waits in a collective before giving up: bounds how long survivors of a vanished peer hang
    before their agent re-forms the group. Must exceed the longest wait a healthy rank has (rank 0's evaluation)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "micro_batch_size", "checkpoint_every", "log_every", "eval_samples",
                     "keep_checkpoints", "collective_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", getattr(self, name), "an integer >= 1")
        for name in ("eval_every", "eval_explanations"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}", getattr(self, name), "an integer >= 0")
        _one_of("train.parallel", self.parallel, ("auto", "ddp", "fsdp"))


@dataclass
class DataConfig:
    corpus: str = "stdlib"
    """Text source: "stdlib" (Python's own docstrings, offline), a .txt/.jsonl file or directory, or a Hugging
    Face dataset (a name, or a directory written by `save_to_disk`)."""
    text_field: str = "text"
    """Field holding the text in jsonl files and datasets."""
    seq_len: int = 128
    """Tokens per context."""
    min_pos: int = 4
    """Positions p are drawn from [first real token + min_pos, last token]."""
    val_fraction: float = 0.05
    """Share of the corpus held out for validation (a disjoint block of sequences)."""
    activations: Optional[str] = None
    """Where dumped activations live (local path or s3://...)."""
    on_the_fly: bool = True
    """Capture activations inside training instead of reading a dump."""
    max_sequences: Optional[int] = None
    """Cap on sequences taken from the corpus (None: all)."""
    shard_size: int = 1024
    """`lens dump`: samples per activation shard (the unit of work, of skipping on rerun, and of reading)."""
    dump_batch_size: int = 64
    """`lens dump`: sequences per capture forward."""
    layers: list[int] = field(default_factory=list)
    """`lens dump`: blocks captured in one forward into one dump (empty: [model.layer]); training reads model.layer."""
    tokens: Optional[str] = None
    """Token store (the corpus tokenized once; local path or s3://), built by the data Job. None: next to the dump
    (<data.activations>/tokens) when training from one, else this machine's cache, built by whoever needs it."""
    token_shard_docs: int = 4096
    """Documents per token-store shard (the unit of work, of skipping on rerun, and of fetching)."""
    wait_timeout: float = 3600.0
    """Seconds the trainer waits for a token store or dump another job is writing, then exits to be restarted."""

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError("data.seq_len", self.seq_len, "an integer >= 2")
        if not 0 <= self.min_pos < self.seq_len:
            raise ConfigError("data.min_pos", self.min_pos, f"an integer in [0, data.seq_len={self.seq_len})")
        if not 0 < self.val_fraction < 1:
            raise ConfigError("data.val_fraction", self.val_fraction, "a fraction in (0, 1)")
        if self.wait_timeout < 0:
            raise ConfigError("data.wait_timeout", self.wait_timeout, "seconds >= 0")
        for name in ("shard_size", "dump_batch_size", "token_shard_docs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}", getattr(self, name), "an integer >= 1")


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = None
    """S3-compatible endpoint (default: $AWS_ENDPOINT_URL, then AWS)."""


@dataclass
class WandbConfig:
    project: str = "consistency-lens"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team or user)."""
    mode: str = "auto"
    """auto (online with WANDB_API_KEY, else offline), online, offline or disabled."""

    def __post_init__(self) -> None:
        _one_of("wandb.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class LensConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedules: SchedulesConfig = field(default_factory=SchedulesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        for key in ("storage.endpoint_url", "run.dir", "data.activations", "data.corpus", "model.name", "model.cache"):
            _no_url_credentials(key, _attr(self, key))
        if self.loss.resample_ablation and self.data.on_the_fly:
            raise ConfigError("loss.resample_ablation", True, "false with data.on_the_fly=true (A' pairs come "
                              "from a dump: set data.on_the_fly=false and data.activations)")
        if self.loss.resample_ablation and self.loss.grpo_weight > 0:
            raise ConfigError("loss.resample_ablation", True, "false with loss.grpo_weight > 0 (the GRPO objective "
                              "has no resample-ablation term)")
        if not self.data.on_the_fly and not self.data.activations:
            raise ConfigError("data.activations", self.data.activations, "a local path or s3:// URI when "
                              "data.on_the_fly=false")
        if self.train.micro_batch_size > self.train.batch_size:
            raise ConfigError("train.micro_batch_size", self.train.micro_batch_size,
                              f"an integer <= train.batch_size ({self.train.batch_size})")
        if self.loss.grpo_weight == 0 and self.loss.kl_weight + self.loss.mse_weight == 0:
            raise ConfigError("loss", "kl_weight=0, mse_weight=0, grpo_weight=0",
                              "at least one reconstruction term: loss.kl_weight, loss.mse_weight or "
                              "loss.grpo_weight > 0")

    @property
    def encoder_layer(self) -> int:
        return self.model.layer if self.encoder.layer is None else self.encoder.layer


def _valid_keys(node: Any) -> list[str]:
    if isinstance(node, dict):
        return list(node)
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


# Keys of the research code this project replaces (its Hydra configs), answered with the key that replaces each.
RESEARCH_KEYS = {
    "layer_l": "model.layer",
    "model_name": "model.name",
    "t_text": "decoder.t_text",
    "batch_size": "train.batch_size",
    "max_train_steps": "train.max_steps",
    "gradient_accumulation_steps": "train.micro_batch_size (accumulation is train.batch_size / "
                                   "train.micro_batch_size per process, adapted to the number of processes)",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip",
    "lm_base_weight": "loss.lm_weight",
    "kl_base_weight": "loss.kl_weight",
    "mse_weight": "loss.mse_weight",
    "entropy_weight": "loss.entropy_weight",
    "resample_ablation": "loss.resample_ablation",
    "lm_loss_natural_prefix": "loss.lm_prefix",
    "GRPO_weight": "loss.grpo_weight",
    "GRPO_beta": "loss.grpo_beta",
    "group_n": "loss.group_size",
    "gumbel_tau_schedule": "schedules.tau",
    "alpha_schedule": "schedules.alpha",
    "entropy_schedule": "schedules.entropy",
    "activation_dir": "data.activations",
    "dataset.on_the_fly.enabled": "data.on_the_fly",
    "trainable_components.decoder.base_model": "decoder.train_base",
    "trainable_components.encoder.base_model": "encoder.train_base",
}


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for name in _valid_keys(node):
        child = node[name] if isinstance(node, dict) else getattr(node, name)
        keys += _leaf_keys(child, f"{prefix}{name}.") if dataclasses.is_dataclass(child) else [prefix + name]
    return keys


def _research_key_error(dotted: str) -> ConfigError | None:
    """A research-code key (or a section of one, as a file's nested mapping is reported by its first part)."""
    hits = {old: new for old, new in RESEARCH_KEYS.items() if old == dotted or old.startswith(dotted + ".")}
    if not hits:
        return None
    answer = "; ".join(new if old == dotted else f"{new} for {old}" for old, new in hits.items())
    return ConfigError(dotted, "(a key of the research code)", f"{answer}: the key that replaces it here")


def _unknown_key_error(dotted: str) -> ConfigError:
    """Name the first unknown part of a dotted key, the keys valid at that level and the closest valid key."""
    import difflib

    research = _research_key_error(dotted)
    if research:
        return research
    node: Any = LensConfig()
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part in _valid_keys(node):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
            continue
        where = ".".join(parts[:i]) or "top level"
        # The closest key at this level, else a leaf anywhere whose own name is close (max_steps -> train.max_steps).
        near = difflib.get_close_matches(part, _valid_keys(node), n=1, cutoff=0.6)
        prefix = ".".join(parts[:i] + near)
        if not near:
            leaves = {k.rsplit(".", 1)[-1]: k for k in _leaf_keys(LensConfig())}
            near = difflib.get_close_matches(part, list(leaves), n=1, cutoff=0.75)
            prefix = leaves[near[0]] if near else ""
        hint = f"; did you mean {prefix}?" if near else ""
        return ConfigError(".".join(parts[: i + 1]), "(unknown key)",
                           f"a key of {where}: " + ", ".join(_valid_keys(node)) + hint)
    return ConfigError(dotted, "(unknown key)", "a key of the schema")


def compose(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Compose a config file with Hydra (its `defaults:` list and `key=value` overrides) onto the schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    path = Path(path)
    if not path.is_file():
        raise ConfigError("CONFIG", str(path), "a path to a YAML config file, e.g. conf/smollm2_135m.yaml")
    _check_yaml(path)
    GlobalHydra.instance().clear()
    schema = OmegaConf.structured(LensConfig)
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None):
            file_cfg = hydra_compose(config_name=path.stem)
            merged = OmegaConf.merge(schema, file_cfg)  # unknown keys in the file fail here
            OmegaConf.set_struct(merged, True)
            _apply_overrides(merged, overrides)
    except HydraException as e:  # from the file's `defaults:` list (overrides are checked in _apply_overrides)
        raise ConfigError("CONFIG", str(path), f"a config Hydra can compose ({str(e).splitlines()[0]})") from None
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None
    try:  # `+key=value` appends bypass struct mode: check the result against the schema once more
        plain = OmegaConf.create(OmegaConf.to_container(merged, resolve=False))
        return OmegaConf.merge(OmegaConf.structured(LensConfig), plain)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None


def _check_yaml(path: Path) -> None:
    """The file must be UTF-8 YAML holding a mapping of sections: said in one line (with the line and column of a
    syntax error) before Hydra reads it, whose own errors are tracebacks for these."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("CONFIG", str(path), f"a UTF-8 text file (byte {e.start} is not UTF-8)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("CONFIG", str(path), f"valid YAML ({where}{problem})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError("CONFIG", str(path), f"a YAML mapping of sections (run:, model:, train:, ...), not a "
                          f"{type(data).__name__}")
    for section, value in (data or {}).items():
        if section in _valid_keys(LensConfig()) and value is not None and not isinstance(value, dict):
            raise ConfigError(str(section), value, f"a mapping of {section}.* keys, e.g. {section}: {{KEY: VALUE}}")


def _apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """Apply `key=value` overrides (Hydra's grammar: lists, quoting, null; `+`/`++` add) to the composed config in
    struct mode, so an unknown key or a wrong type is named here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError("overrides", " ".join(overrides), f"key=value overrides ({str(e).splitlines()[0]})") \
            from None
    for o in parsed:
        key = o.key_or_group
        if o.is_delete() or o.is_sweep_override() or o.package is not None:
            raise ConfigError(key, o.input_line, "one key=value override (every key has a default: nothing to "
                              "delete; sweeps and @package are not supported)")
        try:
            OmegaConf.update(cfg, key, o.value(), merge=True, force_add=o.is_add() or o.is_force_add())
        except (ConfigAttributeError, ConfigKeyError):
            raise _unknown_key_error(key) from None
        except OmegaConfBaseException as e:
            raise ConfigError(key, o.input_line.split("=", 1)[-1], f"a value of the right type "
                              f"({str(e).splitlines()[0]})") from None


def _omegaconf_error(e: OmegaConfBaseException) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if "not in struct" in msg or re.search(r"Key '[^']+' not in '", msg):
        return _unknown_key_error(key)
    return ConfigError(key, getattr(e, "value", None), f"a value of the right type ({msg})")


def load_config(path: str | Path, overrides: list[str] = ()) -> LensConfig:
    """Compose, type-check and validate a run config. Raises ConfigError (exit 2) on any problem."""
    merged = compose(path, overrides)
    return from_dictconfig(merged)


def from_dictconfig(cfg: DictConfig | dict) -> LensConfig:
    if isinstance(cfg, dict):
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(LensConfig), OmegaConf.create(cfg))
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e) from None
    try:
        return OmegaConf.to_object(cfg)  # runs every __post_init__
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e) from None


def to_dict(cfg: LensConfig) -> dict:
    """The resolved config as plain data (interpolations already resolved)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: LensConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def check_against_model(cfg: LensConfig, n_layers: int, d_model: int) -> None:
    """Checks that need the subject model's shape."""
    if not 0 <= cfg.model.layer < n_layers:
        raise ConfigError("model.layer", cfg.model.layer, f"a block index in [0, {n_layers - 1}] "
                          f"({cfg.model.name} has {n_layers} blocks)")
    if not 0 <= cfg.encoder_layer < n_layers:
        raise ConfigError("encoder.layer", cfg.encoder_layer, f"a block index in [0, {n_layers - 1}]")
    for layer in cfg.data.layers:
        if not 0 <= layer < n_layers:
            raise ConfigError("data.layers", cfg.data.layers, f"block indices in [0, {n_layers - 1}] "
                              f"({cfg.model.name} has {n_layers} blocks)")
    n_patch = n_layers if cfg.decoder.patch_layers == -1 else cfg.decoder.patch_layers
    if n_patch > n_layers:
        raise ConfigError("decoder.patch_layers", cfg.decoder.patch_layers, f"at most {n_layers} (or -1 for all)")
