"""Shared by test_chart.py and test_launch.py: finding helm, an isolated helm/kube environment, run configs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "consistency-lens"
SHARED_SCHEMAS = ROOT.parent / "shared" / "schemas"
CRD_FILE = SHARED_SCHEMAS / "kubeflow.org_pytorchjobs.yaml"  # data, never committed: present in CI
STRICT_JSON = SHARED_SCHEMAS / "pytorchjob_v1.json"
CONFIG_NAMES = ("smollm2_135m", "gemma2_2b")

# Stand-ins while conf/*.yaml are being written: schema defaults plus what each recipe is about.
_FALLBACK = {
    "smollm2_135m": {"run": {"name": "smollm2-135m-lens"}, "model": {"layer": 15}},
    "gemma2_2b": {"run": {"name": "gemma2-2b-lens", "dir": "s3://lens-runs/gemma2-2b-lens"},
                  "model": {"name": "google/gemma-2-2b", "layer": 12, "dtype": "bfloat16"},
                  "data": {"on_the_fly": False, "activations": "s3://lens-acts/gemma2-2b-l12"}},
}


def find_helm() -> str | None:
    for candidate in (os.environ.get("LENS_HELM"), ROOT / ".tools" / "bin" / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict:
    """Environment for helm and the launcher: helm found (else skip), its homes in a temp dir, no kubeconfig (so
    nothing can reach a cluster). Also applied to os.environ for in-process calls."""
    helm = find_helm()
    if helm is None:
        pytest.skip("helm not found: run scripts/get_tools.sh (puts it in .tools/bin) or put helm on PATH")
    home = tmp_path_factory.mktemp("helm")
    env = {"LENS_HELM": helm, "KUBECONFIG": str(home / "no-kubeconfig"),
           **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield {**os.environ, **env}


@pytest.fixture(scope="session")
def config_paths(tmp_path_factory) -> dict[str, Path]:
    """conf/<name>.yaml when it exists, else a stand-in written from the schema defaults."""
    tmp = tmp_path_factory.mktemp("conf")
    paths = {}
    for name in CONFIG_NAMES:
        path = ROOT / "conf" / f"{name}.yaml"
        if not path.exists():
            path = tmp / f"{name}.yaml"
            path.write_text(yaml.safe_dump(_FALLBACK[name]))
        paths[name] = path
    return paths


def ci_shape(name: str) -> dict:
    """A ci/ value set without the run-specific keys (run, config): the cluster shape alone."""
    values = yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())
    return {k: v for k, v in values.items() if k not in ("run", "config")}
