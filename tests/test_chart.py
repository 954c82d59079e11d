"""The Helm chart helm/consistency-lens: lint, strict validation of what it renders, and the semantics the operator,
torchrun and spot interruptions need, asserted on the rendered objects. Cases read "sets X when Y"."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from _chart_tools import CHART, CONFIG_NAMES, CRD_FILE, STRICT_JSON, ci_shape, config_paths, helm_env  # noqa: F401
from lens.config import load_config
from lens.errors import InputError
from lens.launch.cluster import parse_manifests, render
from lens.launch.schema import (check_manifests, sdk_round_trip_losses, strict_schema_from_file,
                                validate)
from lens.launch.values import chart_values, merge_values

SHAPES = ("default", "cpu-tiny", "gpu-reference", "on-the-fly")
OPERATOR_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
FLAG = "/dev/shm/lens-preempt"


@pytest.fixture(scope="session")
def crd_schema():
    return strict_schema_from_file(CRD_FILE) if CRD_FILE.exists() else None


def rendered(config, shape: dict | None = None, overrides: list[str] = ()) -> list[dict]:
    cfg = load_config(config, list(overrides))
    return parse_manifests(render(chart_values(cfg, shape or {}), cfg.run.name, "lens"))


def helm(helm_env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_env["LENS_HELM"], *args], capture_output=True, text=True, env=helm_env)


def template(helm_env, *args: str, release: str = "t") -> subprocess.CompletedProcess:
    return helm(helm_env, "template", release, str(CHART), "--kube-version", "1.31.0",
                "--api-versions", "kubeflow.org/v1/PyTorchJob", *args)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict]) -> list[dict]:
    """Every pod spec in the manifests: the PyTorchJob's replicas and the dump Job."""
    specs = [r["template"]["spec"] for j in by_kind(docs, "PyTorchJob")
             for r in j["spec"]["pytorchReplicaSpecs"].values()]
    return specs + [j["spec"]["template"]["spec"] for j in by_kind(docs, "Job")]


def trainer(docs: list[dict]) -> dict:
    (job,) = by_kind(docs, "PyTorchJob")
    return job


def container(job: dict) -> dict:
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    return c


