"""Chaos: faults during one elastic training run in local emulation, and the result is the uninterrupted run's.

Two torchrun agents (the chart's Worker replicas, minReplicas 1) train the tiny lens with checkpoints in a real S3
server on loopback (moto, behind a proxy that can hold an upload). At seeded random steps the run loses a worker
(SIGKILL), a whole node (agent and workers, back after a pause long enough for the survivor to continue alone), a
node to a spot reclaim (preStop hook, SIGTERM), and a worker in the middle of a checkpoint upload. Pods come back as
the operator would bring them back (`WorkerGroup`). Then: the same samples were consumed as by an uninterrupted run,
the weights and optimizer state are bitwise equal where the world size never changed and within 1e-5 after it did,
and no fault (nor the re-joins after them) lost more than one checkpoint interval. Both ways of spreading the lens
go through it: DDP over frozen bases, and FSDP (`train.parallel=fsdp`) sharding trainable bases.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from _chart_tools import helm_env  # noqa: F401
from conftest import tiny_run_config
from lens.config import load_config
from lens.launch import local_manifests
from _chaos import S3_TEST_ENV, ChaosRun, FaultProxy, S3Server
from lens.train.checkpoint import load_checkpoint

EVERY, BATCH = 10, 12


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos-s3")
    server = S3Server(root / "moto.log")
    server.client().create_bucket(Bucket="chaos")
    proxy = FaultProxy(server.port)
    yield {"server": server, "proxy": proxy, "endpoint": f"http://127.0.0.1:{proxy.port}"}
    proxy.release()
    server.stop()


@pytest.fixture
def env(monkeypatch, helm_env, tmp_path):  # noqa: F811
    for key, value in {**helm_env, **S3_TEST_ENV, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                       "OMP_NUM_THREADS": "1", "LENS_CACHE": str(tmp_path / "cache"),
                       "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


# How the lens is spread over the ranks: (steps, whether the faults strike twice, config sections). DDP over frozen
# bases (the default); FSDP sharding trainable bases (train.parallel=fsdp holds at world 1 too, when the survivor
# trains alone), one fault of each kind in half the steps, as its steps and restarts are slower.
PARALLEL = {"ddp": (240, True, {}),
            "fsdp": (120, False, {"decoder": {"train_base": True}, "encoder": {"train_base": True}})}


def manifests(tiny_files, s3, tmp_path, name: str, parallel: str) -> list[dict]:
    steps, _, sections = PARALLEL[parallel]
    cfg = tiny_run_config(tiny_files, name, f"s3://chaos/{name}",
                          optim={"lr": 3e-3, "warmup": "1s", "decay": "constant"},
                          train={"max_steps": steps, "batch_size": BATCH, "micro_batch_size": 3,
                                 "checkpoint_every": EVERY, "keep_checkpoints": 100, "log_every": 1,
                                 "eval_every": 0, "collective_timeout": 60, "parallel": parallel},
                          **sections)
    cfg["storage"] = {"endpoint_url": s3["endpoint"]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # Elastic between 1 and 2 nodes: a node lost for long enough leaves the other training alone.
    return local_manifests(load_config(path), {"workers": {"minReplicas": 1, "maxReplicas": 2}}, workers=2)


def consumed(metrics_file) -> dict[int, dict]:
    """Per step, the last logged row: what the run's final history holds for it."""
    rows = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            rows[row["step"]] = row
    return rows


def rel_diff(a: dict, b: dict) -> float:
    keys = sorted(a)
    assert keys == sorted(b)
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in keys)
    den = sum(float(a[k].double().pow(2).sum()) for k in keys)
    return (num / den) ** 0.5


def optimizer_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {f"{i}/{k}": v for i, per in state["state"].items() for k, v in per.items() if torch.is_tensor(v)}


def bitwise(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].view(-1).view(torch.uint8).equal(b[k].view(-1).view(torch.uint8))
                                        for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", list(PARALLEL))
