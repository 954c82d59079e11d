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
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

_BLOCK_LISTS = ("model.layers", "transformer.h", "model.language_model.layers", "gpt_neox.layers",
                "model.decoder.layers")


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

    def embed_straight_through(self, ids: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """Straight-through embeddings: the forward value is `embed_ids(ids)` (the one-hot sample's embedding), the
        gradient reaches `soft` (..., V) as if the embeddings were `soft @ W` (times Gemma's scale). The same as
        embedding `one_hot - soft.detach() + soft` through the matrix, without the (..., V) x (V, d) product in the
        forward: at a 50k vocabulary that product costs as much as a block."""
        return _SoftGradient.apply(self.embed(ids), soft, self.embed.weight, self.embed_scale)


class _SoftGradient(torch.autograd.Function):
    """Identity on `value`; d/d`soft` = grad @ W^T * scale (what `soft @ W * scale` would get). The weight's own
    gradient comes through `value` (the embedding lookup), as it would from the one-hot row."""

    @staticmethod
    def forward(ctx, value, soft, weight, scale):
        ctx.save_for_backward(weight)
        ctx.scale, ctx.soft_dtype = scale, soft.dtype
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_soft = (grad.to(weight.dtype) @ weight.t()) * ctx.scale if ctx.needs_input_grad[1] else None
        return grad, None if grad_soft is None else grad_soft.to(ctx.soft_dtype), None, None


def block_list(lm: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF causal LM (also of one built on the meta device)."""
    for path in _BLOCK_LISTS:
        node = lm
        for attr in path.split("."):
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList):
            return node
    raise NotImplementedError(f"cannot find the decoder blocks of {type(lm).__name__}; looked for "
                              f"{', '.join(_BLOCK_LISTS)}")


def resolve(lm: nn.Module) -> LMParts:
    """Find blocks, embeddings and LM head of a HF causal LM."""
    blocks = block_list(lm)
    embed = lm.get_input_embeddings()
    scale = getattr(embed, "embed_scale", None)
    params = inspect.signature(lm.forward).parameters
    return LMParts(lm=lm, blocks=blocks, embed=embed, lm_head=lm.get_output_embeddings(),
                   embed_scale=1.0 if scale is None else float(scale),
                   cache_kwarg="cache" if "cache" in params else "past_key_values")


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


def run_to_block(parts: LMParts, layer: int, cache: DynamicCache | None = None, **forward_kwargs) -> torch.Tensor:
    """Run the model's own forward but stop right after block `layer`; return its output (B, S, d).

    Equals `output_hidden_states[layer + 1]` of a full forward, at a fraction of the cost (no upper blocks, no
    LM head). Gradients flow as usual. With `cache`, the forward continues it and leaves the keys/values of blocks
    0..layer in it (`layer = n_layers - 1`: a prefix's cache for every block, without the LM head)."""

    def stop(module, args, output):
        raise _StopForward(_hidden_of(output))

    cache_kwargs = {} if cache is None else {parts.cache_kwarg: cache}
    with _hook(parts.blocks[layer].register_forward_hook(stop)):
        try:
            parts.lm(**forward_kwargs, use_cache=cache is not None, **cache_kwargs)
        except _StopForward as done:
            return done.hidden
    raise RuntimeError(f"block {layer} never ran")  # internal invariant: the hook always fires


KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Keys and values per block, (B, heads, S, head_dim) each: a computed prefix, reusable by many passes."""


def kv_of(cache: DynamicCache) -> KV:
    return [(layer.keys, layer.values) for layer in cache.layers if layer.is_initialized]


def cache_from(kv: KV, rows: int | None = None) -> DynamicCache:
    """A fresh cache that starts with `kv` (broadcast from one row to `rows` rows when given).

    A forward appends to its own cache, so every pass over a shared prefix gets one of these and the prefix is
    never recomputed. Full layers, also for sliding-window blocks: every position stays addressable, which rows
    with different positions need (their masks pick what each row sees)."""
    cache = DynamicCache()
    for k, v in kv:
        if rows is not None:
            k, v = k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def prefix_kv(parts: LMParts, upto: int, **forward_kwargs) -> KV:
    """Keys/values of blocks 0..upto for one forward's inputs (e.g. a prompt shared by a whole batch, one row)."""
    cache = DynamicCache()
    run_to_block(parts, upto, cache=cache, **forward_kwargs)
    return kv_of(cache)


def single_position_mask(parts: LMParts, positions: torch.Tensor, cached: int, dtype: torch.dtype):
    """Attention mask of a one-token pass over a cache of `cached` positions, the token of row b standing at
    positions[b]: it sees cached positions < positions[b] (within the sliding window, for sliding blocks) and
    itself. An additive (B, 1, 1, cached + 1) mask, or one per attention kind for models with both kinds."""
    cfg = parts.lm.config.get_text_config()
    j = torch.arange(cached + 1, device=positions.device)
    p = positions[:, None]
    own = j == cached

    def additive(seen: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(seen.shape, dtype=dtype, device=positions.device)
        return mask.masked_fill(~seen, torch.finfo(dtype).min)[:, None, None, :]

    full = additive((j < p) | own)
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return full
    # Same rule as the models' own sliding mask: key j is seen by query p when p - j < window.
    sliding = additive(((j < p) & (p - j < window)) | own)
    kinds = getattr(cfg, "layer_types", None)
    if kinds is None:  # one kind for every block (Mistral-style configs)
        return sliding
    if "sliding_attention" not in kinds:
        return full
    return {"full_attention": full, "sliding_attention": sliding}


@contextmanager
def read_block_output(parts: LMParts, layer: int, positions: torch.Tensor, into: list):
    """While active, every forward appends block `layer`'s output at (row b, positions[b]) to `into` (B, d)."""
    rows = torch.arange(positions.shape[0], device=positions.device)

    def read(module, args, output):
        into.append(_hidden_of(output)[rows, positions])

    with _hook(parts.blocks[layer].register_forward_hook(read)):
        yield


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
def contiguous_head_input(parts: LMParts):
    """While active, the LM head's input is made contiguous. `logits_to_keep` hands the head a strided slice of the
    hidden states, which CPU matmul multiplies by the weight expanded per row (about 3x slower at 50k vocabularies)."""
    with _hook(parts.lm_head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))):
        yield


@contextmanager
def logits_at(parts: LMParts, positions: torch.Tensor):
    """While active, the LM head sees only position positions[b] of row b: logits come out as (B, 1, V).

    Saves the (B, S, V) logits a full forward would make; softcapping etc. after the head still apply."""
    rows = torch.arange(positions.shape[0], device=positions.device)

    def gather(module, args):
        return (args[0][rows, positions].unsqueeze(1),) + tuple(args[1:])

    with _hook(parts.lm_head.register_forward_pre_hook(gather)):
        yield
