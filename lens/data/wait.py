"""Waiting for data another job writes: the trainer started with (or before) its dump Job, as on a cluster."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from lens.errors import RetryableError

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # one line per interval in `kubectl logs`
POLL_S = 2.0


class DataNotReady(RetryableError):
    """The data did not appear within data.wait_timeout. Retryable: the pod restarts and waits again."""


def wait_until(ready: Callable[[], bool], what: str, progress: Callable[[], str], timeout_s: float) -> None:
    """Return once `ready()`; until then log `waiting for <what>: <progress()>` once per LOG_EVERY_S, and raise
    DataNotReady after `timeout_s` seconds."""
    if ready():
        return
    start = time.monotonic()
    next_log = start
    while not ready():
        now = time.monotonic()
        if now - start > timeout_s:
            raise DataNotReady(f"{what} is still not complete after data.wait_timeout={timeout_s:g} s "
                               f"({progress()}); exiting to be restarted")
        if now >= next_log:
            log.info("waiting for %s: %s", what, progress())
            next_log = now + LOG_EVERY_S
        time.sleep(min(POLL_S, max(0.05, timeout_s / 20)))
    log.info("%s is complete after %.0f s of waiting", what, time.monotonic() - start)
