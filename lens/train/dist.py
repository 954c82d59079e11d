"""Process group for one process or torchrun. World size 1 is not a special case: it is a group of one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_s: float = 300.0) -> Dist:
    """Join the job's process group (gloo on CPU, nccl on GPU).

    Under torchrun the group lives on a PrefixStore namespaced by the run id and the restart count: after an
    elastic restart, a plain `init_process_group` can read a dead worker's address left in the agent's store and
    fail or hang (torch.distributed.elastic restart bug); a fresh namespace per restart avoids it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ and world > 1:
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                 timeout=timedelta(seconds=timeout_s))
            namespace = f"lens/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/" \
                        f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
            store = dist.PrefixStore(namespace, base)
        else:
            store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local_rank, device)


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors across ranks in place, as one flat buffer (one collective instead of one per tensor)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def barrier() -> None:
    dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
