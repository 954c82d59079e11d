"""lens.data.corpus, lens.data.tokens and lens.data.source: corpus loading, tokenisation, the token store (built
streamed, split over workers, killed and resumed), positions, the sample cursor."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lens import rng
from lens.config import DataConfig
from lens.data import corpus as corpus_mod
from lens.data import tokens
from lens.data.corpus import Corpus, first_real_token, load_texts, sample_positions, token_stream, tokenize
from lens.data.source import EpochOrder, OnTheFlySource, SampleCursor, split_for_rank
from lens.errors import ConfigError
from lens.storage import LocalStorage

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


def test_txt_documents_are_those_of_splitting_the_whole_text(tmp_path):
    # The .txt reader streams lines; its documents must be those of re.split over the whole text (as when files
    # were read whole), so existing token stores keep their bytes. Random texts of the characters that matter.
    import random
    import re

    gen = random.Random(0)
    for case in range(500):
        text = "".join(gen.choice(["a", "b c", " ", "\t", "\n", "\n", "\r\n", "\f", "\u00e9"])
                       for _ in range(gen.randint(0, 30)))
        path = tmp_path / f"{case}.txt"
        path.write_bytes(text.encode())
        whole = path.read_text(encoding="utf-8")  # universal newlines, as the line reader sees them
        want = [doc.strip() for doc in re.split(r"\n[ \t]*\n", whole) if doc.strip()]
        assert load_texts(str(path)) == want, repr(text)


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
    every = tokenize(load_texts(path), tok, 16)  # 200 documents: one shard of the token store
    n = len(every)
    assert len(corpus.val) == math.ceil(0.07 * n) and len(corpus.train) == n - len(corpus.val)
    assert torch.equal(torch.cat([corpus.train[:], corpus.val[:]]), every)  # disjoint blocks covering all sequences
    assert corpus.first == 1 and corpus.seq_len == 16
    stores = list((tmp_path / "cache" / "tokens").glob("*/manifest.json"))
    assert len(stores) == 1 and json.loads(stores[0].read_text())["dtype"] == "uint16"

    def refuse(*args, **kwargs):
        raise AssertionError("cache miss: the corpus was read or tokenised again")

    monkeypatch.setattr(corpus_mod, "iter_texts", refuse)
    monkeypatch.setattr(corpus_mod, "tokenize", refuse)
    again = Corpus.build(cfg, tok)
    assert torch.equal(again.train[:], corpus.train[:]) and torch.equal(again.val[:], corpus.val[:])
    assert again.fingerprint == corpus.fingerprint
    with pytest.raises(AssertionError, match="cache miss"):  # another seq_len is another store
        Corpus.build(DataConfig(corpus=path, seq_len=17), tok)


def test_token_store_shards_are_fixed_length_rows_read_by_global_index(tok, stdlib, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    docs = stdlib[:300]
    path = _write_txt(tmp_path / "c.txt", docs)
    corpus = Corpus.build(DataConfig(corpus=path, seq_len=16, token_shard_docs=40, val_fraction=0.1), tok)
    # shard j is documents [40 j, 40 j + 40) tokenized alone; global row k is row k of the shards concatenated
    texts = load_texts(path)  # more than 300: docstrings with blank lines are several documents in a .txt
    want = torch.cat([tokenize(texts[lo:lo + 40], tok, 16) for lo in range(0, len(texts), 40)])
    got = torch.cat([corpus.train[:], corpus.val[:]])
    assert torch.equal(got, want)
    ids = torch.tensor([len(corpus.train) - 1, 0, 5, 5, len(corpus.train) // 2])  # any order, repeats, across shards
    assert torch.equal(corpus.train[ids], want[ids])
    assert len(corpus.train.store.manifest["shards"]) == math.ceil(len(texts) / 40)
    capped = Corpus.build(DataConfig(corpus=path, seq_len=16, token_shard_docs=40, max_sequences=50), tok)
    assert torch.equal(torch.cat([capped.train[:], capped.val[:]]), want[:50])
    # the capped store stops at the first shard whose running count reaches 50
    shards = capped.train.store.manifest["shards"]
    assert sum(n for n, _ in shards) >= 50 > sum(n for n, _ in shards[:-1])


def test_a_capped_token_store_reads_each_shard_info_once(tok, stdlib, tmp_path):
    # The cap is checked after every shard, and a capped recipe has thousands of shards: each check must read only
    # the shards published since the last one, not all of them again.
    path = _write_txt(tmp_path / "c.txt", stdlib[:300])
    data = DataConfig(corpus=path, seq_len=16, token_shard_docs=4)
    assert tokens.build(data, tok, LocalStorage(tmp_path / "whole"))
    whole = json.loads((tmp_path / "whole" / tokens.MANIFEST).read_text())
    reads = collections.Counter()

    class CountingStorage(LocalStorage):
        def read_bytes(self, key):
            data = super().read_bytes(key)
            reads[key] += 1  # reads that found the object (a check before a shard is published finds nothing)
            return data

    capped = dataclasses.replace(data, max_sequences=whole["sequences"] - 1)  # reached by the last shard
    assert tokens.build(capped, tok, CountingStorage(tmp_path / "capped"))
    manifest = json.loads((tmp_path / "capped" / tokens.MANIFEST).read_text())
    assert manifest["shards"] == whole["shards"] and len(whole["shards"]) > 50
    infos = {key: n for key, n in reads.items() if key.startswith("shards/")}
    assert len(infos) == len(whole["shards"]) and set(infos.values()) == {1}, sorted(infos.items())[:3]


def test_an_undecodable_corpus_file_is_named(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "docs"
    folder.mkdir()
    _write_txt(folder / "a.txt", DOCS)
    (folder / "b.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"data.corpus=.*b.txt.*byte 0xe9 at offset 3 is not UTF-8") as e:
        Corpus.build(DataConfig(corpus=str(folder), seq_len=8), tok)
    assert "\n" not in str(e.value)


BUILD = textwrap.dedent("""
    # A data-Job worker building its share of a token store, pausing before each shard so a test can kill it.
    import sys, time
    from transformers import PreTrainedTokenizerFast
    from lens.config import DataConfig
    from lens.data import corpus, tokens
    from lens.storage import open_storage
    tokenize, pause = corpus.tokenize, float(sys.argv[5])
    def slow(*args, **kwargs):
        time.sleep(pause)
        return tokenize(*args, **kwargs)
    corpus.tokenize = slow
    tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
    data = DataConfig(corpus=sys.argv[2], seq_len=16, token_shard_docs=30)
    done = tokens.build(data, tok, open_storage(sys.argv[3]), *map(int, sys.argv[4].split("/")))
    print("complete" if done else "share done")
