"""How the lens is spread over the ranks: DDP (every rank holds all of it) or FSDP2 (trainable copies sharded).

Both sum gradients over the global batch with torch.distributed's own engines: DDP's bucketed all-reduce overlaps
the backward pass; FSDP2 reduce-scatters per transformer block. Neither makes a flat copy of the gradients. The
loss the trainer backpropagates is already `sum over the global batch / batch_size`, so both reduce with a plain
sum (their default is a mean over ranks).

`self.model` stays the LensModel (FSDP2 shards it in place; DDP wraps a thin forward around it), so checkpoints see
the same parameter names in every mode.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.distributed as torch_dist
from torch import nn

from lens.config import LensConfig
from lens.models.blocks import resolve
from lens.models.lens_model import LensModel
from lens.objective import lens_losses


def resolve_mode(cfg: LensConfig, world: int) -> str:
    """`train.parallel: auto` is fsdp when a base is trainable (its copy is what outgrows one GPU) and there are
    several ranks to shard over; ddp otherwise."""
    if cfg.train.parallel != "auto":
        return cfg.train.parallel
    return "fsdp" if (cfg.decoder.train_base or cfg.encoder.train_base) and world > 1 else "ddp"


def unused_parameters(cfg: LensConfig, model: LensModel) -> bool:
    """Whether some trainable parameter ends a step without a gradient. DDP must then search every step's graph
    for such parameters (`find_unused_parameters`: one more autograd traversal per step, and a warning each run
    when there are none); without it, it waits for their gradients and fails on the next step. Only the encoder
    leaves parameters out: a trainable copy's blocks past encoder.layer, final norm and LM head never run, and an
    empty left prompt (encoder.prompt starting with <text>, or with <bos> for a tokenizer without one) is never
    used. In the decoder only GRPO with a trainable copy and one explanation token leaves one out: the sampled
    token is never read back, so an input embedding not tied to the LM head gets no gradient. The loss weights
    cannot (the config requires a reconstruction term, which reaches the encoder, and the decoder is reached
    through the encoder's input or GRPO's policy term), nor can decoder.patch_layers / per_layer_proj (every slot
    projection is in the graph: overwritten values get zero gradients)."""
    dec = model.decoder.parts
    one_sampled_token = cfg.loss.grpo_weight > 0 and cfg.decoder.train_base and cfg.decoder.t_text == 1 \
        and dec.embed.weight is not dec.lm_head.weight
    return cfg.encoder.train_base or model.encoder.prompt_left.numel() == 0 or one_sampled_token


def trainable_bases(cfg: LensConfig, model: LensModel) -> list[tuple[nn.Module, int]]:
    """The trainable model copies, whose blocks FSDP shards one by one, each with the last block it runs."""
    bases = [(model.decoder.lm, model.decoder.parts.n_layers - 1)] if cfg.decoder.train_base else []
    return bases + ([(model.encoder.lm, cfg.encoder_layer)] if cfg.encoder.train_base else [])


class _Losses(nn.Module):
    """The training forward as a module, so DDP's forward (which prepares its reducer) wraps it."""

    def __init__(self, lens: LensModel):
        super().__init__()
        self.lens = lens

    def forward(self, batch, knobs):
        return lens_losses(self.lens, batch, knobs)


def _sum_allreduce(group, bucket):
    """DDP comm hook: sum the bucket over ranks (DDP's default divides by the world size)."""
    return torch_dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


class Parallel:
    """The trainer's handle on data parallelism: the training forward, accumulation, clipping, whole-model calls."""

    def __init__(self, cfg: LensConfig, model: LensModel, world: int, device: torch.device):
        """`model`: built with `deferred=True` (its trainable copies have no weights yet) on the frozen model's
        device, `device`. FSDP shards the copies as they are (shapes only), then each rank fills only its shards:
        no rank ever holds a whole fp32 copy. DDP fills the whole copies."""
        self.mode = resolve_mode(cfg, world)
        self.model = model
        self.sync_every_micro_batch = cfg.train.sync_every_micro_batch
        if self.mode == "fsdp":
            self._shard(cfg, model, world, device)  # moves the rest of the lens (projections, prompts) to `device`
            model.materialise()
            self._ddp = None
        else:
            from torch.nn.parallel import DistributedDataParallel

            model.materialise()
            model.to(device)

            self._ddp = DistributedDataParallel(
                _Losses(model), device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False, find_unused_parameters=unused_parameters(cfg, model),
                gradient_as_bucket_view=True)
            self._ddp.register_comm_hook(torch_dist.group.WORLD, _sum_allreduce)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def _shard(self, cfg: LensConfig, model: LensModel, world: int, device: torch.device) -> None:
        """FSDP2 per block of each trainable copy, then the root (embeddings, heads, projections, prompts). On GPU
        the gathered weights are bf16 with fp32 masters and fp32 gradient reduction; the frozen model (already in
        model.dtype) is not sharded: every rank needs all of it for the targets."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if device.type == "cuda" else MixedPrecisionPolicy()
        for base, last in trainable_bases(cfg, model):
            for block in resolve(base).blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            # A block runs several times per forward: a shared prompt's keys/values (a pass stopped after the last
            # block the copy needs), then the rows through that cache. The stopped pass's last block output gets no
            # gradient, so FSDP never re-gathers that block for it, yet the cache's gradient reaches its key/value
            # projections after the rows' pass has resharded it. That block stays gathered until `resharded`.
            # (Earlier blocks are re-gathered by the hook on their output, which autograd runs first.)
            resolve(base).blocks[last].set_reshard_after_backward(False)
        # The root's inputs (batches of fp32 activations) keep their dtype: only block inputs are cast.
        root_mp = MixedPrecisionPolicy(mp.param_dtype, mp.reduce_dtype, cast_forward_inputs=False)
        fully_shard(model, mesh=mesh, mp_policy=root_mp,
                    ignored_params={p for p in model.parameters() if not p.requires_grad})
        self._units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in self._units:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        # The lens is driven through its parts' methods, not one forward: `run` is the forward FSDP hooks around
        # (the root's weights are gathered for its duration, each block's inside the block's own forward).
        model.run = lambda fn, *args: fn(*args)
        register_fsdp_forward_method(model, "run")

    def call(self, fn: Callable, *args):
        """`fn(*args)` with the whole lens usable (evaluation, explanations). Under FSDP every rank must call it."""
        return self.model.run(fn, *args) if self.sharded else fn(*args)

    def losses(self, batch, knobs):
        """The training forward: (total per sample, loss terms, A_hat)."""
        if self.sharded:
            return self.model.run(lens_losses, self.model, batch, knobs)
        return self._ddp(batch, knobs)

    def accumulating(self, last: bool):
        """Around one micro-batch's forward and backward: gradients are summed over ranks only after the last one
        (`train.sync_every_micro_batch` makes FSDP reduce-scatter every time, so no unsharded gradient is kept)."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last or self.sync_every_micro_batch)
            return nullcontext()
        return nullcontext() if last else self._ddp.no_sync()

    def resharded(self) -> None:
        """After a micro-batch's backward: free every gathered block (the next forward gathers them again)."""
        if self.sharded:
            for m in self._units:
                m.reshard()

    @torch.no_grad()
    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """The global gradient norm (over all shards), after scaling gradients to at most `max_norm`."""
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
