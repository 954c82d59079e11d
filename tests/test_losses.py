"""Every function of `lens.losses` against values computed by hand or by an independent formula, and the weighting
of the terms in `lens.objective` against its definition (ALGORITHM.md §2): a flipped sign, a swapped argument or a
wrong weight makes one of these fail."""

from __future__ import annotations

import math

import pytest
import torch

from lens import losses
from lens.models.lens_model import LensModel
from lens.objective import Knobs, gumbel_keys, lens_losses, lens_terms
from test_models import lens_cfg, make_batch

LN3 = math.log(3.0)
P = [0.25, 0.75]  # softmax([0, ln 3])
Q = [0.5, 0.5]  # softmax([0, 0])


def _kl_by_hand(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_normalized_mse_by_hand():
    A = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    A_hat = torch.tensor([[0.0, 4.0], [0.0, 1.0]])
    assert losses.normalized_mse(A, A_hat).tolist() == pytest.approx([9 / 25, 2.0])
    assert losses.normalized_mse(A, A).tolist() == [0.0, 0.0]
    assert losses.normalized_mse(A, torch.zeros_like(A)).tolist() == pytest.approx([1.0, 1.0])
    # normalised by ||A||, not ||A_hat||: the arguments are not interchangeable
    assert float(losses.normalized_mse(A_hat[:1], A[:1])) == pytest.approx(9 / 16)


def test_kl_direction_by_hand():
    p_logits, q_logits = torch.tensor([0.0, LN3]), torch.tensor([0.0, 0.0])
    assert float(losses.kl(p_logits, q_logits)) == pytest.approx(_kl_by_hand(P, Q), rel=1e-6)  # 0.1308
    assert float(losses.kl(q_logits, p_logits)) == pytest.approx(_kl_by_hand(Q, P), rel=1e-6)  # 0.1438
    assert float(losses.kl(p_logits, p_logits + 5.0)) == pytest.approx(0.0, abs=1e-7)  # logits are shift-free
    # batched over leading dims, reduced over the last one only
    batched = losses.kl(torch.stack([p_logits, q_logits]).expand(3, 2, 2), torch.stack([q_logits, p_logits]))
    assert batched.shape == (3, 2)
    assert batched[0].tolist() == pytest.approx([_kl_by_hand(P, Q), _kl_by_hand(Q, P)], rel=1e-6)


def test_fluency_kl_is_kl_of_lm_to_decoder_averaged_over_positions():
    lm = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])  # (B=1, T=2, V=2): P, Q
    dec = torch.tensor([[[0.0, 0.0], [0.0, LN3]]])  # Q, P
    expected = (_kl_by_hand(P, Q) + _kl_by_hand(Q, P)) / 2
    assert losses.fluency_kl(lm, dec).tolist() == pytest.approx([expected], rel=1e-6)
    lm_one = torch.tensor([[[0.0, LN3], [0.0, LN3]]])
    dec_one = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    assert float(losses.fluency_kl(lm_one, dec_one)) == pytest.approx(_kl_by_hand(P, Q), rel=1e-6)  # not KL(Q||P)


def test_entropy_by_hand():
    assert float(losses.entropy(torch.zeros(4))) == pytest.approx(math.log(4))
    assert float(losses.entropy(torch.tensor([0.0, LN3]))) == pytest.approx(-sum(p * math.log(p) for p in P))
    assert float(losses.entropy(torch.tensor([100.0, 0.0, 0.0]))) == pytest.approx(0.0, abs=1e-6)


def test_token_logprobs_pick_the_named_tokens():
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])
    assert losses.token_logprobs(logits, torch.tensor([[1, 0]]))[0].tolist() == pytest.approx(
        [math.log(0.75), math.log(0.5)])
    assert losses.token_logprobs(logits, torch.tensor([[0, 1]]))[0].tolist() == pytest.approx(
        [math.log(0.25), math.log(0.5)])


def test_group_advantage_by_hand_with_ties_and_constant_groups():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                            [1.0, 1.0, 3.0, 3.0],  # ties get equal advantages
                            [2.0, 2.0, 2.0, 2.0],  # a constant group teaches nothing: zeros, not NaN
                            [-5.0, 0.0, 0.0, 0.0]])
    adv = losses.group_advantage(rewards)
    std = math.sqrt(1.25)  # population std of 1..4
    assert adv[0].tolist() == pytest.approx([-1.5 / std, -0.5 / std, 0.5 / std, 1.5 / std], rel=1e-5)
    assert adv[1].tolist() == pytest.approx([-1.0, -1.0, 1.0, 1.0], rel=1e-5)
    assert adv[2].tolist() == [0.0, 0.0, 0.0, 0.0]
    # per group: the best member gets the largest advantage; each group sums to 0 with unit population variance
    std3 = math.sqrt(((-5 + 1.25) ** 2 + 3 * 1.25 ** 2) / 4)
    assert adv[3].tolist() == pytest.approx([-3.75 / std3] + [1.25 / std3] * 3, rel=1e-5)
    assert adv.sum(-1).abs().max() < 1e-5
    assert adv[[0, 1, 3]].pow(2).mean(-1).tolist() == pytest.approx([1.0, 1.0, 1.0], rel=1e-4)


