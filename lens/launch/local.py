"""`scripts/launch.py CONFIG --local`: run the rendered chart on this machine.

What runs is read from the manifests `helm template` rendered for the cluster, not re-derived from the config:
  - the dump Job (when rendered): its `completions` indexes as processes, at most `parallelism` at once, each with
    `JOB_COMPLETION_INDEX` (as the Job controller sets it) and the container's env; exit code 2 fails the run at once
    (the Job's podFailurePolicy), other failures are retried up to the Job's `backoffLimit`;
  - at the same time, as on a cluster, the PyTorchJob (its trainer waits for its data): one `torchrun` agent per
    Worker replica running the container's command, with the environment the training operator injects
    (`PET_NNODES`, `PET_RDZV_ENDPOINT` = 127.0.0.1:<free port>, `PET_RDZV_BACKEND`, `PET_RDZV_ID`, `PET_RDZV_CONF`,
    `PET_NPROC_PER_NODE`, `PET_MAX_RESTARTS`). The c10d rendezvous store is hosted by this launcher rather than by
    the first agent (on a cluster: worker-0), so the agents that finish last do not lose it while they shut down
    (a stack trace, though the exit code is 0).
Volumes are emulated by rewriting paths: the ConfigMap mount (/etc/lens) becomes a local directory holding the
same files, each emptyDir mount (/dev/shm, /tmp) a per-process directory, for the command's arguments and env
values that name them. Env taken from Secrets (valueFrom) is left out: local processes inherit this shell's
environment (W&B, HF and AWS credentials included). Output is streamed with a `[dump-i]` / `[worker-r]` prefix.
Pods are kept alive as on a cluster: an agent that fails (torchrun already restarted its workers up to maxRestarts)
is started again after a back-off, like the operator's pod restart, and training resumes from its newest checkpoint
(`WorkerGroup`); which exit codes restart a pod follows the Worker's `restartPolicy` as the operator reads it
(`ExitCode`: 128 and above, or killed by a signal; 1-127, bad input among them, fail the job). Exit code: 0 when
every agent exits 0, else the code of the agent that failed the job (not restarted, or its restarts ran out).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lens.errors import InputError, is_retryable

# Agents on one machine join within a second (default last call: 30 s); the store is ours (`_rendezvous_store`).
LOCAL_RDZV_CONF = {"last_call_timeout": "1", "is_host": "false"}
STOP_GRACE_S = 40.0  # torchrun SIGKILLs its workers 30 s after forwarding SIGTERM
LOCAL_POD_RESTARTS = 5  # a crash-looping agent here is a bug to read about, not to retry a thousand times
RESTART_BACKOFF_S = 1.0  # first pod restart delay, doubled per restart (kubelet: 10 s, too slow for local runs)
# Set by the operator or torchrun: never inherited from the launching shell.
_OWNED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
              "ROLE_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX")


def local_values(workers: int) -> dict:
    """Chart values for a local run: `workers` replicas that must all join (min = max = replicas), and no GPUs
    when this machine has none (so nprocPerNode renders as 1)."""
    if workers < 1:
        raise InputError(f"--workers {workers}: need at least 1")
    out = {"workers": {"replicas": workers, "minReplicas": workers, "maxReplicas": workers}}
    if _gpu_count() == 0:
        out["workers"]["gpus"] = 0
        out["dump"] = {"gpus": 0}
    return out


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPUs
        return 0


def _rendezvous_store():
    """A TCPStore server on a free loopback port, for the agents' c10d rendezvous (they connect as clients)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))


def _exit_code(returncode: int) -> int:
    """A child's return code as our exit code: killed by signal N -> 128 + N, as a shell reports it."""
    return 128 - returncode if returncode < 0 else returncode


