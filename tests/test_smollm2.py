"""Smoke test of the embedded default on real SmolLM2-135M weights (the full run is `make demo`, scripts/demo.py):
two optimizer steps, a checkpoint, a held-out evaluation with baselines, and `lens explain` on the result."""

import json

import pytest

from lens.cli import main


@pytest.mark.slow
def test_embedded_default_trains_and_evaluates_on_smollm2(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    code = main(["train", "conf/smollm2_135m.yaml", f"run.dir={run}", "train.max_steps=2", "train.batch_size=4",
                 "train.micro_batch_size=4", "train.eval_samples=8", "train.log_every=1"])
    assert code == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert all(k in train_rows[0] for k in ("train/mse", "train/kl", "train/lm", "train/entropy",
                                            "train/variance_recovered", "perf/samples_per_s"))
    final = [r for r in rows if "eval/variance_recovered" in r][-1]
    assert final["step"] == 2 and 0 < final["eval/variance_recovered"] < 1
    assert final["eval/baseline_zero/nmse"] == pytest.approx(1.0)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    # The trained lens explains a real text: every token from min_pos on, each with t_text explanation tokens.
    from lens.explain import explain
    from lens.inference import load_lens

    report = explain(load_lens(str(run)), "The cat sat on the mat because it was warm.")
    assert [r.token for r in report.records][-3:] == [" was", " warm", "."]
    assert all(len(r.explanation_ids) == 8 and r.nmse > 0 for r in report.records)
