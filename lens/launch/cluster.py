"""helm / kubectl / Kubernetes API calls: render, install, status, logs, delete.

Everything that touches a cluster is here; `render` and `check_manifests` (schema.py) need none. Tools are found as
$LENS_HELM / $LENS_KUBECTL, then on PATH, then in `.tools/bin` (scripts/get_tools.sh).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lens.errors import InputError
from lens.launch.schema import check_manifests, crd_version_schema, strict_schema
from lens.launch.values import values_yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = Path(__file__).parent / "chart"  # helm/consistency-lens, linked into the package so that it installs with it
CRD_NAME = "pytorchjobs.kubeflow.org"
KUBE_VERSION = "1.31.0"  # what `helm template` renders for offline; the live cluster's version is used on install
TRAINER_SELECTOR = "app.kubernetes.io/instance={release},app.kubernetes.io/component=trainer"


def find_tool(name: str) -> str:
    """Path of helm or kubectl: $LENS_<NAME>, then PATH, then .tools/bin. InputError (exit 2) when absent."""
    env = f"LENS_{name.upper()}"
    for candidate in (os.environ.get(env), shutil.which(name), ROOT / ".tools" / "bin" / name):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise InputError(f"{name} not found: put it on PATH, set ${env}, or run scripts/get_tools.sh")


def _helm(*args: str) -> int:
    """Run helm, keeping release records in ConfigMaps unless $HELM_DRIVER says otherwise: the launcher's Role
    (k8s/rbac.yaml) then needs no write access to Secrets."""
    env = {**os.environ, "HELM_DRIVER": os.environ.get("HELM_DRIVER", "configmap")}
    return subprocess.call([find_tool("helm"), *args], env=env)


@contextlib.contextmanager
def _values_file(values: dict):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "values.yaml"
        path.write_text(values_yaml(values))
        yield str(path)


def render(values: dict, release: str, namespace: str) -> str:
    """`helm template` of the chart with `values`: the manifests as YAML text. Values the chart's schema
    rejects raise InputError with helm's message."""
    with _values_file(values) as path:
        proc = subprocess.run(
            [find_tool("helm"), "template", release, str(CHART), "-f", path, "--namespace", namespace,
             "--kube-version", KUBE_VERSION, "--api-versions", "kubeflow.org/v1/PyTorchJob"],
            capture_output=True, text=True)
    if proc.returncode != 0:
        raise InputError("helm template failed: " + " ".join(proc.stderr.split()))
    return proc.stdout


