"""Slurm: a validated config -> one sbatch script (N nodes, one `lens torchrun` agent per node) -> `sbatch`.

The job is requeued, never resubmitted, so `SLURM_JOB_ID`, run.dir and the W&B run stay the same and every start
resumes from the newest committed checkpoint:
- Slurm's own preemption or `scontrol requeue` SIGTERMs every step: torchrun forwards it to the trainers, which save
  at their next step boundary within the bare-SIGTERM budget (KillWait must be >= 30 s, the default).
- `--signal=B:TERM@S` reaches only the batch shell, S seconds before the time limit: it writes the preemption flag
  (`LENS_PREEMPT_FLAG`, in the job folder on the shared filesystem) with a budget of S - FLAG_MARGIN_S, the path a
  `preStop` hook uses on Kubernetes; a trainer still starting up (which clears a flag as stale) gets a plain SIGTERM
  FALLBACK_MARGIN_S before the limit instead. The trainer exits 143 and the script requeues the job.
- Exit 0 (train.max_steps reached) and exit 2 (bad input: it can never work; `lens torchrun` keeps a worker's 2)
  are final; any other exit is requeued, at most `max_requeues` times. The dump step (before training, when the run
  needs one) follows the same rule: training starts only after it exits 0.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from lens.config import LensConfig, to_yaml
from lens.errors import InputError
from lens.launch.values import needs_data_job, read_values_files

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where `import lens` resolves: a checkout or site-packages
FLAG_MARGIN_S = 40  # the trainer's flag budget ends this long before the time limit ...
FALLBACK_MARGIN_S = 35  # ... and a trainer that missed the flag gets SIGTERM (25 s budget) this long before it
MIN_SIGNAL_S = 60


@dataclass
class SlurmValues:
    """Cluster values of a Slurm run (a `-f` YAML file of these keys); Slurm's own SBATCH_* variables also apply."""

    nodes: int = 1
    gpus_per_node: int = 0
    gpu_memory: str | None = None  # e.g. "80Gi" or "h100": the memory plan then exits 2 when the run cannot fit
    procs_per_node: int | None = None  # torchrun --nproc-per-node; default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "0" (all of the node's memory) or "400G"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # time limit, e.g. "24:00:00"
    signal_s: int = 120  # --signal=B:TERM@signal_s: the notice before the time limit
    max_requeues: int = 20  # failures (not preemptions by Slurm itself) requeued at most this often
    sbatch: list = field(default_factory=list)  # extra #SBATCH arguments, e.g. ["--exclusive", "--constraint=h100"]
    setup: list = field(default_factory=list)  # shell lines run first on the batch node, e.g. "module load cuda"
    python: str | None = None  # interpreter on the nodes (default: the one submitting)
    job_dir: str | None = None  # shared folder for the job's config, script, flag and output (default ./slurm/RUN)
    port: int | None = None  # rendezvous port on the first node (default: 20000 + job id % 20000)

    def __post_init__(self) -> None:
        for name in ("nodes", "max_requeues", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "nodes" else 0):
                raise InputError(f"slurm values: {name}={value!r} is invalid; expected an integer >= "
                                 f"{1 if name == 'nodes' else 0}")
        if self.procs_per_node is None:
            self.procs_per_node = self.gpus_per_node or 1
        if not isinstance(self.procs_per_node, int) or self.procs_per_node < 1:
            raise InputError(f"slurm values: procs_per_node={self.procs_per_node!r} is invalid; expected an integer "
                             ">= 1")
        if not isinstance(self.signal_s, int) or self.signal_s < MIN_SIGNAL_S:
            raise InputError(f"slurm values: signal_s={self.signal_s!r} is invalid; expected seconds >= "
                             f"{MIN_SIGNAL_S} (the trainer needs {FLAG_MARGIN_S} s of it to stop)")
        for name in ("sbatch", "setup"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InputError(f"slurm values: {name}={value!r} is invalid; expected a list of strings")


def read_values(paths: list[str]) -> SlurmValues:
    """Merge `-f` files (later files win) into SlurmValues; an unknown key names the valid ones."""
    merged: dict = {}
    for data in read_values_files(paths, "Slurm values"):
        merged.update(data)
    valid = [f.name for f in fields(SlurmValues)]
    for key in merged:
        if key not in valid:
            raise InputError(f"slurm values: unknown key {key!r}; expected one of " + ", ".join(valid))
    return SlurmValues(**merged)


def job_dir(cfg: LensConfig, values: SlurmValues) -> Path:
    return Path(values.job_dir or Path("slurm") / cfg.run.name).absolute()


def render(cfg: LensConfig, values: SlurmValues, config_path: str) -> str:
    """The sbatch script of a run: #SBATCH lines from the values, the dump step if the run needs one
    (values.needs_data_job), then one torchrun agent per node (c10d rendezvous on the first node) and the requeue
    rule."""
    q = shlex.quote
    folder = job_dir(cfg, values)
    python = values.python or sys.executable
    sbatch = [f"--job-name={cfg.run.name}", f"--nodes={values.nodes}", "--ntasks-per-node=1"]
    if values.gpus_per_node:
        sbatch.append(f"--gpus-per-node={values.gpus_per_node}")
    for name, flag in (("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("partition", "partition"),
                       ("account", "account"), ("qos", "qos"), ("time", "time")):
        if getattr(values, name) is not None:
            sbatch.append(f"--{flag}={getattr(values, name)}")
    sbatch += ["--requeue", f"--signal=B:TERM@{values.signal_s}", "--open-mode=append",
               f"--output={folder}/slurm-%j.out", f"--chdir={Path.cwd()}", *values.sbatch]
    port = str(values.port) if values.port else "$((20000 + SLURM_JOB_ID % 20000))"
    agent = (f"{q(python)} -m lens torchrun --nnodes={values.nodes} "
             f"--nproc-per-node={values.procs_per_node} --rdzv-backend=c10d --rdzv-endpoint=\"$head:$port\" "
             f"--rdzv-id=\"$SLURM_JOB_ID\" --max-restarts=0 -m lens train {q(config_path)}")
    # `lens dump` takes its index and count from the task's SLURM_PROCID and SLURM_NTASKS; a failed dump ends
    # the start with its exit code (2: final; else requeued, and the rerun skips finished shards).
    dump = (
        "# The data first (a rerun skips finished shards), one dump index per node.\n"
        f"run_step srun --kill-on-bad-exit=1 {q(python)} -m lens dump {q(config_path)} || finish $?\n"
    ) if needs_data_job(cfg) else ""
    lines = ["#!/bin/bash", f"# consistency-lens run {cfg.run.name}, rendered by scripts/launch.py --slurm; "
             "requeued on preemption, resumes from run.dir.", *(f"#SBATCH {a}" for a in sbatch), "",
             *values.setup, ""]
    return "\n".join(lines) + _BODY.format(
        flag=q(f"{folder}/preempt-") + "$SLURM_JOB_ID", grace=values.signal_s - FLAG_MARGIN_S,
        fallback=values.signal_s - FALLBACK_MARGIN_S, port=port, max_requeues=values.max_requeues,
        dump=dump, agent=agent, package_root=q(str(PACKAGE_ROOT)))


_BODY = r"""set -u
export PYTHONPATH={package_root}${{PYTHONPATH:+:$PYTHONPATH}}
export LENS_PREEMPT_FLAG={flag} LENS_PREEMPT_GRACE_S={grace} TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head=$(scontrol -o show node "$first" | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')  # the node's address
head=${{head:-$first}}
port={port}
restarts=${{SLURM_RESTART_COUNT:-0}}
say() {{ echo "$(date '+%F %T') [slurm] $*"; }}
say "job $SLURM_JOB_ID start (SLURM_RESTART_COUNT=$restarts) on $SLURM_JOB_NODELIST, rendezvous $head:$port"

# SIGTERM here: --signal before the time limit, or Slurm stopping the job (then the steps get it too).
notice() {{
  say "SIGTERM: the trainer checkpoints at its next step boundary (flag, {grace} s), then the job is requeued"
  touch "$LENS_PREEMPT_FLAG"
  if [ -n "${{step:-}}" ] && [ -z "${{fallback_pid:-}}" ]; then
    (sleep {fallback}; kill -TERM "$step" 2>/dev/null) & fallback_pid=$!
  fi
}}
trap notice TERM

# Run a job step in the background, so the trap runs while it is going; its exit status across interruptions.
run_step() {{
  "$@" & step=$!
  local s rc=1
  while :; do
    wait "$step"; s=$?
    [ "$s" -eq 127 ] && break  # already collected by the previous wait
    rc=$s
    kill -0 "$step" 2>/dev/null || {{ wait "$step"; s=$?; [ "$s" -ne 127 ] && rc=$s; break; }}
  done
  step=
  return "$rc"
}}

finish() {{
  local rc=$1
  if [ "$rc" -eq 0 ]; then say "finished (train.max_steps reached): not requeued"; exit 0; fi
  if [ "$rc" -eq 2 ]; then say "bad input (exit 2): not requeued"; exit 2; fi
  if [ "$restarts" -ge {max_requeues} ]; then say "exit $rc after $restarts requeues: giving up"; exit "$rc"; fi
  say "exit $rc: requeueing (resumes from the newest checkpoint)"
  scontrol requeue "$SLURM_JOB_ID" || exit "$rc"
  exit 0
}}

{dump}run_step srun --kill-on-bad-exit=0 {agent}
finish $?
"""


def submit(cfg: LensConfig, values: SlurmValues, dry_run: bool) -> int:
    """Write the resolved config into run.dir and the job folder, render the script and `sbatch` it; with
    `dry_run` print the script only."""
    from lens.launch import memory

    # The memory plan, as for Kubernetes: the table on stderr, exit 2 when gpu_memory is given and it cannot fit.
    table, _ = memory.check(cfg, values.nodes * values.procs_per_node, values.gpu_memory,
                            gpus=values.gpus_per_node > 0, gpu_key="gpu_memory")
    print(table, file=sys.stderr)
    folder = job_dir(cfg, values)
    config_path = str(folder / "config.yaml")
    script = render(cfg, values, config_path)
    if dry_run:
        sys.stdout.write(script)
        return 0
    if not shutil.which("sbatch"):
        raise InputError("sbatch not found: submit from a Slurm login node (or print the script with --dry-run)")
    from lens.storage import LocalStorage, open_storage

    text = to_yaml(cfg).encode()
    open_storage(cfg.run.dir, cfg.storage.endpoint_url).write_bytes("config.yaml", text)  # the run's record
    job = LocalStorage(folder)  # what the job reads: a shared folder every node sees
    job.write_bytes("config.yaml", text)
    job.write_bytes("job.sbatch", script.encode())
    out = subprocess.run(["sbatch", "--parsable", str(folder / "job.sbatch")], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr.strip(), file=sys.stderr)
        return out.returncode
    job_id = out.stdout.strip().split(";")[0]
    print(f"submitted job {job_id} ({cfg.run.name}): output {folder}/slurm-{job_id}.out; follow with "
          f"`python scripts/launch.py logs {cfg.run.name} --slurm`")
    return 0


# ------------------------------------------------------------------------------------------------ status/logs/delete


def _jobs(run: str) -> list[dict]:
    """Jobs named `run` that slurmctld still knows (pending, running, or recently ended), newest first."""
    if not shutil.which("scontrol"):
        raise InputError("scontrol not found: run on a Slurm login node")
    out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True)
    jobs = []
    for line in out.stdout.splitlines():
        job = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if job.get("JobName") == run:
            jobs.append(job)
    return sorted(jobs, key=lambda j: int(j["JobId"]), reverse=True)


def status(run: str) -> int:
    jobs = _jobs(run)
    for j in jobs:
        print(f"job {j['JobId']} {j['JobState']} restarts={j.get('Restarts')} exit={j.get('ExitCode')} "
              f"runtime={j.get('RunTime')} limit={j.get('TimeLimit')} nodes={j.get('NodeList')} "
              f"reason={j.get('Reason')} output={j.get('StdOut')}")
    if shutil.which("sacct"):  # older jobs, where accounting is enabled
        out = subprocess.run(["sacct", "-X", "-n", "--name", run, "-o", "JobID,State,ExitCode,Elapsed,End"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            print(out.stdout.rstrip())
            return 0
    if not jobs:
        print(f"no Slurm job named {run} is known to slurmctld", file=sys.stderr)
        return 1
    return 0


def logs(run: str) -> int:
    """Print the newest job's output, following it while the job is pending or running."""
    jobs = _jobs(run)
    path = Path(jobs[0]["StdOut"]) if jobs else None
    if path is None:
        outputs = sorted((Path("slurm") / run).glob("slurm-*.out"), key=lambda p: p.stat().st_mtime)
        if not outputs:
            print(f"no Slurm job named {run} is known to slurmctld, and no output in slurm/{run}/", file=sys.stderr)
            return 1
        path = outputs[-1]
    pos = 0
    while True:
        if path.exists():
            with path.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
            pos += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
        live = [j for j in _jobs(run) if j["JobId"] == jobs[0]["JobId"]] if jobs else []
        if not live or live[0]["JobState"] not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING"):
            return 0
        time.sleep(2)


def delete(run: str) -> int:
    live = [j["JobId"] for j in _jobs(run) if j["JobState"] in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING")]
    if not live:
        print(f"no pending or running Slurm job named {run}", file=sys.stderr)
        return 1
    out = subprocess.run(["scancel", *live])
    if out.returncode == 0:
        print(f"cancelled job {' '.join(live)} ({run}); run.dir and its checkpoints are kept")
    return out.returncode
