"""scripts/launch.py and lens.launch: config -> values (pure), --dry-run end to end, exit codes, and the cluster
calls with stand-in helm/kubectl and API clients (there is no cluster here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from _chart_tools import CONFIG_NAMES, CRD_FILE, ROOT, config_paths, helm_env  # noqa: F401
from lens.config import load_config
from lens.errors import ConfigError, InputError
from lens.launch import cluster
from lens.launch.cluster import parse_manifests
from lens.launch.schema import check_manifests, strict_schema_from_file
from lens.launch.values import chart_values

LAUNCH = ROOT / "scripts" / "launch.py"


def launch(helm_env, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LAUNCH), *args], capture_output=True, text=True,
                          env={**helm_env, **(env or {})}, cwd=ROOT)


def launch_main():
    spec = importlib.util.spec_from_file_location("launch_script", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# --- values: a pure function of the config -------------------------------------------------------------------------

def test_chart_values_come_from_the_config(config_paths):
    cfg = load_config(config_paths["smollm2_135m"], ["storage.endpoint_url=http://s3.local:9000",
                                                     "wandb.entity=team", "train.max_steps=11"])
    values = chart_values(cfg)
    assert values["run"] == {"name": cfg.run.name}
    assert yaml.safe_load(values["config"])["train"]["max_steps"] == 11
    assert values["dump"] == {"enabled": not cfg.data.on_the_fly}
    assert values["storage"] == {"endpointUrl": "http://s3.local:9000"}
    assert values["wandb"] == {"project": cfg.wandb.project, "entity": "team"}
    assert chart_values(cfg) == values  # pure


def test_chart_values_merge_the_cluster_shape_but_not_over_the_run(config_paths):
    cfg = load_config(config_paths["smollm2_135m"])
    values = chart_values(cfg, {"workers": {"replicas": 3}, "dump": {"completions": 8}})
    assert values["workers"] == {"replicas": 3}
    assert values["dump"] == {"enabled": not cfg.data.on_the_fly, "completions": 8}
    with pytest.raises(ConfigError, match="values.run"):
        chart_values(cfg, {"run": {"name": "another-run"}})


def test_config_refuses_a_run_name_kubernetes_cannot_use(config_paths):
    with pytest.raises(ConfigError, match="run.name.*DNS-1035"):
        load_config(config_paths["smollm2_135m"], ["run.name=9lives"])


# --- scripts/launch.py ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_dry_run_prints_valid_manifests(helm_env, config_paths, name):
    args = [str(config_paths[name]), "--dry-run", "train.max_steps=5"]
    env = {"LENS_PYTORCHJOB_CRD": str(CRD_FILE)} if CRD_FILE.exists() else {}
    proc = launch(helm_env, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    docs = parse_manifests(proc.stdout)
    cfg = load_config(config_paths[name])
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "ServiceAccount", "PyTorchJob"} <= kinds
    assert ("Job" in kinds) == (not cfg.data.on_the_fly)
    assert check_manifests(docs, strict_schema_from_file(CRD_FILE) if CRD_FILE.exists() else None) == []
    assert "strict CRD schema" in proc.stderr if CRD_FILE.exists() else "kubeflow-training SDK" in proc.stderr
    assert yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["config.yaml"])[
        "train"]["max_steps"] == 5


def test_dry_run_with_a_values_file_and_values_out(helm_env, config_paths, tmp_path):
    shape = tmp_path / "cluster.yaml"
    shape.write_text(yaml.safe_dump({"workers": {"replicas": 2, "maxReplicas": 2}, "spot": {"preset": "gke"}}))
    out = tmp_path / "values.yaml"
    proc = launch(helm_env, str(config_paths["smollm2_135m"]), "--dry-run", "-f", str(shape), "--values-out",
                  str(out))
    assert proc.returncode == 0, proc.stderr
    job = next(d for d in parse_manifests(proc.stdout) if d["kind"] == "PyTorchJob")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    values = yaml.safe_load(out.read_text())
    assert values["spot"] == {"preset": "gke"} and values["run"]["name"] == job["spec"]["elasticPolicy"]["rdzvId"]


def test_dry_run_never_copies_secrets_from_the_environment(helm_env, config_paths):
    secret = "sk-this-must-not-appear-0123456789"
    proc = launch(helm_env, str(config_paths["gemma2_2b"]), "--dry-run",
                  env={"WANDB_API_KEY": secret, "AWS_SECRET_ACCESS_KEY": secret, "HF_TOKEN": secret})
    assert proc.returncode == 0, proc.stderr
    assert secret not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args, named", [
    (["train.max_stepz=5"], "train.max_stepz"),
    (["modle.layer=3"], "modle"),
])
def test_unknown_config_key_exits_2_naming_it(helm_env, config_paths, args, named):
    proc = launch(helm_env, str(config_paths["smollm2_135m"]), "--dry-run", *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0]


def test_misspelled_chart_value_exits_2_naming_it(helm_env, config_paths, tmp_path):
    shape = tmp_path / "cluster.yaml"
    shape.write_text("workers:\n  replicaz: 2\n")
    proc = launch(helm_env, str(config_paths["smollm2_135m"]), "--dry-run", "-f", str(shape))
    assert proc.returncode == 2 and "replicaz" in proc.stderr and proc.stdout == ""


def test_missing_helm_exits_2(helm_env, config_paths, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LENS_HELM")
    monkeypatch.setattr(cluster, "ROOT", tmp_path)  # no .tools/bin either
    assert launch_main()([str(config_paths["smollm2_135m"]), "--dry-run"]) == 2
    assert "helm not found" in capsys.readouterr().err


def test_local_flags_are_checked_first(helm_env, config_paths, capsys):
    """--local itself runs end to end in test_local.py; here only the argument checks (exit 2, nothing run)."""
    assert launch_main()([str(config_paths["smollm2_135m"]), "--local", "--dry-run"]) == 2
    assert "--local and --dry-run" in capsys.readouterr().err
    assert launch_main()([str(config_paths["smollm2_135m"]), "--workers", "2"]) == 2
    assert "--workers is for --local" in capsys.readouterr().err


# --- cluster calls, with stand-ins -----------------------------------------------------------------------------------

@pytest.fixture
def recorded_tools(monkeypatch, tmp_path):
    """helm and kubectl replaced by scripts that record their arguments and HELM_DRIVER."""
    log = tmp_path / "calls.log"
    for name in ("helm", "kubectl"):
        tool = tmp_path / name
        tool.write_text(f'#!/bin/sh\necho "{name} HELM_DRIVER=$HELM_DRIVER $*" >> {log}\n')
        tool.chmod(0o755)
        monkeypatch.setenv(f"LENS_{name.upper()}", str(tool))
    monkeypatch.delenv("HELM_DRIVER", raising=False)
    return log


def test_status_and_delete_call_helm_and_kubectl(recorded_tools):
    main = launch_main()
    assert main(["status", "my-run", "-n", "lens"]) == 0
    assert main(["delete", "my-run", "--namespace", "lens"]) == 0
    calls = recorded_tools.read_text().splitlines()
    assert calls == [
        "helm HELM_DRIVER=configmap status my-run --namespace lens",
        "kubectl HELM_DRIVER= get pytorchjobs,jobs,pods --namespace lens -l app.kubernetes.io/instance=my-run -o wide",
        "helm HELM_DRIVER=configmap uninstall my-run --namespace lens",
    ]


class _ApiException(Exception):
    def __init__(self, status):
        self.status = status


def _fake_kube(crd: dict | None):
    def read(name, _preload_content):
        assert name == "pytorchjobs.kubeflow.org" and _preload_content is False
        if crd is None:
            raise _ApiException(404)
        return SimpleNamespace(data=json.dumps(crd).encode())

    return SimpleNamespace(exceptions=SimpleNamespace(ApiException=_ApiException),
                           ApiextensionsV1Api=lambda: SimpleNamespace(read_custom_resource_definition=read))


def test_install_refuses_a_cluster_without_the_pytorchjob_crd(monkeypatch):
    monkeypatch.setattr(cluster, "_kube", lambda: _fake_kube(None))
    with pytest.raises(InputError, match="pytorchjobs.kubeflow.org is not installed"):
        cluster.install({}, "run", "lens", [])


@pytest.mark.skipif(not CRD_FILE.exists(), reason=f"operator CRD not present at {CRD_FILE}")
def test_schema_read_from_the_cluster_is_the_strict_crd_schema(monkeypatch):
    crd = next(d for d in yaml.load_all(CRD_FILE.read_text(), Loader=yaml.CSafeLoader) if d)
    monkeypatch.setattr(cluster, "_kube", lambda: _fake_kube(crd))
    assert cluster.pytorchjob_schema_from_cluster() == strict_schema_from_file(CRD_FILE)


def test_install_validates_then_upgrades_idempotently(helm_env, config_paths, recorded_tools, monkeypatch):
    cfg = load_config(config_paths["smollm2_135m"])
    values = chart_values(cfg)
    monkeypatch.setenv("LENS_HELM", helm_env["LENS_HELM"])  # the real helm renders; the recording one installs
    docs = parse_manifests(cluster.render(values, cfg.run.name, "lens"))
    monkeypatch.setenv("LENS_HELM", str(recorded_tools.parent / "helm"))
    steps = []
    monkeypatch.setattr(cluster, "pytorchjob_schema_from_cluster", lambda: steps.append("crd") or None)
    monkeypatch.setattr(cluster, "_require_secrets", lambda v, ns: steps.append("secrets"))
    monkeypatch.setattr(cluster, "_delete_finished_jobs", lambda d, ns: steps.append("finished"))
    assert cluster.install(values, cfg.run.name, "lens", docs) == 0
    assert steps == ["crd", "secrets", "finished"]
    (call,) = recorded_tools.read_text().splitlines()
    assert call.startswith(f"helm HELM_DRIVER=configmap upgrade --install {cfg.run.name} {cluster.CHART} -f ")
    assert call.endswith("--namespace lens")
    # An invalid manifest stops before helm runs.
    next(d for d in docs if d["kind"] == "PyTorchJob")["spec"]["elasticPolcy"] = {}
    with pytest.raises(InputError, match="elasticPolcy"):
        cluster.install(values, cfg.run.name, "lens", docs)
    assert len(recorded_tools.read_text().splitlines()) == 1


class _FakeJobs:
    """CustomObjectsApi / BatchV1Api stand-in holding objects by name."""

    def __init__(self, objects: dict):
        self.objects, self.deleted = objects, []

    def _get(self, name):
        if name not in self.objects:
            raise _ApiException(404)
        return self.objects[name]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return self._get(name)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy):
        self.deleted.append(name)
        del self.objects[name]

    def read_namespaced_job(self, name, namespace):
        return SimpleNamespace(to_dict=lambda: self._get(name))

    def delete_namespaced_job(self, name, namespace, propagation_policy):
        self.delete_namespaced_custom_object(None, None, namespace, None, name, propagation_policy)


def test_relaunch_deletes_only_finished_jobs_so_the_upgrade_recreates_them(monkeypatch):
    def state(condition):
        return {"status": {"conditions": [{"type": "Created", "status": "True"},
                                          {"type": condition, "status": "True"}]}}

    custom = _FakeJobs({"failed-run": state("Failed"), "running-run": state("Running")})
    batch = _FakeJobs({"done-run-dump": state("Complete")})
    client = SimpleNamespace(exceptions=SimpleNamespace(ApiException=_ApiException),
                             CustomObjectsApi=lambda: custom, BatchV1Api=lambda: batch)
    monkeypatch.setattr(cluster, "_kube", lambda: client)
    docs = [{"kind": kind, "metadata": {"name": name}} for kind, name in [
        ("PyTorchJob", "failed-run"), ("PyTorchJob", "running-run"), ("PyTorchJob", "new-run"),
        ("Job", "done-run-dump"), ("ConfigMap", "failed-run-config")]]
    cluster._delete_finished_jobs(docs, "lens")
    assert custom.deleted == ["failed-run"] and batch.deleted == ["done-run-dump"]
    assert list(custom.objects) == ["running-run"]
