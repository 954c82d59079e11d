"""The fast paths of the training step equal the straightforward full-context computation (fp32, 1e-5).

The lens never runs a full-context patched forward, never recomputes a prompt shared by the batch and never
re-runs the whole explanation per generated token. Each test here computes the same thing the obvious way (every
row its whole sequence, logits everywhere, hidden states of a full forward) on tiny models of every family and
compares values and gradients: rows with different positions, positions at the very start, sliding windows shorter
than the context (Gemma-2, Gemma-3) and soft-capping (Gemma-2) included.
"""

from __future__ import annotations

import pytest
import torch

from lens import losses
from lens.models.blocks import replace_block_output
from lens.models.lens_model import LensModel
from lens.models.orig import Orig
from lens.objective import Batch, Knobs, gumbel_keys, lens_losses, lens_terms
from test_models import LAYER, lens_cfg

# ragged rows: the very start, one token in, the last position, one inside Gemma's 8-token window
POSITIONS = torch.tensor([0, 23, 1, 11])
TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to TOL relative to the reference's scale (absolute for values below 1)."""
    return bool((a - b).abs().max() <= TOL * max(1.0, float(b.abs().max())))


# --- the straightforward computation, written out -------------------------------------------------------------

def full_functional_logits(lm, layer: int, ids: torch.Tensor, positions: torch.Tensor, new_acts: torch.Tensor):
    """(target, patched) logits at p from two full-context forwards with logits everywhere."""
    rows = torch.arange(len(positions))
    with torch.no_grad():
        target = lm(input_ids=ids).logits[rows, positions]
    with replace_block_output(Orig(lm).parts, layer, positions, new_acts):
        patched = lm(input_ids=ids).logits[rows, positions]
    return target, patched


def full_encoder(lens: LensModel, embeds: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
    enc, B = lens.encoder, embeds.shape[0]
    pieces = [enc.prompt_left.expand(B, -1, -1), embeds, enc.prompt_right.expand(B, -1, -1)]
    if current is not None:
        pieces.append(enc.parts.embed_ids(current).unsqueeze(1))
    x = torch.cat(pieces, 1)
    x = torch.cat([x[:, :-1], x[:, -1:] + enc.last], 1)
    return enc.out(enc.lm(inputs_embeds=x, output_hidden_states=True).hidden_states[enc.layer + 1][:, -1])


def full_continuation(lens: LensModel, ids: torch.Tensor) -> torch.Tensor:
    prefix = lens.lm_prefix_ids
    with torch.no_grad():
        return lens.orig.lm(input_ids=torch.cat([prefix.expand(len(ids), -1), ids], 1)).logits[:, len(prefix) - 1:-1]


def full_score(lens: LensModel, A: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    dec = lens.decoder
    inputs = torch.cat([dec.prefix(A), dec.parts.embed_ids(ids[:, :-1])], 1)
    with dec._slot_patch(A, dec.slot):
        return dec.lm(inputs_embeds=inputs).logits[:, -ids.shape[1]:]


def full_st_total(lens: LensModel, batch: Batch, knobs: Knobs) -> torch.Tensor:
    cfg, lw = lens.cfg, lens.cfg.loss
    gen = lens.decoder.generate(batch.A, cfg.decoder.t_text, gumbel_keys(cfg.run.seed, batch.sample_ids),
                                tau=knobs.tau, use_cache=False)
    A_hat = full_encoder(lens, gen.embeds, batch.current_ids())
    target, patched = full_functional_logits(lens.orig.lm, lens.layer, batch.input_ids, batch.positions, A_hat)
    return (lw.mse_weight * losses.normalized_mse(batch.A, A_hat) + lw.kl_weight * losses.kl(target, patched)
            + lw.lm_weight * knobs.alpha * losses.fluency_kl(full_continuation(lens, gen.ids), gen.logits)
            - lw.entropy_weight * knobs.entropy_mult * losses.entropy(gen.logits).mean(-1))


def full_grpo_terms(lens: LensModel, batch: Batch) -> dict[str, torch.Tensor]:
    """The GRPO terms per sample, and the logged functional KL."""
    cfg, lw = lens.cfg, lens.cfg.loss
    B, G = len(batch.positions), lw.group_size
    A = batch.A.repeat_interleave(G, 0)
    keys = gumbel_keys(cfg.run.seed, batch.sample_ids.repeat_interleave(G), torch.arange(G).repeat(B))
    gen = lens.decoder.generate(A, cfg.decoder.t_text, keys, hard=True, temperature=lw.temperature, use_cache=False)
    A_hat = full_encoder(lens, gen.embeds, batch.current_ids().repeat_interleave(G))
    mse = losses.normalized_mse(A, A_hat)
    advantage = losses.group_advantage(-mse.detach().view(B, G)).view(-1)
    logp = losses.token_logprobs(full_score(lens, A, gen.ids), gen.ids)
    ref = losses.token_logprobs(full_continuation(lens, gen.ids), gen.ids)
    per_group = lambda x: x.view(B, G).mean(1)  # noqa: E731
    with torch.no_grad():
        kl = losses.kl(*full_functional_logits(lens.orig.lm, lens.layer, batch.input_ids, batch.positions,
                                                A_hat[torch.arange(B) * G]))
    return {"mse": per_group(mse), "policy": per_group(losses.policy_loss(logp, advantage)),
            "grpo_kl": per_group(losses.k3_kl(logp, ref)), "kl": kl}


def grads_of(lens: LensModel, total: torch.Tensor) -> dict[str, torch.Tensor]:
    lens.zero_grad(set_to_none=True)
    total.sum().backward(retain_graph=True)
    return {n: p.grad.clone() for n, p in lens.named_parameters() if p.grad is not None}


def assert_same_grads(fast: dict, full: dict) -> None:
    assert fast.keys() == full.keys()
    assert any(g.abs().sum() > 0 for g in full.values())
    bad = [n for n in full if not close(fast[n], full[n])]
    assert bad == [], bad


def ragged_batch(lens: LensModel, contexts: torch.Tensor) -> Batch:
    return Batch(contexts, POSITIONS, lens.orig.capture(contexts, LAYER, POSITIONS), sample_ids=torch.arange(4))


# --- the pieces -------------------------------------------------------------------------------------------------

def test_one_unpatched_pass_gives_the_target_logits_and_A(lm, contexts):
    run = Orig(lm).unpatched(contexts, LAYER, POSITIONS)
    full = lm(input_ids=contexts, output_hidden_states=True)
    rows = torch.arange(4)
    assert close(run.target, full.logits[rows, POSITIONS])
    assert close(run.A, full.hidden_states[LAYER + 1][rows, POSITIONS])
    assert run.kv[0][0].shape[2] == int(POSITIONS.max()) + 1  # cut after the last position needed


def test_unpatched_pass_cuts_each_group_of_rows_after_its_own_last_position(lm, contexts):
    """Rows run in groups of similar positions, so the pass reads fewer tokens than one forward cut at max(p)."""
    orig, seen = Orig(lm), []
    handle = orig.parts.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:2]))
    try:
        orig.unpatched(contexts, LAYER, POSITIONS)
    finally:
        handle.remove()
    # [0, 1] to position 1, [11] to 11, [23] to 23: 2 * 2 + 12 + 24 tokens instead of 4 * 24
    assert sorted(tuple(s) for s in seen) == [(1, 12), (1, 24), (2, 2)]