# --- lint and strict validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, *SHAPES[1:]])
def test_lint_strict_is_clean(helm_env, values):
    args = ["-f", str(CHART / "ci" / f"{values}-values.yaml")] if values else []
    proc = helm(helm_env, "lint", "--strict", str(CHART), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_rendered_manifests_pass_strict_validation(helm_env, config_paths, crd_schema, name, shape):
    docs = rendered(config_paths[name], ci_shape(shape) if shape != "default" else None)
    assert {"ConfigMap", "ServiceAccount", "PyTorchJob"} <= {d["kind"] for d in docs}
    # Core kinds (and the PyTorchJob's pod template) with kubernetes-validate --strict, the PyTorchJob against the
    # operator's CRD schema made strict (when ../shared has it) and through the kubeflow-training SDK models.
    assert check_manifests(docs, crd_schema) == []
    if STRICT_JSON.exists():
        assert validate(trainer(docs), json.loads(STRICT_JSON.read_text())) == []


def test_kubernetes_validate_cli_passes_rendered_output(helm_env, config_paths, tmp_path):
    path = tmp_path / "manifests.yaml"
    path.write_text(render(chart_values(load_config(config_paths["gemma2_2b"]), ci_shape("gpu-reference")),
                           "gemma", "lens"))
    proc = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.31", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed for resource job/" in proc.stdout + proc.stderr


@pytest.mark.skipif(not CRD_FILE.exists(), reason=f"operator CRD not present at {CRD_FILE}")
def test_strict_schema_equals_the_published_strict_schema():
    ours = strict_schema_from_file(CRD_FILE)
    theirs = json.loads(STRICT_JSON.read_text())
    theirs.pop("title", None)
    assert ours == theirs


@pytest.mark.skipif(not CRD_FILE.exists(), reason=f"operator CRD not present at {CRD_FILE}")
def test_strict_schema_rejects_a_field_the_api_server_would_prune(helm_env, config_paths, crd_schema):
    job = trainer(rendered(config_paths["smollm2_135m"]))
    job["spec"]["elasticPolicy"]["rdzvBacknd"] = "c10d"
    container(job)["volumeMount"] = []
    errors = "\n".join(validate(job, crd_schema))
    assert "rdzvBacknd" in errors and "volumeMount" in errors


def test_sdk_round_trip_keeps_everything_and_catches_misspellings(helm_env, config_paths):
    job = trainer(rendered(config_paths["gemma2_2b"], ci_shape("gpu-reference")))
    assert sdk_round_trip_losses(job) == []
    job["spec"]["elasticPolcy"] = {}
    container(job)["envFrm"] = []
    losses = sdk_round_trip_losses(job)
    assert any("elasticPolcy" in x for x in losses) and any("envFrm" in x for x in losses)


# --- semantics -----------------------------------------------------------------------------------------------------

def test_trainer_is_elastic_torchrun_with_nothing_the_operator_owns(helm_env, config_paths):
    cfg = load_config(config_paths["gemma2_2b"])
    docs = rendered(config_paths["gemma2_2b"], ci_shape("gpu-reference"))
    job = trainer(docs)
    spec = job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]  # elastic: workers only, no Master
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode" and worker["replicas"] == 4  # exit 2 is not retried
    assert spec["runPolicy"]["backoffLimit"] >= 100
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvId": cfg.run.name, "minReplicas": 2,
                                     "maxReplicas": 4, "maxRestarts": 100,
                                     "rdzvConf": [{"key": "join_timeout", "value": "1800"}]}
    assert spec["nprocPerNode"] == "8"  # = GPUs per pod; the deprecated elasticPolicy.nProcPerNode is not used
    c = container(job)
    assert c["name"] == "pytorch"
    assert c["command"] == ["lens", "torchrun", "--no-python", "lens", "train", "/etc/lens/config.yaml"]
    names = [e["name"] for e in c["env"]]
    owned = [n for n in names if n.startswith(("PET_", "MASTER_")) or n in OPERATOR_ENV]
    assert owned == []
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LENS_RUN_NAME"] == cfg.run.name
    assert env["LENS_PREEMPT_FLAG"] == FLAG
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_sets_aws_endpoint_only_when_storage_endpoint_is_set(helm_env, config_paths):
    path = config_paths["smollm2_135m"]
    without = container(trainer(rendered(path, overrides=["storage.endpoint_url=null"])))
    assert "AWS_ENDPOINT_URL" not in [e["name"] for e in without["env"]]
    with_ = container(trainer(rendered(path, overrides=["storage.endpoint_url=http://minio.lens:9000"])))
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio.lens:9000"} in with_["env"]


