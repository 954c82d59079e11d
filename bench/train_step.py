"""Benchmark: one training step of the lens against a naive reference at the same config, in the same process.

    python bench/train_step.py --preset matched                  # the comparison the README quotes (CPU)
    python bench/train_step.py --preset matched --train-base     # trainable decoder and encoder copies
    python bench/train_step.py --preset matched --grpo 8         # GRPO, groups of 8
    python bench/train_step.py --model gemma2-2b-random --device cuda --dtype bfloat16 --batch 32

The naive reference is what research code typically does: no KV cache in generation (the whole sequence is
re-run for every token), full-context forwards for the functional KL (logits at every position, the patched one a
second full pass), full-depth forwards with `output_hidden_states` (no early exit) for capture and encoder, and
every prompt recomputed for every row. Both compute the same losses (checked) and are timed forward + backward +
optimizer step, alternating lens and naive steps after a warm-up of each, so a loaded machine slows both alike.
The lens step also prints where its time goes (the pieces of `lens.objective` timed as it calls them).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

from lens import losses
from lens.config import from_dictconfig
from lens.models.blocks import replace_block_output
from lens.models.hub import load_model
from lens.models.lens_model import LensModel
from lens.objective import Batch, Knobs, gumbel_keys, lens_losses

# The configuration: SmolLM2-135M fp32, layer 15, batch 8, context 128, t_text 8, KL 1 + LM 0.1,
# positions uniform over the context, 2 threads.
PRESETS = {"matched": dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", layer=15, batch=8, ctx=128, t_text=8,
                           mse=0.0, kl=1.0, lm=0.1, min_pos=0, threads=2, device="cpu", dtype="float32")}
DEFAULTS = dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", layer=None, batch=8, ctx=128, t_text=8, mse=1.0,
                kl=1.0, lm=1.0, min_pos=None, threads=None, device="cuda" if torch.cuda.is_available() else "cpu",
                dtype="float32")


def gemma2_2b_random(dtype: torch.dtype, tokenizer_dir: str | None):
    """Gemma-2-2B's shapes with random weights (no download); any tokenizer does for the prompt text (default:
    SmolLM2's), since its ids are below Gemma's vocabulary size."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        lm = Gemma2ForCausalLM(cfg).to(dtype)
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        _, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    return lm.eval().requires_grad_(False), tokenizer


