"""`lens eval`: held-out metrics of a saved lens, equal to what training logged for the same checkpoint."""

from __future__ import annotations

import json

import pytest

from conftest import wandb_summary
from lens.cli import main

KEYS = ("variance_recovered", "nmse", "kl")


def _logged_evals(run_dir) -> dict[int, dict]:
    evals = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/variance_recovered" in row:
            evals[row["step"]] = {k[len("eval/"):]: v for k, v in row.items() if k.startswith("eval/")}
    return evals


@pytest.mark.parametrize("target", ["run", "step-00000003"])
def test_eval_matches_the_numbers_training_logged(trained_run, tmp_path, capsys, target):
    logged = _logged_evals(trained_run)
    assert sorted(logged) == [3, 6]
    uri = trained_run if target == "run" else trained_run / "checkpoints" / target
    out = tmp_path / "eval.json"
    assert main(["eval", str(uri), "--json", str(out), "--no-wandb"]) == 0
    result = json.loads(out.read_text())
    step = 6 if target == "run" else 3
    assert result["step"] == step
    for prefix in ("", "baseline_token/", "baseline_mean/", "baseline_zero/"):
        for key in KEYS:
            assert result[prefix + key] == pytest.approx(logged[step][prefix + key], rel=1e-5, abs=1e-6), prefix + key
    table = capsys.readouterr().out
    assert f"(step {step})" in table
    assert "current token only" in table and f"{result['variance_recovered']:.4f}" in table


def test_eval_on_other_data_and_more_samples(trained_run, tiny_files, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"Line {i} of a different corpus about ships and harbours." for i in range(80)))
    out_run, out_other = tmp_path / "run.json", tmp_path / "other.json"
    assert main(["eval", str(trained_run), "--json", str(out_run), "--no-wandb", "--samples", "16"]) == 0
    assert main(["eval", str(trained_run), "--data", str(other), "--json", str(out_other), "--no-wandb",
                 "--samples", "16"]) == 0
    a, b = json.loads(out_run.read_text()), json.loads(out_other.read_text())
    assert b["data"] == str(other)
    assert a["variance_recovered"] != b["variance_recovered"]  # other text, other activations


def test_eval_names_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--no-wandb"]) == 2
    err = capsys.readouterr().err
    assert "neither a run directory" in err and str(tmp_path / "empty") in err


@pytest.mark.slow
def test_eval_writes_the_numbers_to_the_wandb_summary(trained_run, tmp_path, monkeypatch):
    """The W&B run of the lens (id = run.name, offline here) gets the metrics in its summary."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    saved = {}  # the run's offline segments (training's too, under WANDB_MODE=offline), as a sync would merge them
    for run_file in sorted((trained_run / "wandb").glob("offline-run-*-trained-tiny/run-trained-tiny.wandb")):
        saved.update(wandb_summary(run_file))
    assert saved["eval/step"] == result["step"]
    for key in KEYS:
        assert saved[f"eval/{key}"] == result[key] and saved[f"eval/baseline_token/{key}"] == result[
            f"baseline_token/{key}"]
