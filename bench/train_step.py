"""Benchmark: one training step of the lens against a naive reference at the same config, in the same process.

    python bench/train_step.py                                   # SmolLM2-135M on CPU, t_text 8, context 128
    python bench/train_step.py --model gemma2-2b-random --device cuda --dtype bfloat16 --batch 32 --naive 0

The naive reference is what research code typically does: no KV cache in generation (the whole sequence is
re-run for every token), the full context for the patched forward (not truncated to p + 1), and full-depth
forwards with `output_hidden_states` (no early exit) for capture and encoder, with logits at every position.
Both compute the same losses (checked) and are timed forward + backward, after a warm-up step.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager

import torch

from lens import losses
from lens.config import from_dictconfig
from lens.models.blocks import replace_block_output
from lens.models.hub import load_model
from lens.models.lens_model import LensModel
from lens.objective import Batch, Knobs, gumbel_keys, lens_losses


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


def naive_step(model: LensModel, batch: Batch, knobs: Knobs) -> torch.Tensor:
    """The same objective as `lens.objective` (ST-Gumbel: MSE + KL + LM), computed the naive way."""
    cfg, orig, lm = model.cfg, model.orig, model.orig.lm
    L, rows = model.layer, torch.arange(len(batch.positions))
    # capture: full-depth forward, all hidden states, full context
    A = lm(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[L + 1][rows, batch.positions]
    gen = model.decoder.generate(A, cfg.decoder.t_text, gumbel_keys(cfg.run.seed, batch.sample_ids), tau=knobs.tau,
                                 use_cache=False)
    # encoder: full-depth forward with all hidden states, then read block L'
    enc = model.encoder
    x = torch.cat([enc.prompt_left.expand(len(A), -1, -1), gen.embeds, enc.prompt_right.expand(len(A), -1, -1),
                   enc.parts.embed_ids(batch.current_ids()).float().unsqueeze(1)], 1)
    x = torch.cat([x[:, :-1], x[:, -1:] + enc.last], 1)
    hidden = enc.lm(inputs_embeds=x.to(enc.parts.embed.weight.dtype), output_hidden_states=True).hidden_states
    A_hat = enc.out(hidden[enc.layer + 1][:, -1].float())
    # functional KL: full context, logits everywhere, then pick p
    with torch.no_grad():
        target = lm(input_ids=batch.input_ids).logits[rows, batch.positions].float()
    with replace_block_output(orig.parts, L, batch.positions, A_hat):
        patched = lm(input_ids=batch.input_ids).logits[rows, batch.positions].float()
    prefix = model.lm_prefix_ids
    with torch.no_grad():
        ctx = torch.cat([prefix.expand(len(A), -1), gen.ids], 1)
        lm_logits = lm(input_ids=ctx).logits[:, len(prefix) - 1: -1].float()
    lw = cfg.loss
    return (lw.mse_weight * losses.normalized_mse(A, A_hat) + lw.kl_weight * losses.kl(target, patched)
            + lw.lm_weight * knobs.alpha * losses.fluency_kl(lm_logits, gen.logits))


def fast_step(model: LensModel, batch: Batch, knobs: Knobs) -> torch.Tensor:
    batch = Batch(batch.input_ids, batch.positions, model.orig.capture(batch.input_ids, model.layer, batch.positions),
                  batch.sample_ids)
    return lens_losses(model, batch, knobs)[0]


@contextmanager
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(step, model, batch, knobs, repeats: int) -> tuple[float, torch.Tensor]:
    device = batch.input_ids.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, loss = [], None
    for i in range(repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        with _sync(device):
            start = time.perf_counter()
            with autocast:
                loss = step(model, batch, knobs)
            loss.mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], loss.detach()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                    help="a model.name, or gemma2-2b-random (Gemma-2-2B shapes, random weights)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder for gemma2-2b-random")
    ap.add_argument("--layer", type=int, default=None, help="default: about half depth")
    ap.add_argument("--t-text", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128, help="context length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive", type=int, default=1, help="also time the naive reference (0: skip)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    if args.model == "gemma2-2b-random":
        lm, tokenizer = gemma2_2b_random(dtype, args.tokenizer)
    else:
        lm, tokenizer = load_model(args.model, dtype)
    lm.to(device)
    n_layers = lm.config.num_hidden_layers
    layer = n_layers // 2 if args.layer is None else args.layer
    cfg = from_dictconfig({"model": {"layer": layer, "dtype": args.dtype}, "decoder": {"t_text": args.t_text},
                           "loss": {"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 1.0}})
    model = LensModel(cfg, lm, tokenizer, act_scale=0.02).to(device)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, lm.config.vocab_size, (args.batch, args.ctx), generator=g).to(device)
    positions = torch.randint(args.ctx // 2, args.ctx, (args.batch,), generator=g).to(device)
    batch = Batch(ids, positions, torch.empty(0), torch.arange(args.batch, device=device))
    knobs = Knobs(tau=1.0, alpha=1.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_fast, loss_fast = time_step(fast_step, model, batch, knobs, args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"model {args.model} layer {layer}/{n_layers} | t_text {args.t_text} | context {args.ctx} | "
          f"batch {args.batch} | {args.device} {args.dtype}")
    print(f"lens step:  {t_fast:.3f} s  ({args.batch / t_fast:.2f} samples/s)"
          + (f"  peak memory {peak:.2f} GiB" if device.type == "cuda" else ""))
    if args.naive:
        t_naive, loss_naive = time_step(naive_step, model, batch, knobs, args.repeats)
        diff = float((loss_fast - loss_naive).abs().max() / loss_naive.abs().max())
        print(f"naive step: {t_naive:.3f} s  ({args.batch / t_naive:.2f} samples/s)")
        print(f"speed-up naive/lens: {t_naive / t_fast:.2f}x  (same losses: max rel diff {diff:.1e})")


if __name__ == "__main__":
    main()
