"""Slurm: `scripts/submit_with_config.sh` against a real Slurm (Debian's slurm-wlm: munged, slurmctld and slurmd on
127.0.0.1, started here with a private config, ports and state; skipped where they are not installed).

A tiny run is preempted twice, once by `scontrol requeue` and once by the `--signal` notice before its time limit
(brought forward with `scontrol update TimeLimit`), is requeued each time and finishes: the samples consumed at
every step and the final weights equal an uninterrupted run's. A bad config submits nothing (exit 2); a trainer
exiting 2 inside the job ends it without a requeue. The `--dry-run` script for conf/gemma2_2b.yaml on 2 nodes x 8
GPUs is accepted by `sbatch --test-only` against a partition of two 8-GPU nodes that only slurmctld knows about.

The trainer's workers are held (SIGSTOP) while a preemption is being delivered, so it lands mid-run whatever this
machine's speed: a tiny step takes milliseconds, and slurmctld checks time limits only every 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from lens.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
SUBMIT = REPO / "scripts" / "submit_with_config.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "lens1"
TIME_LIMIT_MIN, SIGNAL_S = 30, 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float = 120.0, every: float = 0.5, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{detail()}")


class Cluster:
    """munged + slurmctld + slurmd in the foreground, in one folder: node lens1 (4 CPU slots whatever this machine
    has, so two tiny jobs run side by side; no GPUs) in the default partition, and partition `gpu` of two 8-GPU
    nodes that only slurmctld knows (State=CLOUD: never started, but --test-only may place a job there)."""

    def __init__(self, root: Path):
        self.root = root
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (root / "state").mkdir()
        (root / "spool").mkdir()
        self.conf = root / "slurm.conf"
        self.conf.write_text(f"""ClusterName=lenstest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={NODE} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs=4 RealMemory=2000
NodeName=gpu[1-2] NodeAddr=127.0.0.2 CPUs=64 Gres=gpu:8 RealMemory=500000 State=CLOUD
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=gpu[1-2] MaxTime=INFINITE State=UP
""")
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs = [
            subprocess.Popen(["munged", "-F", "-f", f"--socket={root}/munge.sock", f"--key-file={key}",
                              f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
                              f"--seed-file={root}/munge.seed"], env=self.env, stderr=subprocess.DEVNULL),
        ]
        _wait("munged", lambda: (root / "munge.sock").exists(), 30)
        self.procs.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.procs.append(subprocess.Popen(["slurmd", "-D", "-N", NODE, "-f", str(self.conf)], env=self.env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait("node lens1 idle", lambda: self.run("sinfo", "-h", "-n", NODE, "-o", "%t").stdout.strip() == "idle", 60)

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, **kw)

    def job(self, job_id: str) -> dict:
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def queued(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i").stdout.split()

    def stop(self) -> None:
        jobs = self.queued()
        if jobs:  # slurmd leaves running jobs alone when it stops: end them first
            self.run("scancel", "--full", "--signal=KILL", *jobs)
            _wait("the queue to drain", lambda: not self.queued(), 90)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        pytest.skip(f"needs Debian's slurm-wlm and munge ({', '.join(missing)} not found; "
                    "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("slurmd launches jobs only as root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    yield c
    c.stop()


@pytest.fixture
def workdir(tmp_path, monkeypatch, cluster):
    """The submitting shell: cwd (job folders go to ./slurm/RUN), Slurm's config, a quiet offline trainer."""
    monkeypatch.chdir(tmp_path)
    for key, value in {"SLURM_CONF": str(cluster.conf), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                       "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                       "LENS_CACHE": str(tmp_path / "cache"), "PYTHON": str(Path(sys.executable))}.items():
        monkeypatch.setenv(key, value)
    return tmp_path


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], capture_output=True, text=True, timeout=300)


def write_config(workdir: Path, tiny_files, name: str, **sections) -> Path:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config(tiny_files, name, workdir / name, **sections)))
    return path


def job_id_of(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted job ")[1].split()[0]


def output(workdir: Path, name: str, job_id: str) -> str:
    path = workdir / "slurm" / name / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else ""


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()] or [0])


