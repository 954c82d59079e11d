"""The one resolver for the internals of any HF causal LM, and the hooks every model in `lens` is built from.

Nothing here knows a model family by name beyond where its block list lives: forwards are always the model's own,
steered by hooks (stop after block L, overwrite a block's output at some positions, keep only some positions'
logits). This is what makes GPT-2, Llama, Gemma-2 and Gemma-3 one code path.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

_BLOCK_LISTS = ("model.layers", "transformer.h", "model.language_model.layers", "gpt_neox.layers", "model.decoder.layers")


@dataclass
class LMParts:
    """Handles on the pieces of a causal LM that the lens needs."""

    lm: nn.Module
    blocks: nn.ModuleList
    embed: nn.Embedding
    lm_head: nn.Module
    embed_scale: float
    """Factor the embedding module applies to weight rows (Gemma: sqrt(d)); 1.0 for most models."""
    cache_kwarg: str
    """Name of the forward's KV-cache argument (`cache` in recent transformers, `past_key_values` before)."""

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embed.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.embed.weight.shape[0]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids, exactly as the model's own embedding module makes them."""
        return self.embed(ids)

    def embed_soft(self, weights: torch.Tensor) -> torch.Tensor:
        """Input embeddings of distributions over the vocabulary (..., V) -> (..., d), e.g. straight-through one-hots.

        Matches `embed_ids` on one-hots, including Gemma's scale inside its embedding module."""
        w = self.embed.weight
        return (weights.to(w.dtype) @ w) * self.embed_scale


def resolve(lm: nn.Module) -> LMParts:
    """Find blocks, embeddings and LM head of a HF causal LM."""
    for path in _BLOCK_LISTS:
        node = lm
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            embed = lm.get_input_embeddings()
            scale = getattr(embed, "embed_scale", None)
            params = inspect.signature(lm.forward).parameters
            return LMParts(lm=lm, blocks=node, embed=embed, lm_head=lm.get_output_embeddings(),
                           embed_scale=1.0 if scale is None else float(scale),
                           cache_kwarg="cache" if "cache" in params else "past_key_values")
    raise NotImplementedError(f"cannot find the decoder blocks of {type(lm).__name__}; looked for "
                              f"{', '.join(_BLOCK_LISTS)}")


class _StopForward(Exception):
    def __init__(self, hidden: torch.Tensor):
        self.hidden = hidden


def _hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden: torch.Tensor):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _hook(handle) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


def run_to_block(parts: LMParts, layer: int, **forward_kwargs) -> torch.Tensor:
    """Run the model's own forward but stop right after block `layer`; return its output (B, S, d).

    Equals `output_hidden_states[layer + 1]` of a full forward, at a fraction of the cost (no upper blocks, no
    LM head). Gradients flow as usual."""

    def stop(module, args, output):
        raise _StopForward(_hidden_of(output))

    with _hook(parts.blocks[layer].register_forward_hook(stop)):
        try:
            parts.lm(**forward_kwargs, use_cache=False)
        except _StopForward as done:
            return done.hidden
    raise RuntimeError(f"block {layer} never ran")  # internal invariant: the hook always fires


@contextmanager
def replace_block_output(parts: LMParts, layer: int, positions: torch.Tensor, values: torch.Tensor):
    """While active, block `layer`'s output at (row b, positions[b]) is replaced by values[b] (B, d).

    Out of place, so gradients flow into `values`."""
    rows = torch.arange(values.shape[0], device=values.device)

    def patch(module, args, output):
        hidden = _hidden_of(output).clone()
        hidden[rows, positions] = values.to(hidden.dtype)
        return _with_hidden(output, hidden)

    with _hook(parts.blocks[layer].register_forward_hook(patch)):
        yield


@contextmanager
def before_blocks(parts: LMParts, n: int, fn: Callable[[int, torch.Tensor], torch.Tensor]):
    """While active, the residual entering each of the first `n` blocks is replaced by fn(i, hidden)."""
    handles = []
    for i in range(n):
        def pre(module, args, kwargs, i=i):
            if args:
                return (fn(i, args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(i, kwargs["hidden_states"])}

        handles.append(parts.blocks[i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def logits_at(parts: LMParts, positions: torch.Tensor):
    """While active, the LM head sees only position positions[b] of row b: logits come out as (B, 1, V).

    Saves the (B, S, V) logits a full forward would make; softcapping etc. after the head still apply."""
    rows = torch.arange(positions.shape[0], device=positions.device)

    def gather(module, args):
        return (args[0][rows, positions].unsqueeze(1),) + tuple(args[1:])

    with _hook(parts.lm_head.register_forward_pre_hook(gather)):
        yield
