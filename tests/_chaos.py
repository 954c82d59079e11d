"""Faults injected into a local run (`LocalRun`): the chaos test and `bench/recovery.py` share this harness.

`ChaosRun` runs the rendered PyTorchJob's agents on this machine (restarted like pods by `WorkerGroup`), follows the
trainer's structured events (`events.jsonl`, written by rank 0 next to metrics.jsonl: `start`, `step`, `checkpoint`,
`preemption`; never its log text), and strikes: SIGKILL a worker, kill a whole node (agent and workers), preempt a
node (preStop hook, then SIGTERM) or SIGKILL a worker while a checkpoint upload is in flight (held by `FaultProxy`
between the trainers and the S3 server). For every fault it records the step the run had reached, the step it
resumed from and the seconds until the next completed step. `S3Server` is a moto server on loopback (moto is a
test dependency: none of this ships in the package).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lens.launch.local import LocalRun

@dataclass
class Fault:
    kind: str
    at_step: int
    """The newest step the run had completed when the fault struck."""
    resumed_step: int
    """The step training resumed from (its newest committed checkpoint)."""
    recovery_s: float
    """Seconds from the fault to the next completed training step."""
    world: int
    """Processes after the restart."""

    @property
    def steps_lost(self) -> int:
        return self.at_step - self.resumed_step


@dataclass
class Event:
    """One line of the trainer's events.jsonl."""

    t: float  # wall-clock time the trainer wrote it
    kind: str  # "start" (a (re)start: step, world), "step", "checkpoint" (committed), "preemption" (a notice)
    step: int = 0
    world: int = 0
    fields: dict = field(default_factory=dict)  # the rest: checkpoint mb/seconds, preemption seconds_left