def test_single_position_patched_pass_equals_the_full_context_one_with_its_gradient(lm, contexts):
    orig = Orig(lm)
    run = orig.unpatched(contexts, LAYER, POSITIONS)
    new = (run.A + run.A.norm(dim=-1, keepdim=True) * torch.randn_like(run.A)).requires_grad_(True)
    fast = orig.patched(run, new)
    (fast_grad,) = torch.autograd.grad(losses.kl(run.target, fast).sum(), new)
    target, full = full_functional_logits(lm, LAYER, contexts, POSITIONS, new)
    (full_grad,) = torch.autograd.grad(losses.kl(target, full).sum(), new)
    assert (full - target).abs().max() > 1e-2  # the patch matters, so equality below means something
    assert close(fast, full) and close(fast_grad, full_grad)
    # the unpatched pass's cache is left as it was: a second patched pass over it gives the same logits
    assert torch.equal(orig.patched(run, new), fast)


def test_patched_pass_within_one_row_matches_row_by_row(lm, contexts):
    """Each row sees only its own past: the batch result equals running each row alone."""
    orig = Orig(lm)
    run = orig.unpatched(contexts, LAYER, POSITIONS)
    new = run.A.flip(0)
    batched = orig.patched(run, new)
    for b in range(4):
        alone = orig.patched(orig.unpatched(contexts[b:b + 1], LAYER, POSITIONS[b:b + 1]), new[b:b + 1])
        assert close(batched[b:b + 1], alone)


@pytest.mark.parametrize("patch_layers", [0, 2])
def test_shared_prompt_prefixes_keep_decoder_encoder_and_lm_scores_and_their_gradients(
        lm, tokenizer, contexts, patch_layers):
    lens = LensModel(lens_cfg(decoder={"patch_layers": patch_layers, "train_base": True},
                              encoder={"train_base": True}), lm, tokenizer, act_scale=0.5)
    A, keys = ragged_batch(lens, contexts).A, torch.arange(4) * 31
    current = contexts[torch.arange(4), POSITIONS]

    def run(fast: bool):
        """The left prompts computed once and broadcast (fast) vs. every row its whole sequence, every time."""
        gen = lens.decoder.generate(A, 4, keys, tau=0.8, use_cache=fast)
        A_hat = lens.encoder(gen.embeds, current) if fast else full_encoder(lens, gen.embeds, current)
        scores = lens.decoder.score(A, gen.ids) if fast else full_score(lens, A, gen.ids)
        return gen, (gen.logits.logsumexp(-1) + A_hat.pow(2).mean(-1, keepdim=True) + scores.logsumexp(-1)).sum()

    fast_gen, fast_total = run(True)
    fast = grads_of(lens, fast_total)
    full_gen, full_total = run(False)
    assert torch.equal(fast_gen.ids, full_gen.ids) and close(fast_gen.logits, full_gen.logits)
    assert close(fast_total, full_total)
    assert_same_grads(fast, grads_of(lens, full_total))
    assert fast["decoder.prompt_left"].abs().sum() > 0 and fast["encoder.prompt_left"].abs().sum() > 0
    # the LM's natural prefix, run once per batch
    ids = fast_gen.ids
    assert close(lens.orig.continuation_logits(lens.lm_prefix_ids, ids), full_continuation(lens, ids))