def _naive_encoder(model: LensModel, embeds: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Full-depth forward with all hidden states over the whole prompt, then read block L'."""
    enc, B = model.encoder, len(current)
    x = torch.cat([enc.prompt_left.expand(B, -1, -1), embeds, enc.prompt_right.expand(B, -1, -1),
                   enc.parts.embed_ids(current).float().unsqueeze(1)], 1)
    x = torch.cat([x[:, :-1], x[:, -1:] + enc.last], 1)
    hidden = enc.lm(inputs_embeds=x.to(enc.parts.embed.weight.dtype), output_hidden_states=True).hidden_states
    return enc.out(hidden[enc.layer + 1][:, -1].float())


def _naive_functional_logits(model: LensModel, batch: Batch, A_hat: torch.Tensor):
    """Two full-context forwards with logits everywhere, then pick p."""
    lm, rows = model.orig.lm, torch.arange(len(batch.positions))
    with torch.no_grad():
        target = lm(input_ids=batch.input_ids).logits[rows, batch.positions].float()
    with replace_block_output(model.orig.parts, model.layer, batch.positions, A_hat):
        patched = lm(input_ids=batch.input_ids).logits[rows, batch.positions].float()
    return target, patched


@torch.no_grad()
def _naive_continuation(model: LensModel, ids: torch.Tensor) -> torch.Tensor:
    prefix = model.lm_prefix_ids
    ctx = torch.cat([prefix.expand(len(ids), -1), ids], 1)
    return model.orig.lm(input_ids=ctx).logits[:, len(prefix) - 1: -1].float()


def naive_step(model: LensModel, batch: Batch, knobs: Knobs) -> torch.Tensor:
    """The same objective as `lens.objective` (per-sample totals; the bench's configs have no entropy term),
    computed the naive way."""
    cfg, lw, lm = model.cfg, model.cfg.loss, model.orig.lm
    rows = torch.arange(len(batch.positions))
    with torch.no_grad():  # capture: full-depth forward, all hidden states, full context
        A = lm(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[model.layer + 1]
        A = A[rows, batch.positions].float()
    if lw.grpo_weight > 0:
        return _naive_grpo(model, batch, A)
    gen = model.decoder.generate(A, cfg.decoder.t_text, gumbel_keys(cfg.run.seed, batch.sample_ids), tau=knobs.tau,
                                 use_cache=False)
    A_hat = _naive_encoder(model, gen.embeds, batch.current_ids())
    target, patched = _naive_functional_logits(model, batch, A_hat)
    return (lw.mse_weight * losses.normalized_mse(A, A_hat) + lw.kl_weight * losses.kl(target, patched)
            + lw.lm_weight * knobs.alpha * losses.fluency_kl(_naive_continuation(model, gen.ids), gen.logits))


def _naive_grpo(model: LensModel, batch: Batch, A: torch.Tensor) -> torch.Tensor:
    cfg, lw, dec = model.cfg, model.cfg.loss, model.decoder
    B, G = len(A), lw.group_size
    A = A.repeat_interleave(G, dim=0)
    keys = gumbel_keys(cfg.run.seed, batch.sample_ids.repeat_interleave(G), torch.arange(G).repeat(B))
    with torch.no_grad():  # sample, then score the samples with gradients
        gen = dec.generate(A, cfg.decoder.t_text, keys, hard=True, temperature=lw.temperature, use_cache=False)
    A_hat = _naive_encoder(model, gen.embeds, batch.current_ids().repeat_interleave(G))
    mse = losses.normalized_mse(A, A_hat)
    advantage = losses.group_advantage(-mse.detach().view(B, G)).view(-1)
    inputs = torch.cat([dec.prefix(A), dec.parts.embed_ids(gen.ids[:, :-1]).float()], 1)  # the whole prompt per row
    logp = losses.token_logprobs(dec._forward(A, inputs, None, slot=dec.slot, keep=gen.ids.shape[1]), gen.ids)
    ref_logp = losses.token_logprobs(_naive_continuation(model, gen.ids), gen.ids)
    with torch.no_grad():  # the logged functional KL, as the lens computes it
        _naive_functional_logits(model, batch, A_hat[torch.arange(B) * G])
    per_group = lambda x: x.view(B, G).mean(1)  # noqa: E731
    return (lw.mse_weight * per_group(mse) + lw.grpo_weight * per_group(losses.policy_loss(logp, advantage))
            + lw.grpo_beta * per_group(losses.k3_kl(logp, ref_logp)))


def lens_step(model: LensModel, batch: Batch, knobs: Knobs) -> torch.Tensor:
    """What the trainer runs on the fly: the objective, whose unpatched pass also gives A."""
    return lens_losses(model, Batch(batch.input_ids, batch.positions, None, batch.sample_ids), knobs)[0]


class Breakdown:
    """Seconds spent in named pieces of the lens step, timed as `lens.objective` calls them."""

    PIECES = {"capture": ("orig", "capture"), "unpatched pass": ("orig", "unpatched"),
              "patched pass": ("orig", "patched"), "LM loss": ("orig", "continuation_logits"),
              "decoder generation": ("decoder", "generate"), "decoder scoring": ("decoder", "score"),
              "encoder": ("encoder", "forward")}

    def __init__(self, model: LensModel, device: torch.device):
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.current: dict[str, float] = defaultdict(float)
        self.device, self.active = device, False
        for name, (owner, attr) in self.PIECES.items():
            obj = getattr(model, owner)
            if hasattr(obj, attr):  # (so the bench also runs against older versions of the lens)
                setattr(obj, attr, self._timed(name, getattr(obj, attr)))

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            with self.span(name) if self.active else nullcontext():
                return fn(*args, **kwargs)
        return timed

    @contextmanager
    def span(self, name: str):
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        self.current[name] += time.perf_counter() - start

    def close_step(self) -> None:
        for name, s in self.current.items():
            self.seconds[name].append(s)
        self.current.clear()

    def median(self, name: str) -> float:
        return _median(self.seconds[name])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run_step(step, model, batch, knobs, optimizer, breakdown: Breakdown | None) -> tuple[float, torch.Tensor]:
    device = batch.input_ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    span = breakdown.span if breakdown else (lambda name: nullcontext())
    if breakdown:
        breakdown.active = True
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    with autocast:
        loss = step(model, batch, knobs)
    with span("backward"):
        loss.mean().backward()
    with span("optimizer"):
        optimizer.step()
    _sync(device)
    if breakdown:
        breakdown.close_step()
        breakdown.active = False
    return time.perf_counter() - start, loss.detach()


def build(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.model == "gemma2-2b-random":
        lm, tokenizer = gemma2_2b_random(dtype, args.tokenizer)
    else:
        lm, tokenizer = load_model(args.model, dtype)
    lm.to(device)
    n_layers = lm.config.num_hidden_layers
    layer = n_layers // 2 if args.layer is None else args.layer
    loss = {"mse_weight": args.mse, "kl_weight": args.kl, "lm_weight": args.lm}
    if args.grpo:
        loss = {"mse_weight": 1.0, "kl_weight": 0.0, "lm_weight": 0.0, "grpo_weight": 1.0, "group_size": args.grpo,
                "grpo_beta": 0.1}
    cfg = from_dictconfig({"model": {"layer": layer, "dtype": args.dtype}, "decoder": {"t_text": args.t_text,
                           "train_base": args.train_base}, "encoder": {"train_base": args.train_base},
                           "loss": loss})
    model = LensModel(cfg, lm, tokenizer, act_scale=0.02).to(device)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, lm.config.vocab_size, (args.batch, args.ctx), generator=g).to(device)
    low = args.ctx // 2 if args.min_pos is None else args.min_pos
    positions = torch.randint(low, args.ctx, (args.batch,), generator=g).to(device)
    batch = Batch(ids, positions, torch.empty(0), torch.arange(args.batch, device=device))
    return model, batch, layer, n_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named configuration (flags after it "
                    "still override)")
    ap.add_argument("--model", help="a model.name, or gemma2-2b-random (Gemma-2-2B shapes, random weights)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for gemma2-2b-random")
    ap.add_argument("--layer", type=int, help="default: about half depth")
    ap.add_argument("--t-text", type=int)
    ap.add_argument("--ctx", type=int, help="context length")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--min-pos", type=int, help="positions are uniform in [min_pos, ctx); default ctx // 2")
    ap.add_argument("--mse", type=float)
    ap.add_argument("--kl", type=float)
    ap.add_argument("--lm", type=float)
    ap.add_argument("--train-base", action="store_true", help="trainable decoder and encoder copies")
    ap.add_argument("--grpo", type=int, default=0, metavar="G", help="GRPO with groups of G (instead of ST-Gumbel)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps of each before timing")
    ap.add_argument("--naive", type=int, default=1, help="also time the naive reference (0: skip)")
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    for key, value in {**DEFAULTS, **PRESETS.get(args.preset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, batch, layer, n_layers = build(args)
    device, knobs = batch.input_ids.device, Knobs(tau=1.0, alpha=1.0)
    # lr 0: the update costs what it always does but leaves the weights, so every step computes the same losses
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=0.0)
    breakdown = Breakdown(model, device)
    print(f"model {args.model} layer {layer}/{n_layers} | t_text {args.t_text} | context {args.ctx} | batch "
          f"{args.batch} | {'GRPO group ' + str(args.grpo) if args.grpo else 'ST-Gumbel'} | "
          f"{'trainable' if args.train_base else 'frozen'} bases | {args.device} {args.dtype} | "
          f"{torch.get_num_threads()} threads")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        run_step(lens_step, model, batch, knobs, optimizer, None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    for _ in range(args.warmup if args.naive else 0):
        run_step(naive_step, model, batch, knobs, optimizer, None)
    t_lens, t_naive, loss_lens, loss_naive = [], [], None, None
    for _ in range(args.repeats):  # alternating, so a loaded machine slows both alike
        t, loss_lens = run_step(lens_step, model, batch, knobs, optimizer, breakdown)
        t_lens.append(t)
        if args.naive:
            t, loss_naive = run_step(naive_step, model, batch, knobs, optimizer, None)
            t_naive.append(t)
    lens_s = _median(t_lens)
    print(f"lens step:  {lens_s:.3f} s  ({args.batch / lens_s:.2f} samples/s)"
          + (f"  peak memory {peak:.2f} GiB" if device.type == "cuda" else ""))
    pieces = [(name, breakdown.median(name)) for name in breakdown.seconds]
    other = lens_s - sum(s for _, s in pieces)
    print("  " + " | ".join(f"{name} {s:.3f} s" for name, s in pieces) + f" | other {max(other, 0):.3f} s")
    if args.naive:
        naive_s = _median(t_naive)
        diff = float((loss_lens - loss_naive).abs().max() / loss_naive.abs().max().clamp_min(1e-12))
        print(f"naive step: {naive_s:.3f} s  ({args.batch / naive_s:.2f} samples/s)")
        print(f"speed-up naive/lens: {naive_s / lens_s:.2f}x  (same losses: max rel diff {diff:.1e}; "
              f"medians of {args.repeats} alternating steps)")


if __name__ == "__main__":
    main()
