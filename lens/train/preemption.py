"""Preemption notices (SIGTERM from a node drain or spot reclaim, or the flag file a `preStop` hook writes) only set
a flag; the training loop acts on it at the next step boundary, where every rank agrees, saves and exits."""

from __future__ import annotations

import logging
import os
import signal

import torch

from lens.train import dist

log = logging.getLogger("lens.train")

EXIT_CODE = 143  # 128 + SIGTERM: non-zero, so the operator restarts the pod and training resumes


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the process should exit with EXIT_CODE."""


class PreemptionNotice:
    def __init__(self, flag_file: str | None = None):
        self.flag_file = flag_file or os.environ.get("LENS_PREEMPT_FLAG") or None
        self.signalled = False
        if self.flag_file:  # /dev/shm outlives a container restart inside the pod: a flag found now is stale
            try:
                os.remove(self.flag_file)
            except FileNotFoundError:
                pass
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signalled = True  # nothing else here: the loop saves at a step boundary, never mid-step

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank saw a notice (one small all-reduce per step)."""
        local = self.signalled or bool(self.flag_file and os.path.exists(self.flag_file))
        flag = torch.tensor([float(local)], device=device)
        dist.all_reduce_sum([flag])
        if flag.item() > 0:
            log.warning("preemption notice: saving a checkpoint at this step boundary, then exiting %d", EXIT_CODE)
            return True
        return False
