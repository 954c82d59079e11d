"""The lens core on tiny real models of every family: embeddings, capture, patching, generation, gradients."""

from __future__ import annotations

import pytest
import torch

from lens import losses
from lens.config import from_dictconfig
from lens.models.blocks import resolve, run_to_block
from lens.models.lens_model import LensModel
from lens.objective import Batch, Knobs, lens_losses, lens_terms

LAYER = 2


def lens_cfg(**sections):
    base = {"model": {"layer": LAYER}, "decoder": {"t_text": 4}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return from_dictconfig(base)


def make_batch(lens: LensModel, contexts: torch.Tensor) -> Batch:
    positions = torch.tensor([5, 9, 17, 23])
    A = lens.orig.capture(contexts, LAYER, positions)
    return Batch(contexts, positions, A, sample_ids=torch.arange(4))


def test_embedding_helper_reproduces_the_models_own_embeddings(lm, contexts):
    parts = resolve(lm)
    ref = lm(input_ids=contexts).logits
    assert torch.allclose(lm(inputs_embeds=parts.embed_ids(contexts)).logits, ref, atol=1e-5)


def test_straight_through_embeddings_are_the_samples_with_the_soft_gradient(lm, contexts):
    """Value: the sampled tokens' embeddings; gradients (into the distribution and, for a trainable base, into the
    matrix) those of embedding `one_hot - soft.detach() + soft` through the matrix, written out here."""
    parts = resolve(lm)
    weight = parts.embed.weight
    weight.requires_grad_(True)  # a trainable base: the matrix gets its gradient too (a fresh model per test)
    logits = torch.randn(*contexts.shape, parts.vocab_size)
    soft = torch.softmax(logits, -1).requires_grad_(True)
    ids = soft.argmax(-1)
    direction = torch.randn(*contexts.shape, parts.d_model)
    got = parts.embed_straight_through(ids, soft)
    assert torch.equal(got, parts.embed_ids(ids))
    got_soft, got_w = torch.autograd.grad((got * direction).sum(), [soft, weight])
    one_hot = torch.nn.functional.one_hot(ids, parts.vocab_size).float()
    ref = ((one_hot - soft.detach() + soft) @ weight) * parts.embed_scale
    ref_soft, ref_w = torch.autograd.grad((ref * direction).sum(), [soft, weight])
    assert torch.allclose(got_soft, ref_soft, atol=1e-5) and got_soft.abs().max() > 0
    assert torch.allclose(got_w, ref_w, atol=1e-5) and got_w.abs().max() > 0


def test_gemma_embedding_scale_is_found(family, lm):
    scale = resolve(lm).embed_scale
    assert scale == (pytest.approx(32 ** 0.5) if family.startswith("gemma") else 1.0)


@pytest.mark.parametrize("layer", [0, 1, 2])  # HF's hidden_states[-1] is after the final norm, so stop below it
def test_early_exit_capture_equals_full_forward_hidden_state(lm, contexts, layer):
    parts = resolve(lm)
    full = lm(input_ids=contexts, output_hidden_states=True).hidden_states[layer + 1]
    assert torch.allclose(run_to_block(parts, layer, input_ids=contexts), full, atol=1e-6)
    from lens.models.orig import Orig

    positions = torch.tensor([3, 0, 23, 11])
    A = Orig(lm).capture(contexts, layer, positions)
    assert torch.allclose(A, full[torch.arange(4), positions], atol=1e-6)


def test_patching_A_with_itself_and_truncation_keep_the_logits(lm, contexts):
    from lens.models.orig import Orig

    orig = Orig(lm)
    positions = torch.tensor([4, 10, 23, 15])
    full = lm(input_ids=contexts).logits[torch.arange(4), positions]
    unpatched = orig.patched_logits(contexts, LAYER, positions, None)  # context truncated to max(p) + 1
    assert torch.allclose(unpatched, full, atol=1e-5)
    A = orig.capture(contexts, LAYER, positions)
    assert torch.allclose(orig.patched_logits(contexts, LAYER, positions, A), full, atol=1e-5)
    # a different activation changes them, and only through the patched position
    other = orig.patched_logits(contexts, LAYER, positions, torch.randn_like(A) * A.norm(dim=-1, keepdim=True))
    assert (other - full).abs().max() > 1e-3


def test_gradients_flow_through_the_frozen_model_into_the_patched_activation(lm, contexts):
    from lens.models.orig import Orig

    orig = Orig(lm)
    positions = torch.tensor([4, 10, 23, 15])
    A = orig.capture(contexts, LAYER, positions)
    new = (A + 0.1 * torch.randn_like(A)).requires_grad_(True)
    losses.kl(orig.patched_logits(contexts, LAYER, positions, None),
              orig.patched_logits(contexts, LAYER, positions, new)).sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    assert all(p.grad is None for p in lm.parameters())


@pytest.mark.parametrize("patch_layers", [0, 2])
@pytest.mark.parametrize("hard", [False, True])
def test_kv_cached_generation_equals_uncached(lm, tokenizer, contexts, patch_layers, hard):
    lens = LensModel(lens_cfg(decoder={"patch_layers": patch_layers, "t_text": 6}), lm, tokenizer, act_scale=0.5)
    A = make_batch(lens, contexts).A
    keys = torch.arange(4) * 7919
    cached = lens.decoder.generate(A, 6, keys, tau=0.7, hard=hard, use_cache=True)
    uncached = lens.decoder.generate(A, 6, keys, tau=0.7, hard=hard, use_cache=False)
    assert torch.equal(cached.ids, uncached.ids)
    assert torch.allclose(cached.embeds, uncached.embeds, atol=1e-5)
    assert torch.allclose(cached.logits, uncached.logits, atol=1e-5)
    # the scorer (teacher forcing) reproduces the generation logits
    assert torch.allclose(lens.decoder.score(A, cached.ids), cached.logits, atol=1e-5)
    # and generation depends on A and on the keys
    assert not torch.equal(lens.decoder.generate(A, 6, keys + 1, hard=hard).ids, cached.ids)


def test_slot_patching_changes_the_decoder(lm, tokenizer, contexts):
    plain = LensModel(lens_cfg(), lm, tokenizer)
    patched = LensModel(lens_cfg(decoder={"patch_layers": 2, "per_layer_proj": True}), lm, tokenizer)
    with torch.no_grad():
        for proj in patched.decoder.layer_proj:
            proj.weight.add_(torch.randn_like(proj.weight))  # a new direction: norms hide a rescale
    A = make_batch(plain, contexts).A
    keys = torch.arange(4)
    a = plain.decoder.generate(A, 4, keys).logits
    b = patched.decoder.generate(A, 4, keys).logits
    assert (a - b).abs().max() > 1e-4


def test_gumbel_noise_depends_on_the_sample_not_the_batch(lm, tokenizer, contexts):
    lens = LensModel(lens_cfg(), lm, tokenizer)
    A = make_batch(lens, contexts).A
    keys = torch.tensor([11, 22, 33, 44])
    whole = lens.decoder.generate(A, 4, keys, hard=True)
    halves = [lens.decoder.generate(A[i:i + 2], 4, keys[i:i + 2], hard=True) for i in (0, 2)]
    assert torch.equal(whole.ids, torch.cat([h.ids for h in halves]))


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("train_base", [False, True])
def test_st_gumbel_objective_reaches_every_trainable_parameter(lm, tokenizer, contexts, train_base):
    cfg = lens_cfg(decoder={"train_base": train_base, "patch_layers": 2},
                   encoder={"train_base": train_base},
                   loss={"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 1.0, "entropy_weight": 0.1})
    lens = LensModel(cfg, lm, tokenizer, act_scale=0.5)
    total, terms, _ = lens_losses(lens, make_batch(lens, contexts), Knobs(tau=1.0, alpha=1.0))
    assert set(terms) == {"mse", "kl", "lm", "entropy"} and total.shape == (4,)
    total.mean().backward()
    grads = _grads(lens)
    assert grads, "the lens has trainable parameters"
    dead = [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    # The base LM's last block / final norm of the *encoder* are never used (early exit), so they get no gradient.
    dead = [n for n in dead if not n.startswith("encoder.lm.")]
    assert dead == []
    assert all(p.grad is None for p in lens.orig.lm.parameters())  # frozen, shared or not


def test_weight_zero_terms_are_logged_without_gradient(lm, tokenizer, contexts):
    cfg = lens_cfg(loss={"mse_weight": 1.0, "kl_weight": 0.0, "lm_weight": 0.0})
    lens = LensModel(cfg, lm, tokenizer)
    total, terms, _ = lens_losses(lens, make_batch(lens, contexts), Knobs())
    assert set(terms) == {"mse", "kl", "lm", "entropy"}
    assert all(torch.isfinite(v).all() for v in terms.values())
    assert torch.allclose(total, terms["mse"])


def test_grpo_decoder_learns_only_from_policy_and_encoder_only_from_mse(lm, tokenizer, contexts):
    cfg = lens_cfg(loss={"grpo_weight": 1.0, "mse_weight": 1.0, "kl_weight": 0.0, "lm_weight": 0.0,
                         "group_size": 3, "grpo_beta": 0.1},
                   decoder={"train_base": True}, encoder={"train_base": True})
    lens = LensModel(cfg, lm, tokenizer)
    batch = make_batch(lens, contexts)
    total, logged, _ = lens_losses(lens, batch, Knobs())
    assert {"mse", "kl", "policy", "reward", "grpo_kl", "entropy"} == set(logged) and total.shape == (4,)
    for term, expect in (("policy", (True, False)), ("grpo_kl", (True, False)), ("mse", (False, True))):
        lens.zero_grad(set_to_none=True)
        values, weights, _ = lens_terms(lens, batch, Knobs())
        values[term].sum().backward()
        hit = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
        assert (hit(lens.decoder), hit(lens.encoder)) == expect, term
    # the full objective reaches every decoder parameter used (through the policy) and the encoder (through MSE)
    lens.zero_grad(set_to_none=True)
    lens_losses(lens, batch, Knobs())[0].sum().backward()
    dead = [n for n, g in _grads(lens.decoder).items() if g is None or g.abs().sum() == 0]
    assert dead == []
