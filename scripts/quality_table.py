"""The README's "Lens quality" table: train the embedded default (SmolLM2-135M) with both objectives, then print
held-out fve_nrm, variance recovered and functional KL against the baselines at every evaluation, and `lens explain`
on a few fixed sentences (chosen here, before any output was seen).

    python scripts/quality_table.py                      # both objectives, 300 steps each (hours on a CPU)
    python scripts/quality_table.py --steps 100 --objectives straight_through train.batch_size=16
    python scripts/quality_table.py --objectives straight_through,grpo train.batch_size=16

Each objective trains into its own run dir (runs/quality-<objective>), resuming if it exists; the training logs
(with the sample explanations of every evaluation) go to <run dir>/train.log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CONFIG = "conf/smollm2_135m.yaml"
OBJECTIVES = {
    "straight_through": [],  # the config's own objective
    "grpo": ["loss.grpo_weight=1.0", "loss.group_size=4", "loss.grpo_beta=0.01", "loss.kl_weight=0.0",
             "loss.lm_weight=0.0"],
}
SENTENCES = [  # fixed before the first run: plain facts, a code-like line, a feeling, a number
    "The Eiffel Tower is in Paris, the capital of France.",
    "def add(a, b): return a + b",
    "She was so happy that she started to cry.",
    "In 1969, two astronauts walked on the Moon.",
]
COLUMNS = [("fve_nrm", ""), ("fve_nrm", "baseline_token/"), ("fve_nrm", "baseline_mean/"),
           ("variance_recovered", ""), ("variance_recovered", "baseline_token/"), ("kl", ""),
           ("kl", "baseline_token/"), ("kl", "baseline_mean/"), ("kl", "baseline_zero/")]


def evals(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/fve_nrm" in row:
            out[row["step"]] = row
    return out


def table(objective: str, rows: dict[int, dict]) -> str:
    head = "| objective | step | fve_nrm: lens | token | mean | var. recovered: lens | token | KL: lens | token | " \
           "mean | zero |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for step in sorted(rows):
        cells = [f"{rows[step][f'eval/{prefix}{key}']:.3f}" for key, prefix in COLUMNS]
        lines.append(f"| {objective} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def objectives(text: str) -> list[str]:
    """`--objectives a,b`: one value, so that the positional overrides after it stay overrides."""
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in OBJECTIVES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(OBJECTIVES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--objectives", type=objectives, default=list(OBJECTIVES),
                        help="comma-separated, of " + ", ".join(OBJECTIVES) + " (default: both)")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for both runs")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    for objective in args.objectives:
        run_dir = Path(f"runs/quality-{objective.replace('_', '-')}")
        run_dir.mkdir(parents=True, exist_ok=True)
        overrides = [f"run.name=quality-{objective.replace('_', '-')}", f"run.dir={run_dir}",
                     f"train.max_steps={args.steps}", f"train.eval_every={max(1, args.steps // 6)}",
                     f"train.checkpoint_every={max(1, args.steps // 6)}", *OBJECTIVES[objective], *args.overrides]
        with open(run_dir / "train.log", "a") as log:
            subprocess.run([sys.executable, "-m", "lens", "train", CONFIG, *overrides], stdout=log,
                           stderr=subprocess.STDOUT, check=True)
        print(table(objective, evals(run_dir)), flush=True)
        for sentence in SENTENCES:
            subprocess.run([sys.executable, "-m", "lens", "explain", str(run_dir), sentence, "--best-of", "4"],
                           check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
