"""Preemption notices (SIGTERM from a node drain or spot reclaim, Ctrl-C's SIGINT, or the flag file a `preStop`
hook writes) only set a deadline; the training loop acts on it at the next step boundary, where every rank agrees on
the time left and saves a checkpoint if one fits, then exits 128 + the signal (143; 130 for SIGINT). A second SIGINT
aborts at once (KeyboardInterrupt): the newest committed checkpoint stays the resume point.

Time budgets. torchrun forwards SIGTERM to its workers and SIGKILLs them 30 s later, so a notice by SIGTERM leaves
`SIGTERM_BUDGET_S`. The chart's preStop hook writes the flag *before* the container gets SIGTERM and waits until the
trainer removes it (after saving), up to the pod's grace period less torchrun's 30 s; it exports that wait, less a
margin, as `LENS_PREEMPT_GRACE_S`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time

from lens.agent import stop_agent
from lens.errors import RetryableError
from lens.train import dist

log = logging.getLogger("lens.train")

EXIT_CODE = 143  # 128 + SIGTERM: non-zero, so the operator restarts the pod and training resumes
SIGTERM_BUDGET_S = 25.0  # torchrun SIGKILLs workers 30 s after forwarding SIGTERM; 5 s for exiting


class Preempted(RetryableError):
    """Raised once the preemption is handled (checkpoint saved, or skipped as it did not fit): retryable, with the
    signal's exit code (128 + N) in place of `EXIT_RETRYABLE`."""

    def __init__(self, message: str, exit_code: int = EXIT_CODE):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionNotice:
    def __init__(self, flag_file: str | None = None, flag_budget_s: float | None = None):
        self.flag_file = flag_file or os.environ.get("LENS_PREEMPT_FLAG") or None
        if flag_budget_s is None:
            flag_budget_s = float(os.environ.get("LENS_PREEMPT_GRACE_S") or SIGTERM_BUDGET_S)
        self.flag_budget_s = flag_budget_s
        self.deadline: float | None = None  # time.monotonic() by which a preemption checkpoint must be saved
        self.flagged = False  # this pod's preStop hook wrote the flag: its agent has no signal yet (see `consume`)
        self.exit_code = EXIT_CODE
        if self.flag_file:  # /dev/shm outlives a container restart inside the pod: a flag found now is stale
            self.consume()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        # Nothing else here: the loop saves at a step boundary, never mid-step.
        if signum == signal.SIGINT and self.exit_code == 128 + signal.SIGINT:  # the second Ctrl-C
            raise KeyboardInterrupt
        self.exit_code = 128 + signum  # before the line below: a second Ctrl-C may come as soon as it is out
        self._set_deadline(time.monotonic() + SIGTERM_BUDGET_S)
        if signum == signal.SIGINT:
            log.warning("SIGINT: saving at the next step boundary, then exiting (Ctrl-C again aborts at once)")

    def _set_deadline(self, deadline: float) -> None:
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)

    def _poll_flag(self) -> None:
        if not self.flag_file:
            return
        try:
            written = os.stat(self.flag_file).st_mtime
        except FileNotFoundError:
            return
        self.flagged = True
        age = max(0.0, time.time() - written)
        self._set_deadline(time.monotonic() - age + self.flag_budget_s)

    def seconds_left(self) -> float | None:
        """Seconds left to save before the pod is killed, agreed by every rank (the smallest any rank has), or
        None when no rank has a notice. One small all-reduce: call it on every rank at every step boundary."""
        self._poll_flag()
        mine = math.inf if self.deadline is None else self.deadline - time.monotonic()
        agreed = -dist.all_max(-mine)
        return None if math.isinf(agreed) else agreed

    def consume(self) -> None:
        """Remove the flag: a preStop hook waiting for the checkpoint returns, and the next start sees no notice.

        A flagged pod's agent is stopped first (kubelet's SIGTERM comes only once the hook returns): left alone it
        would see this worker exit, restart it and join the survivors' next rendezvous round, then die in it when
        the SIGTERM comes, and they would wait for it until torchrun's store timeout closes the rendezvous."""
        if self.flagged and os.environ.get("LOCAL_RANK", "0") == "0":  # one signal per agent
            stop_agent()
        if self.flag_file:
            try:
                os.remove(self.flag_file)
            except FileNotFoundError:
                pass
