"""`lens explain`: what a trained lens says about every token of a text, and how well that explanation holds up.

The text is tokenized the way training contexts are built (`lens.data.corpus.tokenize`: BOS, when the tokenizer
has one, then the text's tokens) into one context. Training explains positions from `first_real_token + data.min_pos`
on, so earlier positions (BOS and the first `min_pos` tokens) are shown but not explained; positions at or past
`data.seq_len` are explained but flagged, since no training context was that long.

Each explained token gets the training-style forward of the lens (`lens.objective.reconstruct`, as
`lens.evaluate.lens_predictions` runs it), keyed like a sample whose id is the token's position: explanation
`member` m uses `gumbel_keys(run.seed, position, m)`. So the result is a pure function of (checkpoint, text, K),
and candidate 0 of best-of-K is exactly the K=1 explanation, which makes best-of-K never worse than K=1.

Scores per token, all of the kept explanation:
- `nmse`: ||A - A_hat||^2 / ||A||^2 (`lens.losses.normalized_mse`), the per-sample term training minimises.
- `recovered`: 1 - nmse, the share of ||A||^2 the reconstruction accounts for. The held-out "variance recovered"
  of `lens eval` measures the error against each dimension's mean over many activations; one vector has no such
  mean, so this is measured from zero instead. Residual streams have a large shared mean, so even the mean
  activation would score well here: compare tokens with each other, not with `lens eval`'s number.
- `kl`: KL(orig's next-token distribution with A || with A_hat patched in at (model.layer, position)).
- `salience[t]`: how much nmse rises when explanation token t is blanked (its input embedding set to zero, the
  other tokens kept in place) and the explanation is re-encoded. Positive: the encoder used that token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lens import losses
from lens.data.corpus import first_real_token
from lens.errors import InputError
from lens.inference import LoadedLens
from lens.models.lens_model import LensModel
from lens.evaluate import functional_kls, lens_predictions
from lens.objective import Batch


@dataclass
class TokenExplanation:
    """The lens on one position of the text."""

    position: int
    """Column in the context (BOS, when there is one, is column 0)."""
    token: str
    explanation: str
    """The decoded explanation."""
    explanation_ids: list[int]
    """Its `t_text` token ids."""
    explanation_tokens: list[str]
    """Each explanation token decoded on its own (what `salience` scores, one to one)."""
    nmse: float
    recovered: float
    """1 - nmse: share of ||A||^2 recovered, measured from zero (see the module docstring)."""
    kl: float
    salience: list[float]
    """Per explanation token: nmse with that token blanked minus `nmse`."""
    member: int
    """Which of the best-of-K candidates was kept (0 is the K=1 explanation)."""
    beyond_training_context: bool
    """At or past `data.seq_len`: no training context was this long."""


@dataclass
class TextExplanation:
    """Everything `lens explain` reports about one text."""

    checkpoint: str
    step: int
    model: str
    layer: int
    best_of: int
    tokens: list[str]
    """Every token of the context, the unexplained ones included."""
    first_explained: int
    """Columns before this one are not explained (training never explains them)."""
    train_seq_len: int
    records: list[TokenExplanation]
    """One per column from `first_explained` on."""


def check_request(text: str, best_of: int) -> None:
    """Reject arguments that cannot work before anything is loaded."""
    if not text.strip():
        raise InputError("text: empty (or only whitespace); give the text whose tokens the lens should explain")
    if best_of < 1:
        raise InputError(f"--best-of: {best_of} is invalid; expected an integer >= 1 (explanations sampled per token)")


def context_ids(lens: LoadedLens, text: str) -> torch.Tensor:
    """(S,) ids of the text as a training context: BOS (when the tokenizer has one), then the text's tokens.
    Raises InputError when the model cannot read that many positions or none of them would be explained."""
    tokenizer, data = lens.model.tokenizer, lens.cfg.data
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    first = first_real_token(tokenizer)
    ids = [tokenizer.bos_token_id] * first + ids
    limit = getattr(lens.model.orig.lm.config, "max_position_embeddings", None)
    if limit is not None and len(ids) > limit:
        raise InputError(f"text: {len(ids)} tokens is too long for {lens.cfg.model.name}, which reads at most "
                         f"{limit} positions; give a shorter text")
    if len(ids) <= first + data.min_pos:
        raise InputError(f"text: {len(ids) - first} tokens is too short; training explains no token among the first "
                         f"data.min_pos={data.min_pos}, so give a longer text")
    return torch.tensor(ids, dtype=torch.int64, device=lens.device)


def _chunked(fn: Callable[..., torch.Tensor], size: int, *rows: torch.Tensor) -> torch.Tensor:
    """`fn` over consecutive slices of `size` rows, concatenated: the micro-batching of `lens_predictions`, so each
    forward is as big as the run's own (and a candidate's numbers do not depend on how many candidates there are)."""
    return torch.cat([fn(*(r[i:i + size] for r in rows)) for i in range(0, len(rows[0]), size)])


def best_explanations(model: LensModel, batch: Batch, k: int, size: int) -> tuple[torch.Tensor, ...]:
    """(A_hat, ids, embeds, member (N,)) of the lowest-nmse of `k` explanations per sample (ties: the lower member,
    so K=1's explanation is kept unless another one is strictly better)."""
    cands = [lens_predictions(model, batch, size, member=m) for m in range(k)]
    nmse = torch.stack([losses.normalized_mse(batch.A, A_hat) for A_hat, _, _ in cands])  # (k, N)
    member = nmse.argmin(0)
    rows = torch.arange(len(member), device=member.device)
    A_hat, ids, embeds = (torch.stack(parts)[member, rows] for parts in zip(*cands))
    return A_hat, ids, embeds, member


def salience(model: LensModel, A: torch.Tensor, embeds: torch.Tensor, current: torch.Tensor,
             size: int) -> torch.Tensor:
    """(N, T): nmse with explanation token t blanked minus nmse with none blanked.

    Blanking sets the token's input embedding to zero: its content is gone while the other tokens keep their
    positions (deleting it would shift them; a pad or space token would put a real token with its own meaning in
    its place, and many tokenizers have no pad)."""
    N, T, _ = embeds.shape
    blanked = embeds.repeat_interleave(T, 0)  # row n*T + t: explanation n with token t blanked
    blanked[torch.arange(N * T, device=embeds.device), torch.arange(T, device=embeds.device).repeat(N)] = 0
    base = losses.normalized_mse(A, _chunked(model.encoder, size, embeds, current))
    A_blank = _chunked(model.encoder, size, blanked, current.repeat_interleave(T))
    return losses.normalized_mse(A.repeat_interleave(T, 0), A_blank).view(N, T) - base.unsqueeze(1)


@torch.no_grad()
def explain(lens: LoadedLens, text: str, best_of: int = 1) -> TextExplanation:
    """The lens's explanation of every position of `text` training could have drawn, its scores and its tokens'
    salience; K = `best_of` explanations are sampled per token and the lowest-nmse one is kept."""
    check_request(text, best_of)
    model, cfg, tokenizer = lens.model, lens.cfg, lens.model.tokenizer
    size = cfg.train.micro_batch_size
    ctx = context_ids(lens, text)
    first = first_real_token(tokenizer) + cfg.data.min_pos
    positions = torch.arange(first, len(ctx), device=lens.device)
    ids = ctx.expand(len(positions), -1)
    A = _chunked(lambda i, p: model.orig.capture(i, model.layer, p), size, ids, positions)
    batch = Batch(ids, positions, A, sample_ids=positions)  # a token's randomness is keyed by its position
    A_hat, expl_ids, embeds, member = best_explanations(model, batch, best_of, size)
    nmse = losses.normalized_mse(A, A_hat)
    scores = zip(positions.tolist(), expl_ids.tolist(), nmse.tolist(),
                 # Rounding can leave a near-zero KL a hair below 0; it is a divergence, so report it as >= 0.
                 functional_kls(model, batch, {"lens": A_hat}, size)["lens"].clamp_min(0).tolist(),
                 salience(model, A, embeds, batch.current_ids(), size).tolist(), member.tolist())
    records = [_record(tokenizer, int(ctx[p]), p, *rest, beyond=p >= cfg.data.seq_len) for p, *rest in scores]
    return TextExplanation(checkpoint=lens.checkpoint.uri, step=lens.checkpoint.step, model=cfg.model.name,
                           layer=cfg.model.layer, best_of=best_of, tokens=[tokenizer.decode([i]) for i in ctx.tolist()],
                           first_explained=first, train_seq_len=cfg.data.seq_len, records=records)


def _record(tokenizer, token_id: int, position: int, expl_ids: list[int], nmse: float, kl: float,
            sal: list[float], member: int, beyond: bool) -> TokenExplanation:
    return TokenExplanation(position=position, token=tokenizer.decode([token_id]),
                            explanation=tokenizer.decode(expl_ids), explanation_ids=expl_ids,
                            explanation_tokens=[tokenizer.decode([t]) for t in expl_ids], nmse=nmse,
                            recovered=1 - nmse, kl=kl, salience=sal, member=member, beyond_training_context=beyond)
