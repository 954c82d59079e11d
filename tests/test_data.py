"""lens.data.corpus and lens.data.source: corpus loading, tokenisation, the cache, positions, the sample cursor."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lens import rng
from lens.config import DataConfig
from lens.data import corpus as corpus_mod
from lens.data.corpus import (Corpus, corpus_fingerprint, first_real_token, load_texts, sample_positions,
                              token_stream, tokenize)
from lens.data.source import OnTheFlySource, SampleCursor, split_for_rank
from lens.errors import ConfigError

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "A consistency lens explains one hidden activation of a language model in words.",
    "Return the number of items in a container; raise TypeError when it has no length.",
    "Open a file and return a stream. Raise OSError upon failure.",
]


def _tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process on DOCS: any text encodes, nothing is downloaded."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>"] if bos else ["<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", **({"bos_token": "<bos>"} if bos else {}))


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture(scope="module")
def stdlib() -> list[str]:
    return load_texts("stdlib")


def _write_txt(path, docs) -> str:
    path.write_text("\n\n  \n".join(docs) + "\n")  # a whitespace-only line separates documents too
    return str(path)


def _write_jsonl(path, docs, field="text") -> str:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


# ----------------------------------------------------------------------------------------------- load_texts


def test_stdlib_corpus_is_english_and_deterministic(stdlib):
    assert len(stdlib) > 1000
    assert stdlib == load_texts("stdlib")
    assert len(set(stdlib)) == len(stdlib) and min(map(len, stdlib)) >= 50
    words = " ".join(stdlib).lower().split()
    assert len(words) > 50_000
    for common in ("the", "return", "a", "is", "of"):
        assert words.count(common) > 500, common
    assert sum(c.isascii() for c in "".join(stdlib)) / sum(map(len, stdlib)) > 0.99


@pytest.mark.slow
def test_stdlib_corpus_is_the_same_in_another_process(stdlib):
    """String hashing is salted per process (PYTHONHASHSEED): an order taken from a set would differ here."""
    code = ("import hashlib, json; from lens.data.corpus import load_texts; "
            "print(hashlib.sha256(json.dumps(load_texts('stdlib')).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split()[-1] == hashlib.sha256(json.dumps(stdlib).encode()).hexdigest()


def test_txt_jsonl_and_directory_load(tmp_path):
    assert load_texts(_write_txt(tmp_path / "a.txt", DOCS[:2])) == DOCS[:2]
    assert load_texts(_write_jsonl(tmp_path / "b.jsonl", DOCS[2:], field="body"), text_field="body") == DOCS[2:]

    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    _write_jsonl(folder / "sub" / "2.jsonl", DOCS[3:])
    _write_txt(folder / "1.txt", DOCS[:3])
    (folder / "notes.md").write_text("not part of the corpus")
    assert load_texts(str(folder)) == DOCS  # files in sorted path order


def test_saved_datasets_load(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "ds"))
    assert load_texts(str(tmp_path / "ds")) == DOCS
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": DOCS[:3]}),
                                   "test": datasets.Dataset.from_dict({"content": DOCS[3:]})})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert load_texts(str(tmp_path / "dd"), text_field="content") == DOCS[:3]


def test_hub_dataset_spec_uses_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (tmp_path / "local").mkdir()
    _write_jsonl(tmp_path / "local" / "train.jsonl", DOCS)  # load_dataset on a local folder: offline, real code path
    assert load_texts(f"hf:{tmp_path / 'local'}") == DOCS


@pytest.mark.parametrize("case, key", [
    ("missing_file", "data.corpus"),
    ("unknown_spec", "data.corpus"),
    ("wrong_suffix", "data.corpus"),
    ("empty_dir", "data.corpus"),
    ("bad_json", "data.corpus"),
    ("bad_hf_spec", "data.corpus"),
    ("hf_not_cached", "data.corpus"),
    ("no_train_split", "data.corpus"),
    ("jsonl_missing_field", "data.text_field"),
    ("dataset_missing_field", "data.text_field"),
])
def test_bad_corpus_raises_config_error_naming_the_key(tmp_path, monkeypatch, case, key):
    import datasets
    import huggingface_hub.constants

    spec, field = str(tmp_path / "nope.txt"), "text"
    if case == "unknown_spec":
        spec = "wikipedia"
    elif case == "wrong_suffix":
        (tmp_path / "a.csv").write_text("x")
        spec = str(tmp_path / "a.csv")
    elif case == "empty_dir":
        spec = str(tmp_path)
    elif case == "bad_json":
        (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{oops\n')
        spec = str(tmp_path / "a.jsonl")
    elif case == "bad_hf_spec":
        spec = "hf:a:b:c"
    elif case == "hf_not_cached":  # offline mode: fail at once instead of retrying the network
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        spec = "hf:no-such-org/no-such-dataset"
    elif case == "no_train_split":
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "d"))
        spec = str(tmp_path / "d")
    elif case == "jsonl_missing_field":
        spec, field = _write_jsonl(tmp_path / "a.jsonl", DOCS), "body"
    elif case == "dataset_missing_field":
        datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "d"))
        spec, field = str(tmp_path / "d"), "body"
    with pytest.raises(ConfigError, match=f"^config error: {key}=") as e:
        load_texts(spec, text_field=field)
    assert e.value.key == key
    if case == "missing_file":
        assert str(tmp_path / "nope.txt") in str(e.value)


# ----------------------------------------------------------------------------------------------- tokenize


def _reference_stream(texts, tok) -> list[int]:
    """The token stream built the slow, obvious way: each document alone, joined by EOS."""
    out: list[int] = []
    for i, text in enumerate(texts):
        out += ([tok.eos_token_id] if i else []) + tok.encode(text, add_special_tokens=False)
    return out


def test_tokenize_shapes_bos_and_stream_prefix(tok, stdlib):
    texts = stdlib[:300]
    stream = _reference_stream(texts, tok)
    assert token_stream(texts, tok).tolist() == stream
    rows = tokenize(texts, tok, seq_len=32)
    assert first_real_token(tok) == 1
    assert rows.dtype == torch.int64 and rows.shape == (len(stream) // 31, 32)
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert rows[:, 1:].flatten().tolist() == stream[: rows.shape[0] * 31]
    capped = tokenize(texts, tok, seq_len=32, max_sequences=5)
    assert torch.equal(capped, rows[:5])


def test_tokenize_without_bos_uses_whole_rows():
    tok = _tokenizer(bos=False)
    stream = _reference_stream(DOCS * 5, tok)
    rows = tokenize(DOCS * 5, tok, seq_len=8)
    assert first_real_token(tok) == 0
    assert rows.shape == (len(stream) // 8, 8)
    assert rows.flatten().tolist() == stream[: rows.numel()]


# ----------------------------------------------------------------------------------------------- Corpus


def test_corpus_split_is_disjoint_tail_and_cached(tok, stdlib, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    path = _write_txt(tmp_path / "c.txt", stdlib[:200])
    cfg = DataConfig(corpus=path, seq_len=16, val_fraction=0.07)
    corpus = Corpus.build(cfg, tok)
    every = tokenize(load_texts(path), tok, 16)
    n = len(every)
    assert len(corpus.val) == math.ceil(0.07 * n) and len(corpus.train) == n - len(corpus.val)
    assert torch.equal(torch.cat([corpus.train, corpus.val]), every)  # disjoint blocks covering all sequences
    assert corpus.first == 1 and corpus.seq_len == 16
    assert corpus.fingerprint == corpus_fingerprint(corpus.train, corpus.val)
    assert len(list((tmp_path / "cache" / "corpus").glob("*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("cache miss: the corpus was read or tokenised again")

    monkeypatch.setattr(corpus_mod, "load_texts", refuse)
    monkeypatch.setattr(corpus_mod, "token_stream", refuse)
    again = Corpus.build(cfg, tok)
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    assert again.fingerprint == corpus.fingerprint
    with pytest.raises(AssertionError, match="cache miss"):  # another seq_len is another cache entry
        Corpus.build(DataConfig(corpus=path, seq_len=17), tok)


def test_corpus_too_small_raises(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    path = _write_txt(tmp_path / "c.txt", DOCS)
    n = len(tokenize(DOCS, tok, 16))
    with pytest.raises(ConfigError, match="data.val_fraction") as e:
        Corpus.build(DataConfig(corpus=path, seq_len=16, val_fraction=0.99), tok)
    assert f"has {n} sequences" in str(e.value)
    with pytest.raises(ConfigError, match="data.corpus"):
        Corpus.build(DataConfig(corpus=path, seq_len=10_000, min_pos=0), tok)
    with pytest.raises(ConfigError, match="data.min_pos"):  # BOS takes column 0: nothing left to explain
        Corpus.build(DataConfig(corpus=path, seq_len=16, min_pos=15), tok)


# ----------------------------------------------------------------------------------------------- positions


def test_positions_in_range_cover_it_and_are_keyed():
    keys = rng.key(7, rng.POSITION, torch.arange(20_000))
    p = sample_positions(keys, first=1, seq_len=32, min_pos=4)
    assert p.dtype == torch.int64 and p.shape == (20_000,)
    assert set(p.tolist()) == set(range(5, 32))
    assert torch.equal(p, sample_positions(keys, 1, 32, 4))
    assert torch.equal(p[123:130], sample_positions(keys[123:130], 1, 32, 4))  # per key, not per batch
    other = sample_positions(rng.key(8, rng.POSITION, torch.arange(20_000)), 1, 32, 4)
    assert (p != other).float().mean() > 0.9
    assert set(sample_positions(keys, first=0, seq_len=8, min_pos=0).tolist()) == set(range(8))


# ----------------------------------------------------------------------------------------------- source


N_TRAIN, SEQ = 10, 8


@pytest.fixture
def source() -> OnTheFlySource:
    """A synthetic corpus whose row r holds r*SEQ ... r*SEQ+SEQ-1, so a row names its own index."""
    rows = torch.arange((N_TRAIN + 3) * SEQ).view(-1, SEQ)
    corpus = Corpus(train=rows[:N_TRAIN], val=rows[N_TRAIN:], first=1, fingerprint="test")
    return OnTheFlySource(corpus, seed=3, min_pos=2)


def _samples(source, ids) -> list[tuple[int, int]]:
    input_ids, positions = source.lookup(ids)
    return list(zip((input_ids[:, 0] // SEQ).tolist(), positions.tolist()))


def test_cursor_resume_and_world_size_give_the_same_samples(source):
    cursor = SampleCursor()
    reference = [_samples(source, cursor.take(6)) for _ in range(5)]  # 30 samples: three epochs

    first = SampleCursor()
    resumed = [_samples(source, first.take(2))]
    second = SampleCursor()
    second.load_state_dict(first.state_dict())
    resumed.append(_samples(source, second.take(4)))
    resumed += [_samples(source, second.take(6)) for _ in range(4)]
    assert sum(resumed, []) == sum(reference, [])
    assert second.state_dict() == {"next": 30}

    for world in (1, 2, 3):
        cursor = SampleCursor()
        for batch in reference:
            ids = cursor.take(6)
            shares = [split_for_rank(ids, r, world) for r in range(world)]
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert sum((_samples(source, s) for s in shares), []) == batch


def test_split_for_rank_sizes():
    ids = torch.arange(100, 107)
    shares = [split_for_rank(ids, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 2, 2]
    assert torch.equal(torch.cat(shares), ids)
    assert [len(split_for_rank(ids[:2], r, 3)) for r in range(3)] == [1, 1, 0]


def test_every_sequence_once_per_epoch_across_boundaries(source):
    ids = SampleCursor(next_index=4).take(3 * N_TRAIN)  # batches start mid-epoch
    samples = _samples(source, ids)
    epochs = [[], [], [], []]
    for g, (seq, _) in zip(ids.tolist(), samples):
        epochs[g // N_TRAIN].append(seq)
    for e in (1, 2):  # the complete epochs
        assert sorted(epochs[e]) == list(range(N_TRAIN))
    assert epochs[1] != epochs[2]  # each epoch has its own order
    assert len(set(epochs[0])) == len(epochs[0]) and len(set(epochs[3])) == len(epochs[3])
    # A lookup straddling epochs equals the same samples looked up one at a time (fresh permutation caches).
    assert samples == [s for g in ids for s in _samples(source, g.view(1))]
    positions = torch.tensor([p for _, p in samples])
    assert positions.min() >= 1 + 2 and positions.max() <= SEQ - 1
    assert source.steps_per_epoch(6) == 2 and source.steps_per_epoch(10) == 1 and source.steps_per_epoch(3) == 4


def test_val_batch_is_fixed_and_cycles(source):
    input_ids, positions = source.val_batch(7)
    assert input_ids.shape == (7, SEQ) and positions.shape == (7,)
    assert ((input_ids[:, 0] // SEQ) - N_TRAIN).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(positions, source.val_batch(7)[1])
    assert torch.equal(positions[:4], source.val_batch(4)[1])  # keyed by j: a prefix of a larger set
    assert positions.min() >= 3 and positions.max() <= SEQ - 1