def _find(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


class _Pod:
    """A pod spec turned into a local command line and environment (volumes emulated by path rewriting)."""

    def __init__(self, pod_spec: dict, container_name: str | None, configmaps: dict[str, dict], workdir: Path,
                 name: str):
        containers = pod_spec["containers"]
        c = next((c for c in containers if c["name"] == container_name), None) if container_name else containers[0]
        if c is None:
            raise InputError(f"rendered pod has no container {container_name!r}")
        self.name = name
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
        self.mounts: dict[str, Path] = {}
        for m in c.get("volumeMounts") or []:
            vol = volumes.get(m["name"], {})
            if "configMap" in vol:
                local = workdir / "configmaps" / vol["configMap"]["name"]
                if not local.exists():
                    local.mkdir(parents=True)
                    for key, text in (configmaps.get(vol["configMap"]["name"]) or {}).items():
                        (local / key).write_text(text)
            else:  # emptyDir and anything else: a directory of this process's own
                local = workdir / name / m["name"]
                local.mkdir(parents=True, exist_ok=True)
            self.mounts[m["mountPath"].rstrip("/")] = local
        self.argv = [self._local_path(a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
        if not self.argv:
            raise InputError(f"rendered container {c['name']!r} has no command")
        # Secrets come from this shell's environment instead; so do the variables pointing into the pod's `cache`
        # volume (HF_HOME, LENS_CACHE, W&B's dirs...): here the caches are this machine's own (and ./wandb-local).
        caches = tuple(m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts") or [] if m["name"] == "cache")
        self.env = {e["name"]: self._local_path(str(e.get("value", ""))) for e in c.get("env") or []
                    if "valueFrom" not in e and not (caches and str(e.get("value", "")).startswith(caches))}
        hook = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
        self.pre_stop = [self._local_paths_in(part) for part in hook]

    def _local_paths_in(self, script: str) -> str:
        """Mount paths anywhere in a shell snippet (the preStop hook) rewritten to their local directories, in one
        pass (a local directory may itself lie under another mount path, e.g. /tmp)."""
        if not self.mounts:
            return script
        mounts = sorted(self.mounts, key=len, reverse=True)
        pattern = re.compile("|".join(re.escape(m) + "(?=/)" for m in mounts))
        return pattern.sub(lambda m: str(self.mounts[m.group(0)]), script)

    def _local_path(self, value: str) -> str:
        for mount, local in self.mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount):]
        return value


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(("PET_", "TORCHELASTIC_")) or k in _OWNED_ENV)}
    bin_dir = str(Path(sys.executable).parent)  # this interpreter's torchrun and lens first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # the operator sets it too: logs arrive line by line
    return env


