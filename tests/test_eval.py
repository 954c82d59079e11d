"""`lens eval`: held-out metrics of a saved lens, equal to what training logged for the same checkpoint."""

from __future__ import annotations

import json

import pytest

from lens.cli import main

KEYS = ("variance_recovered", "fve_nrm", "cosine", "nmse", "kl")


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
    assert "fve_nrm" in table and f"{result['baseline_token/fve_nrm']:.4f}" in table


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
    from lens.tracking import WandbTracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    saved, runs = {}, []
    real_summary = WandbTracker.summary

    def summary(self, metrics):  # the real W&B call, watched: what the run's summary holds after it
        real_summary(self, metrics)
        runs.append(self.run.id)
        saved.update({k: self.run.summary[k] for k in metrics})

    monkeypatch.setattr(WandbTracker, "summary", summary)
    out = tmp_path / "eval.json"
    assert main(["eval", str(trained_run), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert runs == ["trained-tiny"]  # the lens's own W&B run (id = run.name)
    assert list((trained_run / "wandb").glob("offline-run-*-trained-tiny/run-trained-tiny.wandb"))
    assert saved["eval/step"] == result["step"]
    for key in KEYS:
        assert saved[f"eval/{key}"] == result[key] and saved[f"eval/baseline_token/{key}"] == result[
            f"baseline_token/{key}"]


def _explanation_tables(run_dir) -> dict[int, list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval/explanations"] for r in rows if "eval/explanations" in r}


def test_training_explains_the_same_held_out_positions_at_every_evaluation(trained_run):
    tables = _explanation_tables(trained_run)
    assert sorted(tables) == [3, 6]
    for step, rows in tables.items():
        assert [r["sample"] for r in rows] == [0, 4, 7, 11] and all(r["step"] == step for r in rows)
        assert all("[[" in r["context"] and r["nmse"] > 0 for r in rows)
    assert [r["context"] for r in tables[3]] == [r["context"] for r in tables[6]]


@pytest.mark.slow
def test_explained_positions_survive_a_resume_and_are_logged_one_line_each(tiny_files, tmp_path, capsys):
    import yaml

    from conftest import tiny_run_config

    run_dir = tmp_path / "run"
    for max_steps in (2, 4):  # the second start resumes from the step-2 checkpoint
        cfg = tiny_run_config(tiny_files, "explained", run_dir, train={
            "max_steps": max_steps, "checkpoint_every": 2, "eval_every": 1, "eval_samples": 10,
            "eval_explanations": 3})
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / "config.yaml")]) == 0
    tables = _explanation_tables(run_dir)
    assert sorted(tables) == [1, 2, 3, 4]
    contexts = {step: [(r["sample"], r["context"]) for r in rows] for step, rows in tables.items()}
    assert all(c == contexts[1] for c in contexts.values()) and [s for s, _ in contexts[1]] == [0, 4, 9]
    # the CLI logs to stdout, "<time> [rank 0] <message>"
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if "] eval step " in line
             and " sample " in line]
    assert len(lines) == 4 * 3
    step3 = [line for line in lines if line.startswith("eval step 3 sample ")]
    assert len(step3) == 3
    for line, row in zip(step3, tables[3]):
        assert line == f"eval step 3 sample {row['sample']} | {row['context']!r} -> {row['explanation']!r} | " \
                       f"nmse {row['nmse']:.4f}"


def test_a_frozen_base_checkpoint_holds_only_the_trainable_tensors(trained_run):
    """The orig model, shared by a frozen decoder and encoder (two names for one module), is never saved."""
    from lens.train.checkpoint import load_checkpoint

    saved = set(load_checkpoint(str(trained_run)).weights)
    assert saved and not [k for k in saved if k.startswith(("decoder.lm.", "encoder.lm."))], sorted(saved)[:8]
    assert any("proj" in k for k in saved), sorted(saved)