def workers(config: Path) -> list[int]:
    """The trainer processes of a job (torchrun's workers), found by their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in argv and b"train" in argv and b"torchrun" not in argv:  # not srun, the agent
            pids.append(int(proc.name))
    return pids


def hold(config: Path) -> list[int]:
    pids = _wait("the job's trainer", lambda: workers(config), 120)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def release(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def start_now_when_requeued(cluster: Cluster, job_id: str, restarts: int, log=lambda: "") -> None:
    """A requeued job waits about 2 minutes (BeginTime) before it may start again: start it in 3 s instead (slurmd
    refuses a launch within the second its previous credential was revoked), with the submitted time limit back."""
    _wait(f"requeue {restarts}", lambda: int(cluster.job(job_id).get("Restarts", 0)) >= restarts, 180,
          detail=lambda: f"{cluster.job(job_id)}\n{log()}")
    _wait("the job pending again", lambda: cluster.job(job_id)["JobState"] == "PENDING", 120)
    cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={TIME_LIMIT_MIN}")
    cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")


def seconds(hms: str) -> int:
    days, _, hms = hms.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    return int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))


def final_state(cluster: Cluster, job_id: str, timeout: float = 600) -> dict:
    return _wait("the job to end", lambda: (j := cluster.job(job_id))["JobState"] in
                 ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") and j, timeout, every=1)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.slow
def test_dry_run_for_gemma2_on_2_nodes_of_8_gpus_passes_sbatch_test_only(workdir, cluster):
    (workdir / "cluster.yaml").write_text(yaml.safe_dump(
        {"nodes": 2, "gpus_per_node": 8, "cpus_per_task": 32, "partition": "gpu", "time": "24:00:00",
         "setup": ["export NCCL_DEBUG=WARN"], "sbatch": ["--exclusive"]}))
    proc = submit(str(REPO / "conf" / "gemma2_2b.yaml"), "-f", "cluster.yaml", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --requeue",
                 "#SBATCH --signal=B:TERM@120", "#SBATCH --exclusive", "export NCCL_DEBUG=WARN"):
        assert line in script.splitlines(), line
    assert "--nproc-per-node=8 --rdzv-backend=c10d" in script and "--nnodes=2" in script
    test = cluster.run("sbatch", "--test-only", input=script)
    assert test.returncode == 0 and "to start at" in test.stderr and "gpu[1-2]" in test.stderr, test.stderr
    assert cluster.queued() == [] and not (workdir / "slurm").exists()  # nothing submitted, nothing written


@pytest.mark.parametrize("args, names", [
    (["train.max_stepz=3"], "did you mean train.max_steps"),
    (["layer_l=3"], "model.layer"),  # a key of the research code, answered
    (["-f", "bad-values.yaml"], "gpus_per_nodes"),
    (["-f", "bad-gpu.yaml"], "values.gpu_memory='eighty'"),  # the Slurm key, not the chart's
])
def test_bad_input_submits_nothing(workdir, cluster, tiny_files, args, names):
    (workdir / "bad-values.yaml").write_text("gpus_per_nodes: 8\n")
    (workdir / "bad-gpu.yaml").write_text("gpus_per_node: 1\ngpu_memory: eighty\n")
    config = write_config(workdir, tiny_files, "bad-input")
    proc = submit(str(config), *args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and names in proc.stderr, proc.stderr
    assert cluster.queued() == [] and not (workdir / "slurm").exists() and not (workdir / "bad-input").exists()


RESEARCH_KEYS = [  # a key of the research code this project replaces -> the key that replaces it
    ("layer_l=3", "model.layer"), ("t_text=4", "decoder.t_text"), ("batch_size=8", "train.batch_size"),
    ("learning_rate=0.1", "optim.lr"), ("max_train_steps=9", "train.max_steps"), ("lm_base_weight=1", "loss.lm_weight"),
    ("kl_base_weight=1", "loss.kl_weight"), ("mse_weight=1", "loss.mse_weight"),
    ("entropy_weight=0.1", "loss.entropy_weight"), ("resample_ablation=true", "loss.resample_ablation"),
    ("gradient_accumulation_steps=4", "train.micro_batch_size"), ("activation_dir=/x", "data.activations"),
    ("+dataset.on_the_fly.enabled=true", "data.on_the_fly"), ("model_name=gpt2", "model.name"),
    ("+trainable_components.decoder.base_model=true", "decoder.train_base"),
    ("+trainable_components.encoder.base_model=true", "encoder.train_base"),
    ("train.max_step=3", "did you mean train.max_steps?"), ("max_steps=3", "did you mean train.max_steps?"),
    ("loss.mse_wieght=1", "did you mean loss.mse_weight?"),
]


@pytest.mark.parametrize("override, answer", RESEARCH_KEYS)
def test_research_code_keys_and_typos_are_answered(tmp_path, override, answer):
    from lens.config import load_config
    from lens.errors import ConfigError

    path = tmp_path / "cfg.yaml"
    path.write_text("run: {name: answered}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, [override])
    assert answer in str(e.value) and str(e.value).count("\n") == 0, str(e.value)


def test_a_research_code_section_in_the_file_is_answered(tmp_path):
    from lens.config import load_config
    from lens.errors import ConfigError

    path = tmp_path / "cfg.yaml"
    path.write_text("trainable_components:\n  decoder: {base_model: true}\n  encoder: {base_model: true}\n")
    with pytest.raises(ConfigError, match="decoder.train_base for trainable_components.decoder.base_model; "
                       "encoder.train_base for trainable_components.encoder.base_model"):
        load_config(path)


@pytest.mark.slow
def test_status_and_delete_of_a_pending_run(workdir, cluster, tiny_files):
    config = write_config(workdir, tiny_files, "held")
    (workdir / "cluster.yaml").write_text(yaml.safe_dump({"sbatch": ["--hold"]}))  # stays pending
    job_id = job_id_of(submit(str(config), "-f", "cluster.yaml"))
    launch = [sys.executable, str(REPO / "scripts" / "launch.py")]
    status = subprocess.run([*launch, "status", "held", "--slurm"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and f"job {job_id} PENDING" in status.stdout, status.stdout + status.stderr
    delete = subprocess.run([*launch, "delete", "held", "--slurm"], capture_output=True, text=True, timeout=120)
    assert delete.returncode == 0 and f"cancelled job {job_id}" in delete.stdout, delete.stdout + delete.stderr
    assert cluster.job(job_id)["JobState"] == "CANCELLED" and job_id not in cluster.queued()


@pytest.mark.slow
def test_trainer_exit_2_in_the_job_is_not_requeued(workdir, cluster, tiny_files):
    config = write_config(workdir, tiny_files, "exit-two", model={"layer": 9})  # the tiny Llama has 4 blocks
    job_id = job_id_of(submit(str(config)))
    job = final_state(cluster, job_id)
    out = output(workdir, "exit-two", job_id)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0" and job["Restarts"] == "0", (job, out)
    assert "model.layer" in out and "bad input (exit 2): not requeued" in out, out
    logs = subprocess.run([sys.executable, str(REPO / "scripts" / "launch.py"), "logs", "exit-two", "--slurm"],
                          capture_output=True, text=True, timeout=60)
    assert logs.returncode == 0 and "bad input (exit 2)" in logs.stdout, logs.stderr


@pytest.mark.slow
def test_preempted_by_requeue_and_by_the_time_limit_signal_resumes_like_an_uninterrupted_run(
        workdir, cluster, tiny_files):
    # A tiny step takes ~20 ms: enough steps that the test's hold (polled) lands well before the last one, which
    # would save and exit 0 whatever notice came with it.
    train = {"max_steps": 120, "checkpoint_every": 5, "keep_checkpoints": 30}
    (workdir / "cluster.yaml").write_text(yaml.safe_dump({"time": str(TIME_LIMIT_MIN), "signal_s": SIGNAL_S}))
    # The uninterrupted run: the same job, alongside (one CPU each).
    reference_id = job_id_of(submit(str(write_config(workdir, tiny_files, "reference", train=train)),
                                    "-f", "cluster.yaml"))
    config = write_config(workdir, tiny_files, "preempted", train=train)
    run_dir = workdir / "preempted"
    job_config = workdir / "slurm" / "preempted" / "config.yaml"
    job_id = job_id_of(submit(str(config), "-f", "cluster.yaml"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["name"] == "preempted"

    # 1. Slurm preempts it: `scontrol requeue` SIGTERMs the steps; the trainer saves at its step boundary.
    _wait("step 4", lambda: steps_logged(run_dir) >= 4, 300, every=0.05)
    held = hold(job_config)
    assert cluster.run("scontrol", "requeue", job_id).returncode == 0
    release(held)
    start_now_when_requeued(cluster, job_id, 1, log=lambda: output(workdir, "preempted", job_id))

    # 2. The notice before the time limit: a limit that leaves less than signal_s reaches the batch shell.
    _wait("the requeued job to train", lambda: "SLURM_RESTART_COUNT=1" in output(workdir, "preempted", job_id)
          and steps_logged(run_dir) >= 8, 300, every=0.05)
    held = hold(job_config)
    # A whole-minute limit at least 120 s away but less than SIGNAL_S away: slurmctld sends the notice within 30 s,
    # which leaves the held trainer 90 s or more to save and the script to requeue before the limit ends the job.
    limit_min = -(-(seconds(cluster.job(job_id)["RunTime"]) + 120) // 60)
    assert cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={limit_min}").returncode == 0
    _wait("the --signal notice", lambda: "[slurm] SIGTERM" in
          output(workdir, "preempted", job_id).split("SLURM_RESTART_COUNT=1", 1)[1], 120)
    release(held)
    start_now_when_requeued(cluster, job_id, 2, log=lambda: output(workdir, "preempted", job_id))

    job = final_state(cluster, job_id)
    out = output(workdir, "preempted", job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", (job, out)
    assert int(job["Restarts"]) >= 2 and "SLURM_RESTART_COUNT=2" in out, out
    assert out.count("preemption notice") >= 2 and out.count("resumed from") >= 2, out
    assert "finished (train.max_steps reached): not requeued" in out
    reference = final_state(cluster, reference_id)
    assert reference["JobState"] == "COMPLETED" and reference["Restarts"] == "0", reference

    # Every step consumed the same samples with the same loss, and the final weights are the uninterrupted run's.
    def per_step(run: Path) -> dict:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["data/next_sample"], r["train/loss"]) for r in rows if "train/loss" in r}

    assert per_step(run_dir) == per_step(workdir / "reference")
    got, want = load_checkpoint(str(run_dir)), load_checkpoint(str(workdir / "reference"))
    assert got.step == want.step == 120
    assert sorted(got.weights) == sorted(want.weights)
    assert all(torch.equal(got.weights[k], want.weights[k]) for k in want.weights)

    status = subprocess.run([sys.executable, str(REPO / "scripts" / "launch.py"), "status", "preempted",
                             "--slurm"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"job {job_id} COMPLETED restarts={job['Restarts']}" in status.stdout, \
        status.stdout


@pytest.mark.slow
def test_a_run_on_dumped_activations_dumps_first_then_trains(workdir, cluster, tiny_files):
    acts = workdir / "acts"
    config = write_config(workdir, tiny_files, "from-dump", data={"on_the_fly": False, "activations": str(acts)},
                          train={"max_steps": 2, "checkpoint_every": 2})
    (workdir / "cluster.yaml").write_text(yaml.safe_dump({"procs_per_node": 2}))
    job_id = job_id_of(submit(str(config), "-f", "cluster.yaml"))
    job = final_state(cluster, job_id)
    out = output(workdir, "from-dump", job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", (job, out)
    assert any(acts.rglob("*manifest*")) and steps_logged(workdir / "from-dump") == 2, out
    assert load_checkpoint(str(workdir / "from-dump")).step == 2