class _Runner:
    """Child processes with prefixed, line-buffered output; SIGINT/SIGTERM stop them all."""

    def __init__(self, sink: Callable[[bytes], None] | None = None):
        self.sink = sink
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.signalled: int | None = None
        self.stopping = False  # set when the run ends: the dump Job's loop then starts no more pods
        self.store = None

    def start(self, prefix: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        exe = shutil.which(argv[0], path=env.get("PATH"))
        if exe is None:
            raise InputError(f"{argv[0]} not found on PATH (needed to run {prefix} locally)")
        self.say(prefix, " ".join(argv))
        # Own session: a terminal Ctrl-C reaches only us; we forward SIGTERM (torchrun then stops its workers).
        proc = subprocess.Popen([exe, *argv[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        t = threading.Thread(target=self._pump, args=(prefix, proc), daemon=True)
        t.start()
        self.procs.append(proc)
        self.threads.append(t)
        return proc

    def say(self, prefix: str, text: str) -> None:
        self._write(f"[{prefix}] {text}\n".encode())

    def _write(self, data: bytes) -> None:
        with self.lock:
            if self.sink is not None:
                self.sink(data)
                return
            sys.stdout.buffer.write(data)
            sys.stdout.flush()

    def _pump(self, prefix: str, proc: subprocess.Popen) -> None:
        head = f"[{prefix}] ".encode()
        for line in proc.stdout:
            self._write(head + line if line.endswith(b"\n") else head + line + b"\n")

    def stop_all(self) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for p in live:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def drain(self) -> None:
        for t in self.threads:
            t.join(5)

    def __enter__(self):
        def handler(signum, _frame):
            self.signalled = signum

        self._old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        self.stop_all()
        self.drain()
        for s, h in self._old.items():
            signal.signal(s, h)


def _run_dump(job: dict, runner: _Runner, configmaps: dict, workdir: Path) -> int:
    spec = job["spec"]
    completions, parallelism = int(spec.get("completions") or 1), int(spec.get("parallelism") or 1)
    backoff = int(spec.get("backoffLimit", 6))
    fail_codes = {int(v) for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []
                  if rule.get("action") == "FailJob" and (rule.get("onExitCodes") or {}).get("operator") == "In"
                  for v in rule["onExitCodes"].get("values") or []}
    pod_spec = spec["template"]["spec"]
    pending, running, failures = list(range(completions)), {}, 0
    while pending or running:
        if runner.signalled:
            return 128 + runner.signalled
        if runner.stopping:  # the run is over (training failed): its pods are being stopped, not failing
            return 128 + signal.SIGTERM
        while pending and len(running) < parallelism:
            i = pending.pop(0)
            pod = _Pod(pod_spec, None, configmaps, workdir, f"dump-{i}")
            env = {**_base_env(), **pod.env, "JOB_COMPLETION_INDEX": str(i)}
            running[i] = runner.start(f"dump-{i}", pod.argv, env)
        time.sleep(0.2)
        for i, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[i]
            if code == 0:
                continue
            if code in fail_codes or code == 2:
                runner.say(f"dump-{i}", f"exit {code}: bad input, not retried")
                return 2
            failures += 1
            if failures > backoff:
                runner.say(f"dump-{i}", f"exit {code}: the dump Job's backoffLimit ({backoff}) is exhausted")
                return _exit_code(code)
            runner.say(f"dump-{i}", f"exit {code}: retrying ({failures}/{backoff})")
            pending.insert(0, i)
    return 0


class _Node:
    """One Worker replica: its pod (command, env, emptyDirs) and the torchrun agent now running it."""

    def __init__(self, rank: int, pod: _Pod, env: dict[str, str]):
        self.rank, self.pod, self.env = rank, pod, env
        self.proc: subprocess.Popen | None = None
        self.back_at: float | None = None  # monotonic time a lost pod's replacement starts
        self.restarts = 0


class WorkerGroup:
    """The PyTorchJob's Worker replicas as torchrun agents on this machine, kept alive the way the operator and
    kubelet keep pods alive: an agent that fails (torchrun gave up on its workers, or it was killed) is started
    again after a back-off, up to the Job's backoffLimit (at most LOCAL_POD_RESTARTS here), when the replica's
    restartPolicy restarts that exit code (`restarts_pod`); an agent that exits 0 is done.

    Faults for chaos tests and benchmarks, callable from another thread: `kill_node` (the node vanishes: agent and
    workers SIGKILLed, the pod comes back after `down_s`), `preempt_node` (a spot reclaim: the preStop hook, then
    SIGTERM, like kubelet; the pod comes back after `down_s`) and `worker_pids`, to kill single workers."""

    def __init__(self, job: dict, runner: _Runner, configmaps: dict, workdir: Path):
        spec = job["spec"]
        elastic = spec.get("elasticPolicy") or {}
        worker = spec["pytorchReplicaSpecs"]["Worker"]
        replicas = int(worker.get("replicas", 1))
        lo, hi = int(elastic.get("minReplicas", replicas)), int(elastic.get("maxReplicas", replicas))
        nproc = int(spec.get("nprocPerNode") or 1)
        conf = {c["key"]: str(c["value"]) for c in elastic.get("rdzvConf") or []}
        conf = {**LOCAL_RDZV_CONF, **conf}
        store = runner.store = _rendezvous_store()  # open until every agent has stopped (after _Runner.__exit__)
        pet = {  # what the training operator injects into every worker pod in elastic mode
            "PET_NNODES": f"{lo}:{hi}",
            "PET_RDZV_ENDPOINT": f"127.0.0.1:{store.port}",
            "PET_RDZV_BACKEND": elastic.get("rdzvBackend", "c10d"),
            "PET_RDZV_ID": str(elastic.get("rdzvId") or job["metadata"]["name"]),
            "PET_RDZV_CONF": ",".join(f"{k}={v}" for k, v in conf.items()),
            "PET_NPROC_PER_NODE": str(nproc),
            "PET_MAX_RESTARTS": str(elastic.get("maxRestarts", 3)),
            "PET_LOCAL_ADDR": "127.0.0.1",  # the pod IP's stand-in: workers reach rank 0's store on loopback
        }
        gpus = _gpu_count()
        if gpus and gpus < replicas * nproc:
            raise InputError(f"--local: {replicas} workers x {nproc} processes need {replicas * nproc} GPUs, this "
                             f"machine has {gpus} (use --workers, or -f values with workers.gpus)")
        self.runner, self.lock = runner, threading.Lock()
        self.backoff_limit = min(int((spec.get("runPolicy") or {}).get("backoffLimit", 6)), LOCAL_POD_RESTARTS)
        self.restart_policy = worker.get("restartPolicy", "Never")  # the operator's default
        self.nodes = []
        for r in range(replicas):
            pod = _Pod(worker["template"]["spec"], "pytorch", configmaps, workdir, f"worker-{r}")
            env = {**_base_env(), **pod.env, **pet}
            if gpus:  # each agent its own GPUs, as each pod would have
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
                env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[r * nproc:(r + 1) * nproc])
            runner.say(f"worker-{r}", " ".join(f"{k}={v}" for k, v in pet.items()))
            self.nodes.append(_Node(r, pod, env))

    def _start(self, node: _Node) -> None:
        node.back_at = None
        node.proc = self.runner.start(f"worker-{node.rank}", node.pod.argv, node.env)

    def run(self, failed: Callable[[], int | None] = lambda: None) -> int:
        """Run until every agent exited 0 (0), one exited 2 (2), or restarts ran out (that agent's exit code).
        `failed` is polled too: an exit code it returns (the data Job failed) stops the group with that code."""
        with self.lock:
            for node in self.nodes:
                self._start(node)
        while True:
            if self.runner.signalled:
                return 128 + self.runner.signalled
            if code := failed():
                return code
            with self.lock:
                code = self._poll()
            if code is not None:
                return code
            time.sleep(0.2)

    def _poll(self) -> int | None:
        now = time.monotonic()
        for node in self.nodes:
            if node.back_at is not None:  # a lost pod: its replacement starts on a new node
                if now >= node.back_at:
                    self.runner.say(f"worker-{node.rank}", "replacement pod starting")
                    self._start(node)
                continue
            code = node.proc.poll()
            if code is None or code == 0:
                continue
            if not restarts_pod(self.restart_policy, code):
                self.runner.say(f"worker-{node.rank}", f"exit {_exit_code(code)}: restartPolicy "
                                f"{self.restart_policy} does not restart it; the job fails")
                return _exit_code(code)
            if node.restarts >= self.backoff_limit:
                self.runner.say(f"worker-{node.rank}", f"exit {_exit_code(code)}: restart limit "
                                f"({self.backoff_limit}) reached")
                return _exit_code(code)
            node.restarts += 1
            delay = min(RESTART_BACKOFF_S * 2 ** (node.restarts - 1), 30.0)  # kubelet's crash-loop back-off
            self.runner.say(f"worker-{node.rank}", f"exit {_exit_code(code)}: restarting the pod in {delay:.0f} s "
                            f"({node.restarts}/{self.backoff_limit})")
            node.back_at = now + delay
        if all(node.back_at is None and node.proc.poll() == 0 for node in self.nodes):
            return 0
        return None

    # ------------------------------------------------------------------------------------------------ faults
    def worker_pids(self, rank: int) -> list[int]:
        """Pids of the training processes node `rank`'s agent runs now."""
        proc = self.nodes[rank].proc
        return [] if proc is None or proc.poll() is not None else _children(proc.pid)

    def kill_node(self, rank: int, down_s: float | None) -> None:
        """The node vanishes: its agent and workers are SIGKILLed; a replacement pod starts `down_s` later (None:
        when `restore_node` says so, as when spot capacity comes back)."""
        with self.lock:
            node = self.nodes[rank]
            pids = [node.proc.pid, *_children(node.proc.pid)] if node.proc.poll() is None else []
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            node.proc.wait()
            when = "when capacity returns" if down_s is None else f"in {down_s:.0f} s"
            self.runner.say(f"worker-{rank}", f"node lost (SIGKILL to {len(pids)} processes); replacement {when}")
            node.back_at = math.inf if down_s is None else time.monotonic() + down_s

    def restore_node(self, rank: int) -> None:
        """Start the replacement pod of a lost node now."""
        with self.lock:
            self.nodes[rank].back_at = time.monotonic()

    def preempt_node(self, rank: int, down_s: float, grace_s: float) -> None:
        """A spot reclaim as kubelet runs it: the preStop hook (waits for the trainer's checkpoint), then SIGTERM,
        SIGKILL after `grace_s` from the start; a replacement pod starts `down_s` after the kill. Blocks until the
        pod is gone."""
        node = self.nodes[rank]
        start = time.monotonic()
        with self.lock:
            node.back_at = math.inf  # terminating: its exit (the trainer ends once it saved) is no crash to restart
        self.runner.say(f"worker-{rank}", "preemption: running the preStop hook, then SIGTERM")
        if node.pod.pre_stop:
            try:
                subprocess.run(node.pod.pre_stop, timeout=grace_s, check=False)
            except subprocess.TimeoutExpired:
                pass
        with self.lock:
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(max(0.1, grace_s - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            self.kill_node(rank, down_s)
            return
        with self.lock:
            node.back_at = time.monotonic() + down_s
            self.runner.say(f"worker-{rank}", f"pod terminated after {time.monotonic() - start:.1f} s; replacement "
                            f"in {down_s:.0f} s")


def restarts_pod(policy: str, returncode: int) -> bool:
    """Whether the training operator recreates a Worker pod that exited `returncode` (negative: killed by a
    signal) under the replica's `restartPolicy`."""
    if policy == "ExitCode":
        return is_retryable(returncode)
    return policy == "Always" or (policy == "OnFailure" and returncode != 0)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (torchrun's workers run in their own sessions: killing the agent orphans them)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class LocalRun:
    """Rendered manifests set up to run here (a context manager: every process is stopped on exit, and the work
    directory removed). `run_local` uses it; so do chaos tests and benchmarks, which drive `workers()` themselves
    and read the output through `sink` (called with each prefixed line, as bytes)."""

    def __init__(self, docs: list[dict], sink: Callable[[bytes], None] | None = None):
        jobs = _find(docs, "PyTorchJob")
        if len(jobs) != 1:
            raise InputError(f"expected one rendered PyTorchJob, got {len(jobs)}")
        self.job, self.dump_jobs = jobs[0], _find(docs, "Job")
        self.configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in _find(docs, "ConfigMap")}
        self.sink = sink

    def __enter__(self) -> LocalRun:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"lens-local-{self.job['metadata']['name']}-"))
        self.runner = _Runner(self.sink).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.runner.__exit__(*exc)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def dump(self) -> int:
        """Run the dump Job's indexes (if one was rendered); returns the exit code."""
        code = 0
        for job in self.dump_jobs:
            code = code or _run_dump(job, self.runner, self.configmaps, self.workdir)
        return code

    def workers(self) -> WorkerGroup:
        return WorkerGroup(self.job, self.runner, self.configmaps, self.workdir)


def run_local(docs: list[dict]) -> int:
    """Run the rendered manifests `docs` here as a cluster does: the dump Job's indexes (if rendered) and the
    PyTorchJob's workers start together, and the trainer waits for its data. A failed dump Job stops the run with
    its exit code (or its exception, e.g. an InputError starting a pod); a finished training waits for the dump Job
    to end. Returns the exit code. No process outlives the call."""
    with LocalRun(docs) as run, ThreadPoolExecutor(1, thread_name_prefix="dump-job") as pool:
        dump = pool.submit(run.dump)
        try:
            code = run.workers().run(failed=lambda: dump.result() if dump.done() else None)
            if code == 0:
                code = dump.result()
        finally:
            # The dump loop sees this within a poll and returns without starting a pod; leaving the pool joins it,
            # so every pod it started is in the runner's list before LocalRun's exit stops them all.
            run.runner.stopping = True
    print(f"local run {'finished' if code == 0 else f'failed (exit {code})'}", file=sys.stderr)
    return code
