"""Launch a run on Kubernetes: config -> chart values -> validated manifests -> Helm release (or, with `slurm`, the
same validated config -> an sbatch job: lens/launch/slurm.py).

`scripts/launch.py` only parses arguments and calls `launch`, `status`, `logs` or `delete`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lens.config import load_config
from lens.errors import InputError
from lens.launch import memory
from lens.launch.cluster import (current_namespace, delete, install, logs, parse_manifests, render,
                                 require_valid, status)
from lens.launch.schema import strict_schema_from_file
from lens.launch.values import chart_values, merge_values, read_values_files, values_yaml

__all__ = ["launch", "status", "logs", "delete", "current_namespace", "chart_values"]

CRD_ENV = "LENS_PYTORCHJOB_CRD"


def _read_values(paths: list[str]) -> dict:
    merged: dict = {}
    for data in read_values_files(paths, "chart values"):
        merged = merge_values(merged, data)
    return merged


def local_manifests(cfg, user_values: dict, workers: int | None = None, values_out: str | None = None) -> list[dict]:
    """The manifests `--local` runs for a validated config: this machine's shape (`workers` replicas, default 2, no
    GPUs if it has none) under the user's values (which may set e.g. workers.minReplicas)."""
    from lens.launch.local import local_values

    values = chart_values(cfg, merge_values(local_values(2 if workers is None else workers), user_values))
    memory.report(cfg, values)
    if values_out:
        Path(values_out).write_text(values_yaml(values))
    return parse_manifests(render(values, cfg.run.name, "default"))


def launch(config: str, overrides: list[str], *, values_files: list[str] = (), namespace: str | None = None,
           dry_run: bool = False, values_out: str | None = None, crd: str | None = None, local: bool = False,
           workers: int | None = None, slurm: bool = False) -> int:
    """Compose and validate the config, map it to chart values, render and validate the manifests strictly; then
    print them (`dry_run`), install the release named after run.name, or (`local`) run the rendered job on this
    machine with `workers` worker replicas (default 2), or (`slurm`) submit it with sbatch, `values_files` then
    being Slurm values. Returns the exit code."""
    if local and dry_run:
        raise InputError("--local and --dry-run: choose one")
    if slurm and (local or workers is not None or namespace or values_out or crd):
        raise InputError("--slurm takes -f (Slurm values files) and --dry-run; --local, --workers, -n, --values-out "
                         "and --crd are for Kubernetes")
    if workers is not None and not local:
        raise InputError("--workers is for --local; on a cluster set workers.replicas in a values file (-f)")
    cfg = load_config(config, overrides)
    if slurm:
        from lens.launch import slurm as slurm_launch

        return slurm_launch.submit(cfg, slurm_launch.read_values(list(values_files)), dry_run)
    user_values = _read_values(list(values_files))
    if local:
        from lens.launch.local import run_local

        return run_local(local_manifests(cfg, user_values, workers, values_out))
    values = chart_values(cfg, user_values)
    memory.report(cfg, values)  # exits 2 before anything is rendered or installed when the run cannot fit
    if values_out:
        Path(values_out).write_text(values_yaml(values))
    release, namespace = cfg.run.name, namespace or current_namespace()
    text = render(values, release, namespace)
    docs = parse_manifests(text)
    for key, uri in (("run.dir", cfg.run.dir), ("data.activations", cfg.data.activations)):
        if uri and "://" not in uri:  # a spot-replaced pod starts with empty disks
            print(f"warning: {key}={uri} is a path inside the pods and is lost when a pod is replaced; use "
                  f"s3://... on a cluster", file=sys.stderr)
    if dry_run:
        crd = crd or os.environ.get(CRD_ENV)
        require_valid(docs, strict_schema_from_file(crd) if crd else None)
        checked = "strict CRD schema + kubeflow-training SDK" if crd else "kubeflow-training SDK"
        print(f"validated {len(docs)} manifests (core kinds: kubernetes-validate --strict; PyTorchJob: {checked})",
              file=sys.stderr)
        sys.stdout.write(text)
        return 0
    return install(values, release, namespace, docs)
