"""Process group for one process or torchrun. World size 1 is not a special case: it is a group of one."""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

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


_device = torch.device("cpu")  # where collectives' tensors live (the backend's device), set by init


def init(timeout_s: float = 300.0) -> Dist:
    """Join the job's process group (gloo on CPU, nccl on GPU).

    Under torchrun the group needs a store no earlier group left keys in: after an elastic restart, a stale worker
    address read from a reused store makes `init_process_group` fail or hang (torch.distributed.elastic restart
    bug). The chart sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, so each group's rank 0 hosts a fresh store on the
    port its rendezvous round chose. With torchrun's shared agent store, the group lives under a namespace per
    restart count instead, which holds while no replacement node (restart count 0) joins older ones.

    `timeout_s` bounds every collective: a rank whose peer vanished without closing its connections (a lost node)
    fails after it, so its agent can re-form the group instead of waiting forever."""
    global _device
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
        timeout = timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ and world > 1:
            addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                namespace = f"lens/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/" \
                            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
                store = dist.PrefixStore(namespace, dist.TCPStore(addr, port, world, is_master=False,
                                                                  timeout=timeout))
            else:
                store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
        else:
            store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    _device = device
    return Dist(rank, world, local_rank, device)


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum small tensors (metrics) across ranks in place, one collective each. Gradients never come here: DDP or
    FSDP reduce them (lens.train.parallel)."""
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    failures = torch.tensor([0.0 if flag else 1.0], device=_device)
    dist.all_reduce(failures, op=dist.ReduceOp.SUM)
    return failures.item() == 0


def all_max(value: float) -> float:
    """The largest of the ranks' values, on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def barrier() -> None:
    dist.barrier()


def shutdown(finished: bool = False) -> None:
    """Leave the process group. `finished`: every rank got here without error, so they first meet at a barrier (a
    rank that leaves while a peer still works with the group fails that peer's collective); after an error the
    others may never arrive, so no barrier then. The process itself ends through `exit_process`."""
    if dist.is_initialized():
        if finished:
            barrier()
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a process that ran a process group with exit `code`, skipping the interpreter's finalization.

    destroy_process_group does not stop gloo's worker threads while FSDP's and DTensor's caches still hold the group,
    and such a thread frees the tensors of its last collective (which needs the GIL) a moment after the collective
    completed. If that moment falls in finalization, CPython ends the thread with a forced unwind through a noexcept
    destructor and the process aborts ("terminate called without an active exception", SIGABRT): a finished rank,
    a bad-input exit 2 or a preemption's 128 + n would then read as a crash that torchrun restarts. So, like
    multiprocessing's workers, leave through os._exit once what the process says is out: atexit handlers run
    (logging, W&B) and the standard streams are flushed; a thread still running ends with the process."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or a broken pipe: nothing more can be said
            pass
    os._exit(code)
