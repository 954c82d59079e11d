"""Shared fixtures: tiny random models of every supported family and a tokenizer trained in-process (offline)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

TEXT = ("The quick brown fox jumps over the lazy dog. Language models read text one token at a time. "
        "A lens explains what a hidden activation holds. Paris is the capital of France. ") * 20
FAMILIES = ("gpt2", "llama", "gemma2", "gemma3")
D, LAYERS = 32, 4
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_lm(family: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of `family` with our tokenizer's vocabulary."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        cfg = GPT2Config(n_layer=LAYERS, n_embd=D, n_head=4, n_positions=256, **common)
        lm = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, **common)
        lm = LlamaForCausalLM(cfg)
    elif family == "gemma2":  # sliding window shorter than the sequences, so both attention kinds are exercised
        cfg = Gemma2Config(hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, sliding_window=8, max_position_embeddings=256,
                           **common)
        lm = Gemma2ForCausalLM(cfg)
    elif family == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, sliding_window=8, max_position_embeddings=256,
                               layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2), **common)
        lm = Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    assert sum(p.numel() for p in lm.parameters()) < 200_000, "tiny test models must stay tiny"
    return lm.eval()


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def lm(family, tokenizer):
    return make_lm(family, len(tokenizer))


@pytest.fixture
def contexts(tokenizer) -> torch.Tensor:
    """(4, 24) real token ids starting with BOS."""
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows = [[tokenizer.bos_token_id] + ids[i * 23:(i + 1) * 23] for i in range(4)]
    return torch.tensor(rows)


def make_corpus(n_lines: int = 300, seed: int = 0) -> str:
    """Deterministic, varied English: sentences from word lists, five lines per document (blank-line separated)."""
    r = random.Random(seed)
    subjects = ["The old sailor", "A young teacher", "My neighbour", "The committee", "Every student", "The cat",
                "Our small company", "The orchestra", "A tired doctor", "The river", "Her brother", "The city council"]
    verbs = ["carefully examined", "quietly ignored", "loudly praised", "slowly rebuilt", "never understood",
             "suddenly discovered", "happily painted", "reluctantly signed", "secretly admired", "finally sold"]
    objects = ["the broken bridge", "a letter from Paris", "the annual report", "an ancient map", "the blue door",
               "seven wooden chairs", "the new railway", "a strange noise", "the winter garden", "their first album"]
    tails = ["before the storm arrived.", "while everyone was asleep.", "in the middle of July.",
             "because nobody else would.", "and then went home.", "without saying a word.", "for the third time.",
             "despite the heavy rain.", "near the harbour.", "after a long discussion."]
    lines = [f"{r.choice(subjects)} {r.choice(verbs)} {r.choice(objects)} {r.choice(tails)}" for _ in range(n_lines)]
    return "\n\n".join("\n".join(lines[i:i + 5]) for i in range(0, n_lines, 5)) + "\n"


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tokenizer) -> dict:
    """A tiny Llama + tokenizer saved as an HF folder and a text corpus file, made once per session:
    what subprocess tests point `model.name` and `data.corpus` at."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "tiny-llama"
    make_lm("llama", len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = root / "corpus.txt"
    corpus.write_text(make_corpus())
    return {"model_dir": model_dir, "corpus": corpus}


def tiny_run_config(tiny_files: dict, run_name: str, run_dir, **sections) -> dict:
    """A fast run config on the tiny model and corpus; `sections` update its sections (e.g. train={...})."""
    cfg = {
        "run": {"name": run_name, "dir": str(run_dir), "seed": 0},
        "model": {"name": str(tiny_files["model_dir"]), "layer": 1},
        "decoder": {"prompt": "<bos>Explain <embed>:", "t_text": 3},
        "encoder": {"prompt": "<bos><text> means"},
        "loss": {"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 0.1, "lm_prefix": "<bos>Explain something:"},
        "data": {"corpus": str(tiny_files["corpus"]), "seq_len": 16},
        "optim": {"lr": 1e-2, "warmup": "1s", "decay": "constant"},
        "train": {"max_steps": 4, "batch_size": 6, "micro_batch_size": 2, "checkpoint_every": 2,
                  "log_every": 1, "eval_every": 0, "eval_samples": 8},
        "wandb": {"mode": "disabled"},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_files) -> Path:
    """A run directory holding a lens trained for a few steps on the tiny model (evaluated at its end): what
    `lens eval` / `lens explain` tests read. Do not write into it."""
    import yaml

    from lens.cli import main

    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    cfg = tiny_run_config(tiny_files, "trained-tiny", run_dir,
                          train={"max_steps": 6, "checkpoint_every": 3, "eval_every": 3, "eval_samples": 12})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "config.yaml")]) == 0
    return run_dir


def helper_world(root: Path, cfg: dict, helper: str) -> dict:
    """A run config and a helper script written under `root`, and the environment a subprocess runs them in."""
    import yaml

    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    (root / "helper.py").write_text(helper)
    env = {**os.environ, "LENS_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return {"root": root, "config": config, "helper": root / "helper.py", "env": env}


def torchrun(nproc: int) -> list[str]:
    """The command that starts `nproc` local workers (torchrun next to this Python, or its module)."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return launcher + ["--standalone", f"--nproc-per-node={nproc}"]


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)
