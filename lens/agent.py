"""`lens torchrun ARGS`: `torchrun ARGS` (what a Worker pod runs) with an exit code that still says "bad input".

torchrun exits 1 whatever its workers exited, and first restarts failed workers up to `--max-restarts` times, so a
worker's exit 2 would come out as a failure the cluster retries, on GPUs, until `backoffLimit`. This runs torchrun
in this process (it stays the agent: the pod's process tree is unchanged) and adds three things:

- a `lens train|dump CONFIG [key=value ...]` entrypoint's config is validated here first: bad input exits 2 with one
  line before any worker starts;
- a worker that exits 2 later (a damaged weights file) writes its line to `LENS_INPUT_ERROR_FILE`; this then stops
  torchrun as a SIGTERM would, instead of letting it restart workers that would fail alike, and exits 2;
- every other failure exits 128 or above (`EXIT_RETRYABLE`, or 128 + the signal that stopped torchrun), which the
  operator's `restartPolicy: ExitCode` retries, where torchrun's own 1 would read as permanent.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import tempfile
import threading
from pathlib import Path

from lens.errors import EXIT_INPUT, EXIT_OK, EXIT_RETRYABLE

log = logging.getLogger("lens.agent")

POLL_S = 0.5  # how often the agent looks for a worker's bad-input line
LENS_COMMANDS = ("train", "dump")


def lens_entrypoint(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """`(command, config, overrides)` when torchrun's entrypoint is `lens train|dump CONFIG ...` (as
    `--no-python lens ...` or `-m lens ...`), else None."""
    for i in range(1, len(argv) - 1):
        if Path(argv[i - 1]).name == "lens" and argv[i] in LENS_COMMANDS:
            return argv[i], argv[i + 1], argv[i + 2:]
    return None


def run(argv: list[str]) -> int:
    """Validate the entrypoint's config, run torchrun with `argv`, and return the exit code the pod should have."""
    entry = lens_entrypoint(argv)
    if entry is not None:
        from lens.config import load_config

        load_config(entry[1], entry[2])  # an InputError here: exit 2, no worker started
    with tempfile.TemporaryDirectory(prefix="lens-agent-") as tmp:
        marker = Path(tmp) / "input-error"
        os.environ["LENS_INPUT_ERROR_FILE"] = str(marker)  # the workers inherit it
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(marker, stop), daemon=True)
        watcher.start()
        try:
            code = _torchrun(argv)
        finally:
            stop.set()
            os.environ.pop("LENS_INPUT_ERROR_FILE", None)
        if marker.exists():
            log.error("a worker exited %d (bad input, its line is above): not restarting it", EXIT_INPUT)
            return EXIT_INPUT
        return code


def _torchrun(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log.error("worker (rank %d) failed with exit code %d after torchrun's restarts: exiting %d (retryable)",
                  rank, failure.exitcode, EXIT_RETRYABLE)
        return EXIT_RETRYABLE
    except Exception as e:
        sigval = getattr(e, "sigval", None)  # torchrun's SignalException: it stopped its workers with this signal
        if sigval is None:
            raise
        return 128 + int(sigval)
    return EXIT_OK


def _watch(marker: Path, stop: threading.Event) -> None:
    """Once a worker has written its bad-input line, stop torchrun the way SIGTERM does (it stops its workers)."""
    while not stop.wait(POLL_S):
        if marker.exists() and callable(signal.getsignal(signal.SIGTERM)):  # torchrun's handler is installed
            _thread.interrupt_main(signal.SIGTERM)  # runs it in the main thread, as a real SIGTERM would
            return