def parse_manifests(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def require_valid(docs: list[dict], pytorchjob_schema: dict | None) -> None:
    problems = check_manifests(docs, pytorchjob_schema)
    if problems:
        raise InputError("rendered manifests are invalid:\n  " + "\n  ".join(problems))


def _kube():
    """The kubernetes client with the current kubeconfig context (or the in-cluster service account)."""
    import kubernetes

    try:
        kubernetes.config.load_kube_config()
    except kubernetes.config.ConfigException:  # no kubeconfig: try in-cluster, and say so if that fails too
        try:
            kubernetes.config.load_incluster_config()
        except kubernetes.config.ConfigException as e:
            raise InputError(f"no Kubernetes cluster configured (kubeconfig or in-cluster): {e}") from None
    return kubernetes.client


def current_namespace() -> str:
    """The kubeconfig context's namespace, else `default`."""
    import kubernetes

    try:
        _, active = kubernetes.config.list_kube_config_contexts()
    except kubernetes.config.ConfigException:  # no kubeconfig: helm and kubectl fall back to `default` too
        return "default"
    return active["context"].get("namespace") or "default"


def pytorchjob_schema_from_cluster() -> dict:
    """The strict schema of the PyTorchJob CRD installed in the cluster; InputError if the CRD is missing."""
    client = _kube()
    try:
        resp = client.ApiextensionsV1Api().read_custom_resource_definition(CRD_NAME, _preload_content=False)
    except client.exceptions.ApiException as e:
        if e.status == 404:
            raise InputError(f"CRD {CRD_NAME} is not installed: install the Kubeflow training operator v1 "
                             "first (kubectl apply -k k8s/training-operator, see k8s/README.md)") from None
        raise
    return strict_schema(crd_version_schema(json.loads(resp.data)))


def _require_secrets(values: dict, namespace: str) -> None:
    """The Secrets named in values must exist, or the pods would wait forever in CreateContainerConfigError.
    Only existence is checked; nothing of a Secret is printed."""
    client = _kube()
    for key, ref in (values.get("secrets") or {}).items():
        name = (ref or {}).get("existingSecret")
        if not name:
            continue
        try:
            client.CoreV1Api().read_namespaced_secret(name, namespace)
        except client.exceptions.ApiException as e:
            if e.status == 404:
                raise InputError(f"secrets.{key}.existingSecret: Secret {name!r} not found in namespace "
                                 f"{namespace}") from None
            raise


def _finished(obj: dict) -> bool:
    done = {"Succeeded", "Failed", "Complete"}
    return any(c.get("type") in done and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def _get_and_delete(client, kind: str, name: str, namespace: str):
    """(get, delete) callables for a PyTorchJob or a batch Job; None for other kinds."""
    if kind == "PyTorchJob":
        api, args = client.CustomObjectsApi(), ("kubeflow.org", "v1", namespace, "pytorchjobs", name)
        return (functools.partial(api.get_namespaced_custom_object, *args),
                functools.partial(api.delete_namespaced_custom_object, *args, propagation_policy="Foreground"))
    if kind == "Job":
        api = client.BatchV1Api()
        return (lambda: api.read_namespaced_job(name, namespace).to_dict(),
                functools.partial(api.delete_namespaced_job, name, namespace, propagation_policy="Foreground"))
    return None


def _delete_finished_jobs(docs: list[dict], namespace: str) -> None:
    """A finished PyTorchJob or Job is not restarted by an upgrade: delete it so `helm upgrade` creates it
    again, and the new pods resume from the run's checkpoint (the dump skips shards already written)."""
    client = _kube()
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        calls = _get_and_delete(client, kind, name, namespace)
        if calls is None:
            continue
        get, delete = calls
        try:
            if not _finished(get()):
                continue
        except client.exceptions.ApiException as e:
            if e.status == 404:
                continue
            raise
        print(f"{kind} {name} has finished; deleting it so the upgrade starts it again", file=sys.stderr)
        delete()
        for _ in range(300):  # the name is free once the object and its pods are gone
            try:
                get()
            except client.exceptions.ApiException as e:
                if e.status == 404:
                    break
                raise
            time.sleep(1)
        else:
            raise TimeoutError(f"{kind} {name} still exists 300 s after deletion")


def install(values: dict, release: str, namespace: str, docs: list[dict]) -> int:
    """Check the PyTorchJob CRD is installed and the job passes its strict schema, then
    `helm upgrade --install` (idempotent: the same run name continues the run)."""
    require_valid(docs, pytorchjob_schema_from_cluster())
    _require_secrets(values, namespace)
    _delete_finished_jobs(docs, namespace)
    with _values_file(values) as path:
        return _helm("upgrade", "--install", release, str(CHART), "-f", path, "--namespace", namespace)


def status(release: str, namespace: str) -> int:
    """Helm release status, then the run's PyTorchJob, Jobs and pods."""
    rc = _helm("status", release, "--namespace", namespace)
    if rc != 0:
        return rc
    return subprocess.call([find_tool("kubectl"), "get", "pytorchjobs,jobs,pods", "--namespace", namespace,
                            "-l", f"app.kubernetes.io/instance={release}", "-o", "wide"])


def _trainer_finished(release: str, namespace: str) -> bool:
    client = _kube()
    jobs = client.CustomObjectsApi().list_namespaced_custom_object(
        "kubeflow.org", "v1", namespace, "pytorchjobs", label_selector=f"app.kubernetes.io/instance={release}")
    return not jobs["items"] or all(_finished(j) for j in jobs["items"])


def logs(release: str, namespace: str) -> int:
    """Follow the logs of all worker pods. `kubectl logs -f` ends when a pod goes away (preemption, restart); keep
    following the replacements, from where we stopped, until the PyTorchJob has finished."""
    kubectl = find_tool("kubectl")
    since: str | None = None
    while True:
        cmd = [kubectl, "logs", "--namespace", namespace, "-l", TRAINER_SELECTOR.format(release=release),
               "-f", "--prefix", "--max-log-requests", "64", "--ignore-errors"]
        if since:
            cmd.append(f"--since-time={since}")
        subprocess.call(cmd)
        since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        if _trainer_finished(release, namespace):
            return 0
        time.sleep(5)


def delete(release: str, namespace: str) -> int:
    """Uninstall the release (jobs, pods, ConfigMap); checkpoints and activations in storage stay."""
    rc = _helm("uninstall", release, "--namespace", namespace)
    if rc == 0:
        print(f"deleted {release}; its checkpoints in run.dir are kept (relaunch continues from them)",
              file=sys.stderr)
    return rc
