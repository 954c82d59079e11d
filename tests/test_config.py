"""Config validation through the real command line, one test per rejected config; durations and schedules.

Every bad config must make `lens train` exit 2 with exactly one stderr line that names the offending key, before
anything is written: the run dir must not exist afterwards (and nothing else appears in the working directory).
The command runs in-process (`lens.cli.main`), so the checks that need the model (layer in range) really load the
tiny model from a saved folder.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import yaml

from conftest import make_lm
from lens.cli import main
from lens.config import LensConfig, OptimConfig, ScheduleConfig, load_config, parse_duration
from lens.errors import ConfigError
from lens.schedules import lr_at, schedule_value

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("config-model") / "tiny-llama"
    make_lm("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def workdir(tmp_path, tiny_model, monkeypatch):
    """A working directory holding a valid config (the tiny Llama, 4 blocks) and a corpus; restores logging and
    tears down the process group a model-checked run leaves behind."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LENS_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
    (tmp_path / "corpus.txt").write_text("A small corpus line for the config tests.\n" * 50)
    cfg = {
        "run": {"name": "cfg-test", "dir": str(tmp_path / "run")},
        "model": {"name": str(tiny_model), "layer": 1},
        "decoder": {"t_text": 3},
        "loss": {"mse_weight": 1.0},
        "data": {"corpus": str(tmp_path / "corpus.txt"), "seq_len": 16},
        "optim": {"lr": 1e-3, "min_lr": 1e-5},
        "train": {"max_steps": 4, "batch_size": 6, "micro_batch_size": 2, "eval_samples": 8, "log_every": 1},
        "wandb": {"mode": "disabled"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield tmp_path
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    from lens.train import dist

    dist.shutdown()


def rejected(workdir: Path, capsys, *overrides: str, config: str = "cfg.yaml") -> str:
    """Run `lens train CONFIG OVERRIDES...`; assert exit 2, one stderr line, nothing written. Returns the line."""
    before = sorted(p.name for p in workdir.iterdir())
    code = main(["train", config, *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lens train: ") and "expected" in lines[0], lines[0]
    assert not (workdir / "run").exists()
    assert sorted(p.name for p in workdir.iterdir()) == before
    return lines[0]


def names(line: str, key: str) -> bool:
    return f" {key}=" in line


# ------------------------------------------------------------------------------------------------ rejected configs


def test_unknown_top_level_key(workdir, capsys):
    line = rejected(workdir, capsys, "trian.max_steps=1")
    assert names(line, "trian") and "train" in line.split("expected")[1]  # the valid keys are listed


def test_unknown_nested_key(workdir, capsys):
    line = rejected(workdir, capsys, "train.max_stepz=1")
    assert names(line, "train.max_stepz") and "max_steps" in line.split("expected")[1]


def test_unknown_key_in_the_file(workdir, capsys):
    cfg = yaml.safe_load((workdir / "cfg.yaml").read_text())
    cfg["optim"]["learning_rate"] = 0.1
    (workdir / "typo.yaml").write_text(yaml.safe_dump(cfg))
    line = rejected(workdir, capsys, config="typo.yaml")
    assert names(line, "optim.learning_rate") and "lr" in line.split("expected")[1]


def test_appended_unknown_key(workdir, capsys):
    line = rejected(workdir, capsys, "+foo=1")
    assert names(line, "foo")


BAD_VALUES = [  # overrides, the key the error must name, what else the line must say (the valid range, the fix)
    (["train.max_steps=abc"], "train.max_steps", []),
    (["model.dtype=fp8"], "model.dtype", ["float32", "bfloat16"]),
    (["model.layer=99"], "model.layer", ["[0, 3]"]),  # the tiny Llama has 4 blocks
    (["encoder.layer=-5"], "encoder.layer", []),
    (["encoder.layer=4"], "encoder.layer", ["[0, 3]"]),
    (["loss.resample_ablation=true"], "loss.resample_ablation", ["data.on_the_fly"]),
    (["loss.resample_ablation=true", "data.on_the_fly=false", "data.activations=acts", "loss.grpo_weight=1",
      "loss.group_size=2", "loss.kl_weight=0", "loss.lm_weight=0", "loss.entropy_weight=0"],
     "loss.resample_ablation", ["loss.grpo_weight > 0"]),
    (["data.on_the_fly=false"], "data.activations", ["data.on_the_fly=false"]),
    (["decoder.prompt='<bos>Explain this:'"], "decoder.prompt", ["<embed>"]),
    (["schedules.tau.ramp=2x"], "schedules.tau.ramp", ['"500s"']),
    (["optim.min_lr=0.01"], "optim.min_lr", ["optim.lr"]),
    (["train.micro_batch_size=7"], "train.micro_batch_size", ["train.batch_size (6)"]),
    (["loss.grpo_weight=1", "loss.kl_weight=0.5"], "loss.kl_weight", ["loss.grpo_weight"]),
    (["model.revision='main branch'"], "model.revision", ["branch, tag or commit"]),
    (["model.cache=s3://ak:s3cr3t@bucket/models"], "model.cache", ["AWS_ACCESS_KEY_ID"]),
    (["model.cache=' '"], "model.cache", ["none (no mirror)"]),
]


@pytest.mark.parametrize("overrides, key, hints", BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_bad_value_is_named_with_the_fix(workdir, capsys, overrides, key, hints):
    line = rejected(workdir, capsys, *overrides)
    assert names(line, key) and all(hint in line for hint in hints)


def test_missing_config_file(workdir, capsys):
    line = rejected(workdir, capsys, config="nope.yaml")
    assert names(line, "CONFIG") and "nope.yaml" in line


def test_override_without_value(workdir, capsys):
    rejected(workdir, capsys, "train.max_steps")


def test_a_valid_config_passes_the_same_checks(workdir):
    """The base config of the tests above is valid (so each rejection is caused by its one override)."""
    cfg = load_config("cfg.yaml")
    assert isinstance(cfg, LensConfig) and cfg.model.layer == 1 and cfg.train.micro_batch_size == 2


# ------------------------------------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.micro_batch_size <= cfg.train.batch_size


def test_configs_are_shipped():
    assert (REPO / "conf" / "smollm2_135m.yaml").is_file()


# ------------------------------------------------------------------------------------------------ durations


@pytest.mark.parametrize("text, steps", [("500s", 500), ("10os", 10), ("0.5e", 50), ("2e", 200), ("0.25e", 25),
                                         ("0s", 0), (" 3 s ", 3), (7, 7), ("0.333e", 33)])
def test_parse_duration(text, steps):
    assert parse_duration(text, steps_per_epoch=100) == steps


def test_parse_duration_rounds_fractional_epochs_to_the_nearest_step():
    assert parse_duration("0.5e", steps_per_epoch=7) in (3, 4)
    assert parse_duration("0.3e", steps_per_epoch=7) == 2  # 2.1
    assert parse_duration("1e", steps_per_epoch=7) == 7


@pytest.mark.parametrize("text", ["2x", "1.5s", "-1s", "e", "", "5", "1e-3e"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError) as e:
        parse_duration(text, steps_per_epoch=100, key="optim.warmup")
    assert e.value.key == "optim.warmup"


# ------------------------------------------------------------------------------------------------ schedules


def test_schedule_hold_then_linear_ramp_then_end():
    s = ScheduleConfig(start=1.0, end=0.2, kind="linear", hold="2s", ramp="4s")
    values = [schedule_value(s, step, steps_per_epoch=10) for step in range(9)]
    assert values[:3] == [1.0, 1.0, 1.0]
    assert values[3] == pytest.approx(0.8) and values[4] == pytest.approx(0.6)
    assert values[6:] == pytest.approx([0.2, 0.2, 0.2])


def test_schedule_cosine_ramp_in_epochs():
    s = ScheduleConfig(start=1.0, end=0.1, kind="cosine", hold="0.1e", ramp="1e")  # the tau default
    spe = 20  # hold 2 steps, ramp 20 steps
    assert schedule_value(s, 0, spe) == schedule_value(s, 2, spe) == 1.0
    assert schedule_value(s, 12, spe) == pytest.approx(0.55)  # halfway: cosine is at its midpoint
    assert schedule_value(s, 7, spe) == pytest.approx(1.0 - 0.9 * 0.5 * (1 - math.cos(math.pi / 4)))
    assert schedule_value(s, 22, spe) == schedule_value(s, 1000, spe) == pytest.approx(0.1)
    steps = [schedule_value(s, k, spe) for k in range(30)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_schedule_constant_and_zero_ramp():
    assert schedule_value(ScheduleConfig(start=0.7), 123, 10) == 0.7
    jump = ScheduleConfig(start=0.0, end=1.0, kind="linear", hold="3s", ramp="0s")
    assert [schedule_value(jump, k, 10) for k in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_lr_warmup_then_cosine_to_exactly_min_lr():
    o = OptimConfig(lr=1e-3, min_lr=1e-5, warmup="4s", decay="cosine")
    lrs = [lr_at(o, step, max_steps=20, steps_per_epoch=100) for step in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == 1e-3  # decay starts at the peak
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == 1e-5  # the last step (max_steps - 1) is exactly min_lr
    assert lrs[12] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 8 / 15)))


def test_lr_warmup_in_epochs_then_constant():
    o = OptimConfig(lr=2e-3, min_lr=0.0, warmup="0.5e", decay="constant")
    lrs = [lr_at(o, step, max_steps=50, steps_per_epoch=8) for step in range(50)]  # warmup 4 steps
    assert lrs[:4] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])
    assert set(lrs[3:]) == {2e-3}


def test_lr_without_warmup_and_min_lr_equal_to_lr():
    o = OptimConfig(lr=1e-3, min_lr=1e-3, warmup="0s", decay="cosine")
    assert {lr_at(o, step, max_steps=10, steps_per_epoch=5) for step in range(10)} == {1e-3}