def test_encoder_with_nothing_per_row_but_the_learned_vector(lm, tokenizer):
    """Token-only baseline: no explanation, no current token and an encoder prompt ending at the slot."""
    lens = LensModel(lens_cfg(encoder={"prompt": "<bos>Text: <text>"}), lm, tokenizer)
    with torch.no_grad():
        lens.encoder.last.normal_()  # so the learned vector's place matters
    empty = torch.zeros(3, 0, lens.encoder.parts.d_model)
    assert close(lens.encoder(empty, None), full_encoder(lens, empty, None))


# --- the whole objective ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("train_base", [False, True])
def test_st_gumbel_losses_and_gradients_equal_the_full_context_computation(lm, tokenizer, contexts, train_base):
    cfg = lens_cfg(decoder={"train_base": train_base, "patch_layers": 2}, encoder={"train_base": train_base},
                   loss={"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 0.3, "entropy_weight": 0.1})
    lens = LensModel(cfg, lm, tokenizer, act_scale=0.5)
    batch, knobs = ragged_batch(lens, contexts), Knobs(tau=0.9, alpha=1.0)
    fast_total, terms, _ = lens_losses(lens, batch, knobs)
    fast = grads_of(lens, fast_total)
    full_total = full_st_total(lens, batch, knobs)
    assert terms["kl"].min() > 0
    assert close(fast_total, full_total)
    assert_same_grads(fast, grads_of(lens, full_total))


def test_grpo_losses_gradients_and_logged_kl_equal_the_full_context_computation(lm, tokenizer, contexts):
    cfg = lens_cfg(loss={"grpo_weight": 1.0, "mse_weight": 1.0, "kl_weight": 0.0, "lm_weight": 0.0,
                         "group_size": 3, "grpo_beta": 0.1},
                   decoder={"train_base": True}, encoder={"train_base": True})
    lens = LensModel(cfg, lm, tokenizer, act_scale=0.5)
    batch = ragged_batch(lens, contexts)
    fast, _, _ = lens_terms(lens, batch, Knobs())
    full = full_grpo_terms(lens, batch)
    for term in ("mse", "grpo_kl", "kl"):
        assert close(fast[term], full[term]), term
    for term in ("mse", "grpo_kl"):  # the encoder's and the decoder's own gradients
        assert_same_grads(grads_of(lens, fast[term]), grads_of(lens, full[term]))
    # The advantage divides reward gaps (about 1e-3 between members here) by the group's std, which magnifies
    # float rounding a few hundred times: the policy term agrees to that, not to 1e-5.
    assert (fast["policy"] - full["policy"]).abs().max() < 1e-3


@pytest.mark.parametrize("objective", [
    {"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 0.3},
    {"grpo_weight": 1.0, "mse_weight": 1.0, "kl_weight": 0.0, "lm_weight": 0.0, "group_size": 3, "grpo_beta": 0.1},
], ids=["st_gumbel", "grpo"])
def test_on_the_fly_batch_takes_A_from_the_objectives_own_unpatched_pass(lm, tokenizer, contexts, objective):
    """A batch without A (on the fly): the objective reads A off its one unpatched pass, and every term, gradient and
    the returned (A, A_hat) equal those of the same batch with A captured by a separate forward."""
    lens = LensModel(lens_cfg(loss=objective, decoder={"train_base": True}), lm, tokenizer, act_scale=0.5)
    captured = ragged_batch(lens, contexts)
    fast, weights, fast_explained = lens_terms(lens, Batch(contexts, POSITIONS, None, captured.sample_ids), Knobs())
    full, _, full_explained = lens_terms(lens, captured, Knobs())
    assert close(fast_explained.A, captured.A) and close(fast_explained.A_hat, full_explained.A_hat)
    # GRPO's policy term divides reward gaps by the group's std, which magnifies rounding (see the GRPO test above)
    loose = {"policy"}
    assert fast.keys() == full.keys()
    bad = [k for k in full if not close(fast[k], full[k]) and not (k in loose and (fast[k] - full[k]).abs().max() < 1e-3)]
    assert bad == [], [(k, float((fast[k] - full[k]).abs().max())) for k in bad]
    for term in (k for k, w in weights.items() if w != 0 and k not in loose):
        assert_same_grads(grads_of(lens, fast[term]), grads_of(lens, full[term]))
