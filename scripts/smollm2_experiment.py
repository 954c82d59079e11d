"""Experiment: train the embedded-default lens on SmolLM2-135M (CPU) and print the held-out curve.

    python scripts/smollm2_experiment.py [key=value ...]     # e.g. train.max_steps=300 run.dir=runs/exp

Runs `lens train conf/smollm2_135m.yaml` in-process (resuming if run.dir has checkpoints), then prints every
held-out evaluation from metrics.jsonl: variance recovered, normalised MSE and functional KL of the lens next to
the zero / mean / current-token-only baselines.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lens.cli import _setup_logging
from lens.config import load_config
from lens.train.loop import train

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "smollm2_135m.yaml"


def curve(metrics_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    return [r for r in rows if "eval/variance_recovered" in r]


def main(argv: list[str]) -> int:
    _setup_logging()
    cfg = load_config(CONFIG, argv)
    start = time.perf_counter()
    train(cfg)
    minutes = (time.perf_counter() - start) / 60
    print(f"\nheld-out curve ({cfg.train.eval_samples} activations, layer {cfg.model.layer}, {minutes:.1f} min):")
    print(f"{'step':>6} {'VR lens':>8} {'VR token':>9} {'VR mean':>8} | {'nmse':>6} {'tok nmse':>8} | "
          f"{'KL lens':>8} {'KL token':>8} {'KL mean':>8} {'KL zero':>8}")
    for r in curve(Path(cfg.run.dir) / "metrics.jsonl"):
        print(f"{r['step']:>6} {r['eval/variance_recovered']:>8.4f} {r['eval/baseline_token/variance_recovered']:>9.4f} "
              f"{r['eval/baseline_mean/variance_recovered']:>8.4f} | {r['eval/nmse']:>6.3f} "
              f"{r['eval/baseline_token/nmse']:>8.3f} | {r['eval/kl']:>8.4f} {r['eval/baseline_token/kl']:>8.4f} "
              f"{r['eval/baseline_mean/kl']:>8.4f} {r['eval/baseline_zero/kl']:>8.4f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