""")


def _store_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_token_store_killed_midway_and_rerun_or_split_is_the_uninterrupted_one(tok, stdlib, tmp_path):
    from lens.data import tokens
    from lens.storage import LocalStorage

    tok.save_pretrained(tmp_path / "tok")
    path = _write_txt(tmp_path / "c.txt", stdlib[:240])  # 30 documents per shard
    data = DataConfig(corpus=path, seq_len=16, token_shard_docs=30)
    assert tokens.build(data, tok, LocalStorage(tmp_path / "straight"))
    straight = _store_files(tmp_path / "straight")
    assert len([k for k in straight if k.endswith(".bin")]) == math.ceil(len(load_texts(path)) / 30) >= 8

    # A data-Job worker (a real process) SIGKILLed after a few shards, then run again.
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.Popen([sys.executable, str(script), str(tmp_path / "tok"), path, str(tmp_path / "killed"),
                               "0/1", "0.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(list((tmp_path / "killed").glob("shards/*.json"))) < 3:
        assert killed.poll() is None and time.time() < deadline, killed.communicate()
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    partial = _store_files(tmp_path / "killed")
    assert "manifest.json" not in partial and 3 <= len([k for k in partial if k.endswith(".json")]) < 8
    assert tokens.build(data, tok, LocalStorage(tmp_path / "killed"))
    resumed = _store_files(tmp_path / "killed")
    assert all(resumed[k] == v for k, v in partial.items())  # finished shards were kept, not rewritten
    assert resumed == straight

    # Three workers of an Indexed Job: the first two finish their share, the last one completes the store.
    split = LocalStorage(tmp_path / "split")
    assert [tokens.build(data, tok, split, i, 3) for i in range(3)] == [False, False, True]
    assert _store_files(tmp_path / "split") == straight


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


def test_epoch_order_of_a_corpus_too_large_to_list_reads_only_the_batch():
    """The order of 10^11 sequences (nothing of that size could be allocated): a batch straddling two epochs gets
    distinct in-range rows of each, and the same rows looked up again."""
    n = 10**11
    order = EpochOrder(n, seed=0)
    ids = torch.arange(n - 4, n + 4)
    rows = order.rows(ids)
    assert rows.min() >= 0 and rows.max() < n
    assert len(set(rows[:4].tolist())) == 4 and len(set(rows[4:].tolist())) == 4
    assert torch.equal(rows, EpochOrder(n, seed=0).rows(ids))


def test_val_batch_is_fixed_and_cycles(source):
    input_ids, positions = source.val_batch(7)
    assert input_ids.shape == (7, SEQ) and positions.shape == (7,)
    assert ((input_ids[:, 0] // SEQ) - N_TRAIN).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(positions, source.val_batch(7)[1])
    assert torch.equal(positions[:4], source.val_batch(4)[1])  # keyed by j: a prefix of a larger set
    assert positions.min() >= 3 and positions.max() <= SEQ - 1
