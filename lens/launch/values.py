"""Run config -> Helm values for `helm/consistency-lens`: a pure function, the one place that maps config keys to
chart values. Cluster shape (image, GPUs, workers, spot preset, secret names) is not part of the run config; it
comes from the chart's defaults and the user's values files, passed here as `overrides`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from lens.config import LensConfig, to_yaml
from lens.errors import ConfigError, InputError

# Keys derived from the run config; a values file may not set them to something else (the pods would read one
# run name from the ConfigMap and another from their environment).
_DERIVED = ("run", "config")


def needs_data_job(cfg: LensConfig) -> bool:
    """Whether a run needs the data step first (the chart's dump Job, the Slurm dump step): the activations, or
    the token store of an on-the-fly run that shares data.tokens."""
    return not cfg.data.on_the_fly or cfg.data.tokens is not None


def chart_values(cfg: LensConfig, overrides: dict | None = None) -> dict:
    """Chart values for a validated config. `overrides` (parsed values files) are deep-merged on top, except the
    run name and the config text, which always come from `cfg`."""
    derived: dict[str, Any] = {
        "run": {"name": cfg.run.name},
        "config": to_yaml(cfg),
        "dump": {"enabled": needs_data_job(cfg)},
        "storage": {"endpointUrl": cfg.storage.endpoint_url or ""},
        "wandb": {"project": cfg.wandb.project, "entity": cfg.wandb.entity or ""},
    }
    overrides = copy.deepcopy(overrides or {})
    for key in _DERIVED:
        if key in overrides and overrides[key] != derived[key]:
            raise ConfigError(f"values.{key}", overrides[key], f"no `{key}` in values files: it comes from the run "
                              "config (use key=value overrides)")
    return merge_values(derived, overrides)


def merge_values(base: dict, extra: dict) -> dict:
    """`extra` deep-merged onto `base` the way helm merges values files (maps merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config text) as `|` blocks, so a values file reads like the config it holds."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def values_yaml(values: dict) -> str:
    return yaml.dump(values, Dumper=_BlockDumper, sort_keys=False)


def read_values_files(paths: list[str], what: str) -> list[dict]:
    """The mappings in `-f` values files, in order; an unreadable or non-mapping file is bad input naming it."""
    found = []
    for path in paths:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"values file {path}: " + " ".join(str(e).split())) from None
        if not isinstance(data, dict):
            raise InputError(f"values file {path}: expected a mapping of {what}")
        found.append(data)
    return found
