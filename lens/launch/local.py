"""`scripts/launch.py CONFIG --local`: run the rendered chart on this machine.

What runs is read from the manifests `helm template` rendered for the cluster, not re-derived from the config:
  - the dump Job (when rendered): its `completions` indexes as processes, at most `parallelism` at once, each with
    `JOB_COMPLETION_INDEX` (as the Job controller sets it) and the container's env; exit code 2 fails the run at once
    (the Job's podFailurePolicy), other failures are retried up to the Job's `backoffLimit`;
  - then the PyTorchJob: one `torchrun` agent per Worker replica running the container's command, with the
    environment the training operator injects (`PET_NNODES`, `PET_RDZV_ENDPOINT` = 127.0.0.1:<free port>,
    `PET_RDZV_BACKEND`, `PET_RDZV_ID`, `PET_RDZV_CONF`, `PET_NPROC_PER_NODE`, `PET_MAX_RESTARTS`). The c10d
    rendezvous store is hosted by this launcher rather than by the first agent (on a cluster: worker-0), so the
    agents that finish last do not lose it while they shut down (a stack trace, though the exit code is 0).
Volumes are emulated by rewriting paths: the ConfigMap mount (/etc/lens) becomes a local directory holding the
same files, each emptyDir mount (/dev/shm, /tmp) a per-process directory, for the command's arguments and env
values that name them. Env taken from Secrets (valueFrom) is left out: local processes inherit this shell's
environment (W&B, HF and AWS credentials included). Output is streamed with a `[dump-i]` / `[worker-r]` prefix.
Exit code: 0 when every agent exits 0, 2 when a process exits 2, else the first failure's code; an agent that
fails stops the others (torchrun already restarted its workers up to maxRestarts; relaunching resumes).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lens.errors import InputError

# Agents on one machine join within a second (default last call: 30 s); the store is ours (`_rendezvous_store`).
LOCAL_RDZV_CONF = {"last_call_timeout": "1", "is_host": "false"}
STOP_GRACE_S = 40.0  # torchrun SIGKILLs its workers 30 s after forwarding SIGTERM
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
        self.env = {e["name"]: self._local_path(str(e.get("value", ""))) for e in c.get("env") or []
                    if "valueFrom" not in e}  # secrets: from this shell's environment instead

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

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.signalled: int | None = None
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


def _run_workers(job: dict, runner: _Runner, configmaps: dict, workdir: Path) -> int:
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
    agents = []
    for r in range(replicas):
        pod = _Pod(worker["template"]["spec"], "pytorch", configmaps, workdir, f"worker-{r}")
        env = {**_base_env(), **pod.env, **pet}
        if gpus:  # each agent its own GPUs, as each pod would have
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[r * nproc:(r + 1) * nproc])
        runner.say(f"worker-{r}", " ".join(f"{k}={v}" for k, v in pet.items()))
        agents.append(runner.start(f"worker-{r}", pod.argv, env))
    while True:
        if runner.signalled:
            return 128 + runner.signalled
        codes = [p.poll() for p in agents]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return 2 if 2 in failed else _exit_code(failed[0])
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def run_local(docs: list[dict]) -> int:
    """Run the rendered manifests `docs` here: the dump Job's indexes first (if rendered), then the PyTorchJob's
    workers. Returns the exit code."""
    jobs = _find(docs, "PyTorchJob")
    if len(jobs) != 1:
        raise InputError(f"expected one rendered PyTorchJob, got {len(jobs)}")
    configmaps = {d["metadata"]["name"]: d.get("data") or {} for d in _find(docs, "ConfigMap")}
    workdir = Path(tempfile.mkdtemp(prefix=f"lens-local-{jobs[0]['metadata']['name']}-"))
    try:
        with _Runner() as runner:
            code = 0
            for dump_job in _find(docs, "Job"):
                code = code or _run_dump(dump_job, runner, configmaps, workdir)
            code = code or _run_workers(jobs[0], runner, configmaps, workdir)
        print(f"local run {'finished' if code == 0 else f'failed (exit {code})'}", file=sys.stderr)
        return code
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