def test_policy_loss_sign_raises_the_log_prob_of_advantaged_tokens():
    logprobs = torch.tensor([[-1.0, -3.0], [-0.5, -0.5]], requires_grad=True)
    advantage = torch.tensor([2.0, -1.0])
    loss = losses.policy_loss(logprobs, advantage)
    assert loss.tolist() == pytest.approx([4.0, -0.5])  # -mean_t(logp_t * adv)
    loss.sum().backward()
    # gradient descent moves logp along -grad = +adv / T: up for a positive advantage, down for a negative one
    assert logprobs.grad.flatten().tolist() == pytest.approx([-1.0, -1.0, 0.5, 0.5])


def test_k3_by_hand_and_unbiased_for_kl_policy_to_ref():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    r = math.log(0.25 / 0.5)  # log(ref / policy)
    assert float(losses.k3_kl(logp, ref)) == pytest.approx(math.exp(r) - r - 1, rel=1e-6)  # 0.1931, not 0.3069
    assert float(losses.k3_kl(logp, logp)) == 0.0
    assert float(losses.k3_kl(ref, logp)) > 0  # >= 0 whatever the sample
    # averaged over tokens sampled from the policy it estimates KL(policy || ref), not KL(ref || policy)
    gen = torch.Generator().manual_seed(0)
    policy = torch.tensor([0.7, 0.2, 0.08, 0.02])
    reference = torch.tensor([0.25, 0.25, 0.25, 0.25])
    tokens = torch.multinomial(policy, 400_000, replacement=True, generator=gen)
    estimate = float(losses.k3_kl(policy.log()[tokens][None], reference.log()[tokens][None]))
    forward, backward = _kl_by_hand(policy.tolist(), reference.tolist()), _kl_by_hand(reference.tolist(),
                                                                                        policy.tolist())
    assert abs(forward - backward) > 0.1
    assert estimate == pytest.approx(forward, rel=0.02)


# ------------------------------------------------------------------------------------------------ the weighting

WEIGHTS = {"mse_weight": 0.7, "kl_weight": 1.3, "lm_weight": 0.4, "entropy_weight": 0.2}


@pytest.mark.parametrize("family", ["llama"])
def test_straight_through_total_is_the_documented_weighted_sum(lm, tokenizer, contexts):
    with torch.no_grad():  # a sharper LM head: the fluency KL of a fresh decoder is then far from 0, so its weight shows
        lm.lm_head.weight.mul_(10.0)
    lens = LensModel(lens_cfg(loss=WEIGHTS), lm, tokenizer)
    knobs = Knobs(tau=1.0, alpha=0.5, entropy_mult=3.0)
    total, terms, _ = lens_losses(lens, make_batch(lens, contexts), knobs)
    w = WEIGHTS
    expected = (w["mse_weight"] * terms["mse"] + w["kl_weight"] * terms["kl"] + w["lm_weight"] * 0.5 * terms["lm"]
                - w["entropy_weight"] * 3.0 * terms["entropy"])  # entropy is a bonus
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-6)
    assert all(float(terms[k].min()) > 1e-3 for k in ("mse", "kl", "lm", "entropy"))