def test_config_map_holds_the_resolved_config_mounted_at_etc_lens(helm_env, config_paths):
    cfg = load_config(config_paths["smollm2_135m"], ["train.max_steps=7"])
    docs = rendered(config_paths["smollm2_135m"], overrides=["train.max_steps=7"])
    (cm,) = by_kind(docs, "ConfigMap")
    stored = yaml.safe_load(cm["data"]["config.yaml"])
    assert stored["train"]["max_steps"] == 7 and stored["run"]["name"] == cfg.run.name
    for spec in pod_specs(docs):
        (config_volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
        assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
        assert {"name": "config", "mountPath": "/etc/lens", "readOnly": True} in spec["containers"][0]["volumeMounts"]


def test_pods_are_unprivileged_and_survive_spot_loss_quickly(helm_env, config_paths):
    docs = rendered(config_paths["gemma2_2b"], ci_shape("gpu-reference"))
    specs = pod_specs(docs)
    assert len(specs) == 2  # trainer and dump
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
        assert spec["automountServiceAccountToken"] is False
        # SIGKILL comes before the AWS 2-minute notice runs out.
        assert 60 <= spec["terminationGracePeriodSeconds"] < 120
        lost = {t["key"]: t for t in spec["tolerations"] if t["key"].startswith("node.kubernetes.io/")}
        assert set(lost) == {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
        assert all(t["effect"] == "NoExecute" and 30 <= t["tolerationSeconds"] <= 60 for t in lost.values())
        assert spec["priorityClassName"] == "lens-training"
        (shm,) = [v for v in spec["volumes"] if v["name"] == "shm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]


CACHE_VARS = ("HF_HOME", "LENS_CACHE", "LENS_SCRATCH", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "WANDB_CACHE_DIR",
              "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_DIR", "XDG_CACHE_HOME")


def test_root_is_read_only_and_every_cache_is_on_a_writable_volume(helm_env, config_paths):
    docs = rendered(config_paths["gemma2_2b"], ci_shape("gpu-reference"))
    for spec in pod_specs(docs):
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            writable = [m["mountPath"] for m in c["volumeMounts"]
                        if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
            env = {e["name"]: e.get("value") for e in c["env"]}
            for name in CACHE_VARS:
                assert any(env[name].startswith(path + "/") for path in writable), (name, env[name], writable)
            (cache,) = [v for v in spec["volumes"] if v["name"] == "cache"]
            assert cache["emptyDir"]["sizeLimit"] == "100Gi"


@pytest.mark.parametrize("model_cache, volume", [
    ({"hostPath": "/mnt/nvme/lens-models"}, {"hostPath": {"path": "/mnt/nvme/lens-models", "type": "Directory"}}),
    ({"persistentVolumeClaim": "lens-models"}, {"persistentVolumeClaim": {"claimName": "lens-models"}}),
    ({}, None),
])
def test_model_cache_volume_holds_the_local_copy_of_the_model_mirror(helm_env, config_paths, crd_schema, model_cache,
                                                                     volume):
    docs = rendered(config_paths["gemma2_2b"], merge_values(ci_shape("gpu-reference"), {"modelCache": model_cache}))
    assert check_manifests(docs, crd_schema) == []
    specs = pod_specs(docs)
    assert len(specs) == 2  # the workers and the data Job: both load the model
    for spec in specs:
        volumes = {v["name"]: v for v in spec["volumes"]}
        (c,) = spec["containers"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        if volume is None:
            assert "model-cache" not in volumes and "model-cache" not in mounts
            continue
        assert volumes["model-cache"] == {"name": "model-cache", **volume}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert mounts["model-cache"] == env["LENS_CACHE"] + "/models"  # where lens/models/mirror.py copies it


@pytest.mark.parametrize("grace", [45, 110, 600])
def test_prestop_hook_raises_the_flag_and_waits_for_the_checkpoint(helm_env, config_paths, tmp_path, grace):
    """The trainer's preStop hook, run for real: it writes the flag, returns once the trainer removed it (after its
    checkpoint), and its longest wait plus the trainer's budget fit the grace period with torchrun's 30 s."""
    path = config_paths["gemma2_2b"]
    docs = rendered(path, merge_values(ci_shape("gpu-reference"), {"preemption": {"terminationGracePeriodSeconds": grace}}))
    job = trainer(docs)
    spec = job["spec"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] == "ExitCode"
    assert spec["elasticPolicy"]["maxRestarts"] >= 10  # each spot loss costs one worker-group restart
    pod = spec["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == grace
    c = container(job)
    env = {e["name"]: e.get("value") for e in c["env"]}
    budget = int(env["LENS_PREEMPT_GRACE_S"])
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["/bin/sh", "-c"] and env["LENS_PREEMPT_FLAG"] == FLAG
    wait = int(re.search(r"-lt (\d+) \]", hook[2]).group(1))
    assert 0 < budget < wait and wait + 30 <= grace  # torchrun gets 30 s after SIGTERM to stop its workers
    flag = tmp_path / "lens-preempt"
    script = hook[2].replace(FLAG, str(flag))
    proc = subprocess.Popen(hook[:2] + [script])
    deadline = time.monotonic() + 10
    while not (flag.exists() and flag.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    assert abs(int(flag.read_text()) - time.time()) < 5  # the flag holds when the notice came
    time.sleep(1.5)
    assert proc.poll() is None  # still waiting for the checkpoint
    flag.unlink()  # what the trainer does once saved
    assert proc.wait(timeout=5) == 0
    dump_pods = [d for d in docs if d["kind"] == "Job"]
    assert dump_pods and all("lifecycle" not in c for c in dump_pods[0]["spec"]["template"]["spec"]["containers"])


def test_grace_period_too_short_for_torchrun_is_rejected(helm_env, config_paths):
    with pytest.raises(InputError, match=r"terminationGracePeriodSeconds.*45"):
        rendered(config_paths["smollm2_135m"], {"preemption": {"terminationGracePeriodSeconds": 30}})


@pytest.mark.parametrize("preset, selector, toleration", [
    ("none", None, None),
    ("karpenter", {"karpenter.sh/capacity-type": "spot"}, None),
    ("eks", {"eks.amazonaws.com/capacityType": "SPOT"}, None),
    ("gke", {"cloud.google.com/gke-spot": "true"}, "cloud.google.com/gke-spot"),
])
def test_spot_preset_sets_node_selector_and_tolerations(helm_env, config_paths, preset, selector, toleration):
    shape = {"spot": {"preset": preset}, "nodeSelector": {"pool": "gpu"}}
    docs = rendered(config_paths["smollm2_135m"], shape)
    spec = pod_specs(docs)[0]
    assert spec["nodeSelector"] == {"pool": "gpu", **(selector or {})}
    keys = [t["key"] for t in spec["tolerations"]]
    assert "nvidia.com/gpu" in keys  # the default shape requests a GPU
    assert (toleration in keys) if toleration else not any("spot" in k for k in keys)
    annotations = trainer(docs)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"].get("annotations", {})
    assert (annotations.get("karpenter.sh/do-not-disrupt") == "true") == (preset == "karpenter")


def test_no_secret_values_anywhere_only_references(helm_env, config_paths):
    fake = {"wandb": {"existingSecret": "fake-wandb"}, "huggingface": {"existingSecret": "fake-hf"},
            "aws": {"existingSecret": "fake-aws"}}
    docs = rendered(config_paths["gemma2_2b"], {"secrets": fake})
    assert by_kind(docs, "Secret") == []
    credentials = {"WANDB_API_KEY": "fake-wandb", "HF_TOKEN": "fake-hf", "AWS_ACCESS_KEY_ID": "fake-aws",
                   "AWS_SECRET_ACCESS_KEY": "fake-aws"}
    for spec in pod_specs(docs):
        for c in spec["containers"]:
            assert "envFrom" not in c
            refs = {e["name"]: e for e in c["env"] if e["name"] in credentials}
            assert set(refs) == set(credentials)
            for name, e in refs.items():
                assert "value" not in e and e["valueFrom"]["secretKeyRef"]["name"] == credentials[name]
    # A value is never accepted: the schema has no place for one, and extraEnv refuses credential names.
    assert template(helm_env, "--set", "secrets.wandb.apiKey=sk-not-a-real-key").returncode != 0
    proc = template(helm_env, "--set", "extraEnv.AWS_SECRET_ACCESS_KEY=not-a-real-key")
    assert proc.returncode != 0 and "extraEnv.AWS_SECRET_ACCESS_KEY" in proc.stderr
    assert "not-a-real-key" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("on_the_fly", [True, False])
def test_dump_job_is_rendered_only_when_activations_come_from_a_dump(helm_env, config_paths, on_the_fly):
    overrides = [f"data.on_the_fly={str(on_the_fly).lower()}", "data.activations=s3://lens-acts/x"]
    docs = rendered(config_paths["smollm2_135m"], {"dump": {"completions": 6, "parallelism": 3}}, overrides)
    jobs = by_kind(docs, "Job")
    if on_the_fly:
        assert jobs == []
        return
    (job,) = jobs
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 6, 3)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"] == ["lens", "dump", "/etc/lens/config.yaml"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LENS_DUMP_WORKERS"] == "6"
    assert "JOB_COMPLETION_INDEX" not in env  # the Job controller sets it per pod
    actions = {r["action"] for r in spec["podFailurePolicy"]["rules"]}
    assert actions == {"FailJob", "Ignore"}  # exit 2 (bad input) fails fast; preemption is not a failure


@pytest.mark.parametrize("args, named", [
    (["--set", "workers.replica=2"], "replica"),
    (["--set", "spot.presett=gke"], "presett"),
    (["--set", "spot.preset=aws"], "preset"),
    (["--set", "topLevelTypo=1"], "topLevelTypo"),
    (["--set", "run.name=9lives"], "name"),
    (["--set", "modelCache.hostPath=relative/dir"], "modelCache.hostPath"),
    (["--set", "modelCache.persistentVolumeClaim=Models_PVC"], "modelCache.persistentVolumeClaim"),
])
def test_values_schema_rejects_misspelled_or_invalid_values(helm_env, args, named):
    proc = template(helm_env, *args)
    assert proc.returncode != 0 and named in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "workers.minReplicas=3"], "minReplicas (3) <= replicas (1)"),
    (["--set", "dump.parallelism=9"], "dump.parallelism (9)"),
    (["--set", "extraEnv.PET_NNODES=4"], "extraEnv.PET_NNODES"),
    (["--set", "extraEnv.MASTER_ADDR=x"], "extraEnv.MASTER_ADDR"),
    # values that look like credentials are never stored in the manifest: a Secret reference instead
    (["--set", "extraEnv.GITHUB_TOKEN=x"], "extraEnv.GITHUB_TOKEN: looks like a credential"),
    (["--set", "extraEnv.DB_PASSWORD=x"], "extraEnv.DB_PASSWORD: looks like a credential"),
    (["--set", "extraEnv.CLIENT_SECRET=x"], "extraEnv.CLIENT_SECRET: looks like a credential"),
    (["--set", "extraEnv.STRIPE_KEY=x"], "extraEnv.STRIPE_KEY: looks like a credential"),
    (["--set", "extraEnv.PROXY_URL=http://me:pw@proxy:3128"], "extraEnv.PROXY_URL: a URL with user:password@"),
    (["--set", "storage.endpointUrl=http://ak:sk@minio:9000"], "storage.endpointUrl: a URL with user:password@"),
    (["--set", "modelCache.hostPath=/mnt/models", "--set", "modelCache.persistentVolumeClaim=models"],
     "modelCache: set hostPath or persistentVolumeClaim, not both"),
])
def test_cross_field_checks_fail_naming_the_key(helm_env, args, message):
    proc = template(helm_env, *args)
    assert proc.returncode != 0 and message in proc.stderr


def test_extra_env_takes_a_secret_reference_for_a_credential_name(helm_env):
    proc = template(helm_env, "--set", "extraEnv.GITHUB_TOKEN.valueFrom.secretKeyRef.name=gh",
                    "--set", "extraEnv.GITHUB_TOKEN.valueFrom.secretKeyRef.key=token", "--set", "extraEnv.PLAIN=1")
    assert proc.returncode == 0, proc.stderr
    job = next(d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PyTorchJob")
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["GITHUB_TOKEN"] == {"name": "GITHUB_TOKEN",
                                   "valueFrom": {"secretKeyRef": {"name": "gh", "key": "token"}}}
    assert env["PLAIN"] == {"name": "PLAIN", "value": "1"}


def test_objects_carry_recommended_labels(helm_env, config_paths):
    for doc in rendered(config_paths["gemma2_2b"]):
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (doc["kind"], key)


def test_notes_print_the_logs_command_for_the_worker_pods_and_the_wandb_run(helm_env, tmp_path):
    # `helm template` does not print NOTES.txt and `helm install --dry-run` needs a cluster: render it through a
    # copy of the chart where NOTES.txt is also a file that a manifest template expands with `tpl`.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'notes: |\n{{ tpl (.Files.Get "notes.txt") . | indent 2 }}\n')
    proc = helm(helm_env, "template", "ci-gpu-reference", str(chart), "-n", "lens", "--kube-version", "1.31.0",
                "-f", str(CHART / "ci" / "gpu-reference-values.yaml"), "--show-only", "templates/zz-notes.yaml")
    assert proc.returncode == 0, proc.stderr
    notes = yaml.safe_load(proc.stdout)["notes"]
    selector = "app.kubernetes.io/instance=ci-gpu-reference,app.kubernetes.io/component=trainer"
    assert f"kubectl logs -n lens -l {selector} -f --prefix --max-log-requests 5" in notes
    assert "https://wandb.ai/lens-team/consistency-lens/runs/ci-gpu-reference" in notes
    # The selector matches the worker pods' labels.
    docs = parse_manifests(template(helm_env, "-f", str(CHART / "ci" / "gpu-reference-values.yaml"),
                                    release="ci-gpu-reference").stdout)
    labels = trainer(docs)["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in (kv.split("=") for kv in selector.split(",")))


def test_helm_package_renders_the_same_objects(helm_env, tmp_path):
    packaged = helm(helm_env, "package", str(CHART), "-d", str(tmp_path))
    assert packaged.returncode == 0, packaged.stderr
    (tgz,) = tmp_path.glob("consistency-lens-*.tgz")
    args = ["--namespace", "lens", "--kube-version", "1.31.0", "--api-versions", "kubeflow.org/v1/PyTorchJob",
            "-f", str(CHART / "ci" / "gpu-reference-values.yaml")]
    from_dir = helm(helm_env, "template", "r", str(CHART), *args)
    from_tgz = helm(helm_env, "template", "r", str(tgz), *args)
    assert from_dir.returncode == 0 and from_tgz.returncode == 0, from_dir.stderr + from_tgz.stderr
    assert parse_manifests(from_tgz.stdout) == parse_manifests(from_dir.stdout)
    assert any(d["kind"] == "PyTorchJob" for d in parse_manifests(from_tgz.stdout))


@pytest.mark.slow
def test_an_installed_package_carries_its_chart(helm_env, config_paths, tmp_path):
    """pip install of the project (not editable) into a bare folder: the launcher there renders its own copy of
    the chart, with no checkout next to it."""
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                              "--target", str(target), str(CHART.parents[1])], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "lens" / "launch" / "chart" / "templates" / "pytorchjob.yaml").is_file()
    code = ("import sys; from lens.launch.cluster import CHART, render; from lens.launch.values import chart_values;"
            "from lens.config import load_config; cfg = load_config(sys.argv[1]); print(CHART);"
            "print(render(chart_values(cfg, {}), cfg.run.name, 'lens'))")
    proc = subprocess.run([sys.executable, "-c", code, str(config_paths["gemma2_2b"])], capture_output=True,
                          text=True, cwd=tmp_path, env={**helm_env, "PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    chart_dir, manifests = proc.stdout.split("\n", 1)
    assert chart_dir == str(target / "lens" / "launch" / "chart")
    assert any(d["kind"] == "PyTorchJob" for d in parse_manifests(manifests))
