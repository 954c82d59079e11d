#!/usr/bin/env bash
# Submit a run to Slurm, as the research code's script of this name did:
#
#   bash scripts/submit_with_config.sh CONFIG [key=value ...] [-f SLURM_VALUES.yaml] [--dry-run]
#
# A thin wrapper over `python scripts/launch.py CONFIG --slurm ...`: the config is validated exactly as for
# Kubernetes (exit 2, one line, nothing submitted), then one sbatch job is rendered and submitted (--dry-run prints
# it). $PYTHON picks the interpreter (default: python3 on PATH, e.g. an activated venv).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/launch.py" --slurm "$@"