@pytest.mark.parametrize("family", ["llama"])
def test_grpo_total_is_the_documented_weighted_sum(lm, tokenizer, contexts):
    cfg = lens_cfg(loss={"grpo_weight": 1.5, "mse_weight": 0.8, "grpo_beta": 0.3, "group_size": 4,
                         "kl_weight": 0.0, "lm_weight": 0.0})
    lens = LensModel(cfg, lm, tokenizer)
    total, terms, _ = lens_losses(lens, make_batch(lens, contexts), Knobs())
    expected = 0.8 * terms["mse"] + 1.5 * terms["policy"] + 0.3 * terms["grpo_kl"]
    assert torch.allclose(total, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(terms["reward"], -terms["mse"], atol=1e-6)


@pytest.mark.parametrize("family", ["llama"])
def test_entropy_cap_clamps_the_bonus_into_a_floor(lm, tokenizer, contexts):
    cap = 0.05  # far below the entropy of a fresh decoder over a 300-token vocabulary
    only_entropy = {"mse_weight": 0.0, "kl_weight": 1.0, "lm_weight": 0.0, "entropy_weight": 1.0}
    free = LensModel(lens_cfg(loss=only_entropy), lm, tokenizer)
    batch = make_batch(free, contexts)
    values, weights, _ = lens_terms(free, batch, Knobs())
    assert float(values["entropy"].min()) > cap and weights["entropy"] == -1.0
    capped = LensModel(lens_cfg(loss={**only_entropy, "entropy_cap": cap}), lm, tokenizer)
    capped.load_state_dict(free.state_dict())
    values, _, _ = lens_terms(capped, batch, Knobs())
    assert values["entropy"].tolist() == pytest.approx([cap] * 4)
    # above the cap the bonus pushes nothing: no gradient reaches the decoder through it
    values["entropy"].sum().backward()
    grads = [p.grad for p in capped.decoder.parameters() if p.requires_grad]
    assert grads and all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    values, _, _ = lens_terms(free, batch, Knobs())
    values["entropy"].sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in free.decoder.parameters())


def _descend(lens: LensModel, batch, step: float) -> None:
    """One plain gradient step of length `step` on the objective (normalised, so a first-order decrease holds
    whatever the term's scale)."""
    params = [p for p in lens.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    lens_losses(lens, batch, Knobs())[0].sum().backward()
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= step * p.grad / norm


@pytest.mark.parametrize("family", ["llama"])
@pytest.mark.parametrize("term", ["mse", "kl", "lm", "entropy"])
def test_a_step_on_one_term_moves_it_the_right_way(lm, tokenizer, contexts, term):
    """Minimising the objective lowers MSE, functional KL and fluency KL and raises the entropy (a bonus)."""
    # a reconstruction term is required; a tiny one keeps the config valid without steering the step
    weights = {"mse_weight": 1e-6, "kl_weight": 0.0, "lm_weight": 0.0, "entropy_weight": 0.0, f"{term}_weight": 1.0}
    lens = LensModel(lens_cfg(loss=weights), lm, tokenizer)
    batch = make_batch(lens, contexts)
    before = float(lens_terms(lens, batch, Knobs())[0][term].mean().detach())
    _descend(lens, batch, step=1e-3)
    after = float(lens_terms(lens, batch, Knobs())[0][term].mean().detach())
    assert (after > before) if term == "entropy" else (after < before), (term, before, after)


@pytest.mark.parametrize("family", ["llama"])
def test_a_grpo_step_favours_the_group_members_with_the_lowest_mse(lm, tokenizer, contexts):
    """The policy term (reward = -MSE, group advantage, policy-loss sign together) raises the log-probability of the
    explanations that reconstructed best and lowers that of the worst, for the same sampled explanations."""
    G = 4
    cfg = lens_cfg(loss={"grpo_weight": 1.0, "mse_weight": 1e-6, "grpo_beta": 0.0, "group_size": G, "kl_weight": 0.0,
                         "lm_weight": 0.0})
    lens = LensModel(cfg, lm, tokenizer)
    batch = make_batch(lens, contexts)
    B = len(batch.positions)
    A = batch.A.repeat_interleave(G, 0)
    keys = gumbel_keys(cfg.run.seed, batch.sample_ids.repeat_interleave(G), torch.arange(G).repeat(B))

    def sampled():
        with torch.no_grad():
            gen = lens.decoder.generate(A, cfg.decoder.t_text, keys, hard=True, temperature=cfg.loss.temperature)
            mse = losses.normalized_mse(A, lens.encoder(gen.embeds, batch.current_ids().repeat_interleave(G)))
            logp = losses.token_logprobs(lens.decoder.score(A, gen.ids), gen.ids).sum(-1)
        return gen.ids, mse.view(B, G), logp.view(B, G)

    ids, mse, logp_before = sampled()
    _descend(lens, batch, step=1e-3)
    ids_after, _, logp_after = sampled()
    same = (ids_after.view(B, G, -1) == ids.view(B, G, -1)).all(-1).all(-1)  # groups whose samples did not change
    assert same.sum() >= 2
    rise = (logp_after - logp_before)[same]
    best, worst = mse[same].argmin(-1), mse[same].argmax(-1)
    rows = torch.arange(int(same.sum()))
    assert (rise[rows, best] > rise[rows, worst]).all()
    # and the advantage-weighted log-probability (what the step maximises) went up
    adv = losses.group_advantage(-mse[same])
    assert float((adv * rise).sum()) > 0