def test_faults_during_training_change_nothing(tiny_files, s3, env, tmp_path, monkeypatch, parallel):
    endpoint = s3["server"].endpoint
    steps, repeats, _ = PARALLEL[parallel]
    calm_name, chaos_name = f"calm-{parallel}", f"chaos-{parallel}"  # run dirs in the module's one bucket
    # The uninterrupted run: two nodes throughout.
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path / "base")  # where rank 0 writes metrics.jsonl (wandb-local/: run.dir is on S3)
    with ChaosRun(manifests(tiny_files, s3, tmp_path, calm_name, parallel),
                  tmp_path / "base" / "wandb-local" / "events.jsonl", echo=True) as run:
        assert run.finish(600) == 0
        calm_events = run.events
    calm_rows = consumed(tmp_path / "base" / "wandb-local" / "metrics.jsonl")

    (tmp_path / "chaos").mkdir()
    monkeypatch.chdir(tmp_path / "chaos")
    rng = random.Random(7)
    targets = sorted(rng.sample(range(4, steps // 2), 6))
    with ChaosRun(manifests(tiny_files, s3, tmp_path, chaos_name, parallel),
                  tmp_path / "chaos" / "wandb-local" / "events.jsonl", echo=True, seed=7) as run:
        run.wait_step(targets[0])
        run.kill_worker()
        run.wait_step(targets[1])
        run.kill_during_upload(s3["proxy"])
        run.wait_step(targets[2])
        run.preempt_node(down_s=1.0)
        run.wait_step(targets[3])
        lost_node = run.kill_node(down_s=None)  # no spot capacity: the survivor re-forms alone and trains
        mark = len(run.events)
        run.restore_node(run.lost)
        run.wait_world(2, since=mark)  # the replacement pod joined
        if repeats:
            run.wait_step(targets[4])
            run.kill_worker()
            run.wait_step(targets[5])
            run.kill_node(down_s=1.0)
        assert run.finish(600) == 0
        faults, events = run.faults, run.events

    report = "\n".join(f"{f.kind}: at step {f.at_step}, resumed {f.resumed_step} with {f.world} processes, "
                       f"recovered in {f.recovery_s:.1f} s" for f in faults)
    print(report)
    assert len(faults) >= (5 if repeats else 4) and {f.kind for f in faults} == {
        "worker SIGKILL", "node lost", "SIGTERM (preemption)", "SIGKILL during checkpoint upload"}, report
    assert lost_node.world == 1, report  # the survivor trained alone: the world size changed
    # Every start of both runs (the survivor's alone included) trained in the mode under test.
    starts = [e for e in calm_events + events if e.kind == "start"]
    assert {e.fields["parallel"] for e in starts} == {parallel} and {e.world for e in starts} == {1, 2}, report
    # The preemption came through the preStop hook's flag, with the chart's budget (not torchrun's 30 s).
    assert any(e.kind == "preemption" and e.fields["seconds_left"] > 30 for e in events), report
    for f in faults:
        assert 0 <= f.steps_lost <= EVERY, report
        if f.kind == "SIGTERM (preemption)":
            assert f.steps_lost == 0, report  # saved at the step boundary it reached
    # Every restart, re-joins included, resumed within one checkpoint interval of where the run was.
    resumes = [i for i, e in enumerate(events) if e.kind == "start"]
    for i in resumes[1:]:
        reached = max(e.step for e in events[:i] if e.kind == "step")
        assert reached - events[i].step <= EVERY, (reached, events[i])

    # The same samples, in the same order, as the uninterrupted run; the same losses.
    rows = consumed(tmp_path / "chaos" / "wandb-local" / "metrics.jsonl")
    assert sorted(rows) == sorted(calm_rows) == list(range(1, steps + 1))
    assert [rows[s]["data/next_sample"] for s in rows] == [calm_rows[s]["data/next_sample"] for s in rows]
    assert [rows[s]["data/next_sample"] for s in sorted(rows)] == [BATCH * s for s in range(1, steps + 1)]
    first_alone = min(e.step for e in events if e.kind == "start" and e.world == 1)
    for s in range(1, steps + 1):
        if s <= first_alone:  # world size 2 all the way: bitwise
            assert rows[s]["train/loss"] == calm_rows[s]["train/loss"], s
        else:
            assert rows[s]["train/loss"] == pytest.approx(calm_rows[s]["train/loss"], rel=1e-4), s

    # Checkpoints made before the world first changed are bitwise the uninterrupted run's; the final one is
    # equal up to float summation order.
    calm_dir, chaos_dir = f"s3://chaos/{calm_name}", f"s3://chaos/{chaos_name}"
    before = (first_alone // EVERY) * EVERY
    assert before >= EVERY
    a = load_checkpoint(f"{chaos_dir}/checkpoints/step-{before:08d}", endpoint)
    b = load_checkpoint(f"{calm_dir}/checkpoints/step-{before:08d}", endpoint)
    assert bitwise(a.weights, b.weights) and bitwise(optimizer_tensors(a.optimizer_state),
                                                     optimizer_tensors(b.optimizer_state))
    a, b = load_checkpoint(chaos_dir, endpoint), load_checkpoint(calm_dir, endpoint)
    assert a.step == b.step == steps and a.state["cursor"] == b.state["cursor"] == {"next": BATCH * steps}
    assert rel_diff(a.weights, b.weights) < 1e-5
    assert rel_diff(optimizer_tensors(a.optimizer_state), optimizer_tensors(b.optimizer_state)) < 1e-5