class ChaosRun:
    """A local run of rendered manifests `docs` (no dump Job) whose faults are recorded in `faults`; `events` is the
    trainer's events.jsonl (lines already in it when the run starts are not this run's)."""

    def __init__(self, docs: list[dict], events: str | os.PathLike, echo: bool = False, seed: int = 0):
        self.docs, self.echo, self.rng = docs, echo, random.Random(seed)
        self.events_path = Path(events)
        self.events: list[Event] = []
        self.cond = threading.Condition()
        self.faults: list[Fault] = []
        self.exit_code: int | None = None

    def __enter__(self) -> ChaosRun:
        offset = self.events_path.stat().st_size if self.events_path.exists() else 0
        self.local = LocalRun(self.docs, sink=self._on_output).__enter__()
        self.group = self.local.workers()
        threading.Thread(target=self._follow, args=(offset,), daemon=True).start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.local.__exit__(*exc)

    def _run(self) -> None:
        code = self.group.run()
        time.sleep(0.5)  # the follower reads the last lines first
        with self.cond:
            self.exit_code = code
            self.cond.notify_all()

    def _follow(self, offset: int, poll_s: float = 0.05) -> None:
        """Tail events.jsonl: complete lines only (rank 0 appends one line per write)."""
        buf = b""
        while self.exit_code is None:
            if self.events_path.exists():
                with open(self.events_path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                *lines, buf = (buf + data).split(b"\n")
                parsed = [self._event(json.loads(line)) for line in lines if line.strip()]
                if parsed:
                    with self.cond:
                        self.events += parsed
                        self.cond.notify_all()
            time.sleep(poll_s)

    @staticmethod
    def _event(record: dict) -> Event:
        rest = {k: v for k, v in record.items() if k not in ("event", "time", "step", "world")}
        return Event(record["time"], record["event"], record.get("step", 0), record.get("world", 0), rest)

    def _on_output(self, line: bytes) -> None:
        if self.echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()

    # ------------------------------------------------------------------------------------------------ waiting
    def _wait(self, found: Callable[[], object], timeout: float, what: str):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not (result := found()):
                if self.exit_code is not None:
                    raise RuntimeError(f"the run ended (exit {self.exit_code}) while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout:.0f} s")
                self.cond.wait(left)
            return result

    def _after(self, index: int, kind: str, world: int | None = None) -> int | None:
        """Index of the first event of `kind` (with `world`) after `index`."""
        for i in range(index, len(self.events)):
            e = self.events[i]
            if e.kind == kind and (world is None or e.world == world):
                return i
        return None

    def wait_step(self, step: int, timeout: float = 300) -> None:
        """Until a step >= `step` completed (since the last restart)."""
        def found():
            last_resume = max((i for i, e in enumerate(self.events) if e.kind == "start"), default=-1)
            return any(e.kind == "step" and e.step >= step for e in self.events[last_resume + 1:])

        self._wait(found, timeout, f"step {step}")

    def last_step(self) -> int:
        with self.cond:
            return max((e.step for e in self.events if e.kind == "step"), default=0)

    def wait_world(self, world: int, since: int, timeout: float = 300) -> None:
        """Until training resumed with `world` processes (after event `since`) and completed a step."""
        def found():
            i = self._after(since, "start", world)
            return i is not None and self._after(i + 1, "step") is not None

        self._wait(found, timeout, f"a step with {world} processes")

    def finish(self, timeout: float = 600) -> int:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"the run did not finish within {timeout:.0f} s")
        return self.exit_code

    def save_times(self) -> list[tuple[float, float, int]]:
        """(MB of tensors, seconds, processes) of every committed checkpoint, from the trainer's events."""
        with self.cond:
            return [(e.fields["mb"], e.fields["seconds"], e.world) for e in self.events if e.kind == "checkpoint"]

    # ------------------------------------------------------------------------------------------------ faults
    def _strike(self, kind: str, act: Callable[[Callable[[], None]], None], timeout: float = 300) -> Fault:
        """Run `act(strike)`; `act` calls `strike()` at the moment the fault happens. Returns the recorded fault
        once training completed a step after resuming."""
        mark: dict = {}

        def strike() -> None:
            with self.cond:
                mark.update(t=time.time(), index=len(self.events))

        act(strike)
        if not mark:
            raise RuntimeError(f"fault {kind} never struck")
        resumed = self._wait(lambda: self._after(mark["index"], "start"), timeout, f"a restart after {kind}")
        self._wait(lambda: self._after(resumed + 1, "step"), timeout, f"a step after the restart ({kind})")
        with self.cond:
            resume = self.events[resumed]
            done = self.events[self._after(resumed + 1, "step")]
            # The run may have completed a step or two between the strike and the failure being noticed.
            at = max((e.step for e in self.events[:resumed] if e.kind == "step"), default=0)
        fault = Fault(kind, at, resume.step, done.t - mark["t"], resume.world)
        self.faults.append(fault)
        return fault

    def live_nodes(self) -> list[int]:
        return [n.rank for n in self.group.nodes if self.group.worker_pids(n.rank)]

    def kill_worker(self, node: int | None = None) -> Fault:
        """SIGKILL one training process; its agent restarts the worker group."""
        def act(strike):
            pids = self.group.worker_pids(self._pick(node))
            strike()
            os.kill(pids[0], signal.SIGKILL)

        return self._strike("worker SIGKILL", act)

    def kill_node(self, node: int | None = None, down_s: float | None = 1.0) -> Fault:
        """The node vanishes (agent and workers SIGKILLed); a replacement pod starts `down_s` later, or with
        `down_s=None` at `restore_node`, once the survivors trained alone (then `self.lost` names the node)."""
        def act(strike):
            self.lost = self._pick(node)
            strike()
            self.group.kill_node(self.lost, down_s)

        return self._strike("node lost", act)

    def restore_node(self, rank: int) -> None:
        self.group.restore_node(rank)

    def preempt_node(self, node: int | None = None, down_s: float = 1.0, grace_s: float = 110.0) -> Fault:
        """A spot reclaim: preStop hook, SIGTERM, and a replacement pod `down_s` after the pod is gone."""
        def act(strike):
            rank = self._pick(node)
            strike()
            threading.Thread(target=self.group.preempt_node, args=(rank, down_s, grace_s), daemon=True).start()

        return self._strike("SIGTERM (preemption)", act)

    def kill_during_upload(self, proxy: FaultProxy, node: int | None = None, timeout: float = 300) -> Fault:
        """SIGKILL a worker while the next checkpoint's tensors are being uploaded (held by `proxy`)."""
        def act(strike):
            held = proxy.hold_on(b".distcp")  # a rank's checkpoint shard (lens/train/checkpoint.py)
            try:
                if not held.wait(timeout):
                    raise TimeoutError(f"no checkpoint upload within {timeout:.0f} s")
                pids = self.group.worker_pids(self._pick(node))
                strike()
                os.kill(pids[0], signal.SIGKILL)
                time.sleep(0.5)
            finally:
                proxy.release()

        return self._strike("SIGKILL during checkpoint upload", act)

    def _pick(self, node: int | None) -> int:
        live = self.live_nodes()
        if not live:
            raise RuntimeError("no node has training processes")
        return node if node is not None else self.rng.choice(live)


class FaultProxy:
    """A TCP proxy on loopback in front of `target_port` (an S3 server) that injects network faults:
    `hold_on(pattern)` holds all traffic from the first request whose bytes contain `pattern` until `release()` (a
    process caught in the middle of an upload); `down()` closes the listener and every open connection (clients see
    connection refused / reset, as when a server restarts) until `up()` listens again on the same port."""

    def __init__(self, target_port: int):
        self.target_port, self.port, self.conns = target_port, 0, []
        self.flowing = threading.Event()
        self.flowing.set()
        self.pattern: bytes | None = None
        self.hit = threading.Event()
        self.up()

    def up(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def down(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self.server.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.conns = []

    def hold_on(self, pattern: bytes) -> threading.Event:
        """From now, the first request containing `pattern` stops all traffic; the returned event is set then."""
        self.hit = threading.Event()
        self.pattern = pattern
        return self.hit

    def release(self) -> None:
        self.pattern = None
        self.flowing.set()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # down()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while True:
                ready, _, _ = select.select([src], [], [], 1.0)
                if not ready:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    break
                if request and self.pattern is not None and self.pattern in data:
                    self.flowing.clear()
                    self.hit.set()
                self.flowing.wait()
                dst.sendall(data)
        except (OSError, ValueError):  # the other direction closed both sockets
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


class S3Server:
    """A moto S3 server on a free loopback port (in memory: it forgets everything when stopped)."""

    def __init__(self, log_path: str | os.PathLike):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        exe = Path(sys.executable).parent / "moto_server"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start; see {log_path}") from None
                time.sleep(0.1)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test",
                            aws_secret_access_key="test")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
"""Credentials a local moto server accepts."""
