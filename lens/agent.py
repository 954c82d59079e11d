"""`lens torchrun ARGS`: `torchrun ARGS` (what a Worker pod runs) with an exit code that still says "bad input".

torchrun exits 1 whatever its workers exited, and first restarts failed workers up to `--max-restarts` times, so a
worker's exit 2 would come out as a failure the cluster retries, on GPUs, until `backoffLimit`. This runs torchrun
in this process (it stays the agent: the pod's process tree is unchanged) and adds three things:

- a `lens train|dump CONFIG [key=value ...]` entrypoint's config is validated here first: bad input exits 2 with one
  line before any worker starts;
- a worker that exits 2 later (a damaged weights file) writes its line to `LENS_INPUT_ERROR_FILE` and stops this
  agent (`stop_agent`) before it exits, instead of letting torchrun restart workers that would fail alike; this
  then exits 2;
- every other failure exits 128 or above (`EXIT_RETRYABLE`, or 128 + the signal that stopped torchrun), which the
  operator's `restartPolicy: ExitCode` retries, where torchrun's own 1 would read as permanent.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

from lens.errors import EXIT_INPUT, EXIT_OK, EXIT_RETRYABLE

log = logging.getLogger("lens.agent")

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
        os.environ.update(LENS_INPUT_ERROR_FILE=str(marker), LENS_AGENT_PID=str(os.getpid()))  # workers inherit
        try:
            code = _torchrun(argv)
        finally:
            for name in ("LENS_INPUT_ERROR_FILE", "LENS_AGENT_PID"):
                os.environ.pop(name, None)
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


def stop_agent() -> None:
    """From a worker: SIGTERM its `lens torchrun` agent, which then stops its workers and exits 128 + 15 without
    restarting them or joining another rendezvous. Sent before the worker exits, as torchrun acts on an exit
    first (a restart, or a new round whose other members then wait for this pod: it is going away). Does nothing
    under another launcher, or once the agent is gone (the parent is then some other process)."""
    agent = int(os.environ.get("LENS_AGENT_PID", "0"))
    if agent and agent == os.getppid():
        os.kill(agent, signal.SIGTERM)
