"""Text -> fixed-length token sequences, and the positions explained in them.

`iter_texts` streams the documents of a corpus spec (`data.corpus`), `tokenize` joins documents into one token stream
cut into sequences of `seq_len` tokens, `sample_positions` draws the explained position p of each sample from its
integer key, and `Corpus.build` opens the config's token store (`lens/data/tokens.py`: the corpus tokenized once, in
shards of `data.token_shard_docs` documents) and splits it into training and validation sequences.

Every sequence is filled with real tokens (no padding): `[bos] + stream[k*(seq_len-1) : (k+1)*(seq_len-1)]` when the
tokenizer has a BOS token, else `seq_len` stream tokens. So the last real token is always at `seq_len - 1`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import itertools
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lens import rng
from lens.config import DataConfig
from lens.errors import ConfigError

CORPUS_CHOICES = (
    '"stdlib", a .txt file (documents separated by blank lines), a .jsonl file (one JSON object per line), '
    "a directory of such files, a directory written by datasets' save_to_disk, or hf:NAME[:CONFIG] "
    "(a Hugging Face dataset in the offline cache)"
)
MIN_STDLIB_DOC = 50  # characters; shorter docstrings are mostly "Return self==value." boilerplate
# Modules that act when imported (print, open a browser, hook the terminal, write a grammar cache), need a display,
# or are tests.
STDLIB_SKIP = frozenset({
    "__main__", "this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo", "test",
    "readline", "rlcompleter", "lib2to3",
})
TOKENIZE_BATCH = 1000  # documents per tokenizer call: fast tokenizers parallelise within a call
READ_BATCH = 1000  # rows per read from a datasets table


# ----------------------------------------------------------------------------------------------- texts


def load_texts(corpus: str, text_field: str = "text") -> list[str]:
    """All documents of a corpus spec as a list (small corpora and tests; the token store streams `iter_texts`)."""
    return list(iter_texts(corpus, text_field))


def iter_texts(corpus: str, text_field: str = "text") -> Iterator[str]:
    """The documents of a corpus spec, streamed in a deterministic order.

    `corpus` is one of: `"stdlib"` (Python's own docstrings), a `.txt` file (documents separated by blank lines),
    a `.jsonl` file (field `text_field` of each line), a directory of such files (sorted by path), a directory
    written by `datasets` `save_to_disk` (a DatasetDict contributes its `train` split), or `hf:NAME[:CONFIG]`
    (`datasets.load_dataset(NAME, CONFIG, split="train", streaming=True)`, which works offline only when cached).
    Files are read one at a time, line by line, datasets in batches of rows. Raises ConfigError naming `data.corpus`
    (bad spec, missing path, a file that is not UTF-8) or `data.text_field` (missing field); the spec is checked at
    once, the files as they are reached.
    """
    if corpus == "stdlib":
        return iter(stdlib_texts())
    if corpus.startswith("hf:"):
        return _hub_dataset_texts(corpus, text_field)
    path = Path(corpus).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _saved_dataset_texts(path, text_field)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ConfigError("data.corpus", corpus, f"a directory holding .txt or .jsonl files ({path} has none)")
        return (t for f in files for t in _file_texts(f, text_field))
    if path.suffix in (".txt", ".jsonl") or _looks_like_path(corpus):
        if not path.is_file():
            raise ConfigError("data.corpus", corpus, f"an existing file ({path.resolve()} does not exist)")
        if path.suffix not in (".txt", ".jsonl"):
            raise ConfigError("data.corpus", corpus, "a file ending in .txt or .jsonl")
        return _file_texts(path, text_field)
    raise ConfigError("data.corpus", corpus, CORPUS_CHOICES)


def stdlib_texts() -> list[str]:
    """Docstrings of the standard library: each public top-level module's `__doc__`, then those of its public
    functions and classes (and the classes' public methods), modules in sorted order, deduplicated, >= 50 chars.
    English prose shipped with every Python, so the default corpus needs no network."""
    texts: list[str] = []
    seen: set[str] = set()
    # Some modules warn (deprecated) or print when imported or inspected (typing.io); that is no news to a training log.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in STDLIB_SKIP:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # absent on this platform (winreg, msvcrt), or refuses it with another error
                continue
            for doc in _module_docs(module):
                doc = inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""
                if len(doc) >= MIN_STDLIB_DOC and doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
    return texts


def _module_docs(module) -> Iterable[Optional[str]]:
    yield module.__doc__
    for attr, obj in inspect.getmembers(module):  # sorted by name
        # Only objects defined here: re-exports are documented where they are defined. Hooks (sys.excepthook,
        # sys.unraisablehook, threading.excepthook) are skipped: test runners and debuggers replace them at run time,
        # which would make the corpus depend on who imports it.
        if attr.startswith("_") or attr.endswith("hook") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield obj.__doc__
            for method_name, method in vars(obj).items():
                if not method_name.startswith("_") and (inspect.isfunction(method)
                                                        or inspect.ismethoddescriptor(method)):
                    yield method.__doc__
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            yield obj.__doc__


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.startswith(("~", "."))


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        yield from _decoded_file_texts(path, text_field)
    except UnicodeDecodeError:  # a binary or Latin-1 file among the text: name it, do not guess an encoding
        offset, byte = _first_non_utf8(path)
        raise ConfigError("data.corpus", str(path), f"UTF-8 text files ({path}: byte 0x{byte:02x} at offset "
                          f"{offset} is not UTF-8; convert or remove the file)") from None


def _first_non_utf8(path: Path) -> tuple[int, int]:
    """(file offset, value) of the first byte of `path` that is not UTF-8. The text reader decodes in blocks, so its
    error's offset is within a block; this reads the bytes again by line (no UTF-8 sequence contains a newline byte,
    so each line decodes on its own)."""
    offset = 0
    with path.open("rb") as f:
        for line in f:
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return offset + e.start, line[e.start]
            offset += len(line)
    raise AssertionError(f"{path} decodes as UTF-8 now")  # it changed since the text reader failed


def _decoded_file_texts(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one file, read line by line so memory holds one document, not the file."""
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".txt":
            yield from _txt_documents(f)
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("data.corpus", str(path),
                                  f"one JSON object per line ({path}:{lineno}: {e})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError("data.text_field", text_field,
                                  f"a string field present in every line ({path}:{lineno} has {keys})")
            yield record[text_field]


BLANK_LINE = re.compile(r"[ \t]*\n?")


def _txt_documents(lines: Iterable[str]) -> Iterator[str]:
    """Documents separated by blank lines (nothing but spaces and tabs), each stripped, empty ones dropped. These
    are the pieces of splitting the whole text at newline, spaces/tabs, newline (as the reader did when it read a
    file whole), so token stores built before stay the same byte for byte."""
    doc: list[str] = []
    for line in itertools.chain(lines, [""]):  # the final "" is a blank line: it ends the last document
        if BLANK_LINE.fullmatch(line):
            if text := "".join(doc).strip():
                yield text
            doc = []
        else:
            doc.append(line)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _saved_dataset_texts(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    data = datasets.load_from_disk(str(path))  # memory-mapped Arrow: nothing is read until iterated
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ConfigError("data.corpus", str(path), f"a DatasetDict with a train split (it has {list(data)})")
        data = data["train"]
    if text_field not in data.column_names:
        raise ConfigError("data.text_field", text_field, f"a column of {path}: {data.column_names}")
    return (t for batch in data.select_columns([text_field]).iter(batch_size=READ_BATCH)
            for t in batch[text_field] if isinstance(t, str) and t)


def _hub_dataset_texts(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1]:
        raise ConfigError("data.corpus", spec, "hf:NAME or hf:NAME:CONFIG")
    name, config = parts[1], (parts[2] if len(parts) == 3 else None)
    try:
        data = datasets.load_dataset(name, config, split="train", streaming=True)
        rows = iter(data)
        first_row = next(rows, None)
    except Exception as e:  # offline and not cached, unknown name or config: the message says which
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError("data.corpus", spec, f"a dataset available offline ({type(e).__name__}: {first})") from e
    if first_row is not None and text_field not in first_row:
        raise ConfigError("data.text_field", text_field, f"a column of {spec}: {sorted(first_row)}")
    return (row[text_field] for row in itertools.chain([first_row] if first_row else [], rows)
            if isinstance(row[text_field], str) and row[text_field])


# ----------------------------------------------------------------------------------------------- tokens


def first_real_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Column of the first stream token in every sequence: 1 when a BOS is prepended, else 0."""
    return int(tokenizer.bos_token_id is not None)


def token_stream(texts: list[str], tokenizer: PreTrainedTokenizerBase, limit: Optional[int] = None) -> torch.Tensor:
    """All documents' token ids (no special tokens) joined by EOS (when the tokenizer has one): LongTensor (T,).
    Stops tokenizing once `limit` tokens are reached (the result may be longer)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), TOKENIZE_BATCH):
        # verbose=False: documents longer than the model's context are fine here, they get cut into sequences.
        batch = tokenizer(texts[start:start + TOKENIZE_BATCH], add_special_tokens=False, verbose=False)["input_ids"]
        for doc in batch:
            if ids and eos is not None:
                ids.append(eos)
            ids.extend(doc)
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids, dtype=torch.int64)


def tokenize(texts: list[str], tokenizer: PreTrainedTokenizerBase, seq_len: int,
             max_sequences: Optional[int] = None) -> torch.Tensor:
    """Cut the token stream of `texts` into sequences: LongTensor (N, seq_len), N <= max_sequences.

    Each row is `[bos] + (seq_len - 1)` consecutive stream tokens when the tokenizer has a BOS, else `seq_len`
    stream tokens; rows follow each other in the stream. The last partial chunk is dropped.
    """
    first = first_real_token(tokenizer)
    body = seq_len - first  # stream tokens per sequence
    limit = None if max_sequences is None else max_sequences * body
    stream = token_stream(texts, tokenizer, limit)
    n = len(stream) // body if max_sequences is None else min(len(stream) // body, max_sequences)
    rows = stream[: n * body].view(n, body)
    if first:
        rows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.int64), rows], dim=1)
    return rows


def position_range(first: int, seq_len: int, min_pos: int) -> tuple[int, int]:
    """The inclusive range [first + min_pos, seq_len - 1] explained positions are drawn from; checked non-empty."""
    if first + min_pos > seq_len - 1:
        raise ConfigError("data.min_pos", min_pos, f"an integer <= {seq_len - 1 - first} (data.seq_len={seq_len}, "
                          f"first real token at {first})")
    return first + min_pos, seq_len - 1


def sample_positions(keys: torch.Tensor, first: int, seq_len: int, min_pos: int) -> torch.Tensor:
    """The explained position per key, uniform in [first + min_pos, seq_len - 1]: LongTensor shaped like keys."""
    low, high = position_range(first, seq_len, min_pos)
    return rng.randint(keys, low, high)


# ----------------------------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Tokenised corpus split into training and validation sequences (a disjoint block: the last rows). `train` and
    `val` index like (N, seq_len) int64 tensors (`SequenceView`s over the token store, or tensors in tests)."""

    train: object  # (N_train, seq_len) rows
    val: object  # (N_val, seq_len) rows
    first: int  # column of the first real (non-BOS) token
    fingerprint: str  # the token store's content digest with the split: a dump records it

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    @classmethod
    def build(cls, data: DataConfig, tokenizer: PreTrainedTokenizerBase, endpoint_url: Optional[str] = None,
              index: int = 0, count: int = 1, build_here: Optional[bool] = None) -> "Corpus":
        """Open the config's token store (building or waiting for it: `TokenStore.open`), take its first
        `data.max_sequences` sequences and split them. Validation is the last ceil(val_fraction * N) rows."""
        from lens.data.tokens import SequenceView, TokenStore

        if data.max_sequences is not None and data.max_sequences < 2:
            raise ConfigError("data.max_sequences", data.max_sequences, "None (all) or an integer >= 2 (train + val)")
        first = first_real_token(tokenizer)
        position_range(first, data.seq_len, data.min_pos)  # fail before the slow part
        store = TokenStore.open(data, tokenizer, endpoint_url, index, count, build_here)
        n = store.n if data.max_sequences is None else min(store.n, data.max_sequences)
        if n < 2:  # one for training, one for validation
            raise ConfigError("data.corpus", data.corpus, f"a corpus with at least 2 sequences of data.seq_len="
                              f"{data.seq_len} tokens (it has {n}: use more text or a shorter seq_len)")
        n_val = math.ceil(data.val_fraction * n)
        if n - n_val < 1:
            raise ConfigError("data.val_fraction", data.val_fraction, f"a fraction leaving at least 1 training "
                              f"sequence (the corpus has {n} sequences, {n_val} would be held out)")
        fingerprint = hashlib.sha256(f"{store.fingerprint}:{n}:{n_val}".encode()).hexdigest()[:16]
        return cls(train=SequenceView(store, 0, n - n_val), val=SequenceView(store, n - n_val, n), first=first,
                   fingerprint=fingerprint)


def source_stamp(corpus: str) -> list:
    """What changes when the corpus content changes: the Python version for stdlib, sizes and mtimes of local files.
    (A hub dataset name is taken as fixed.)"""
    if corpus == "stdlib":
        return [sys.version]
    path = Path(corpus).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the full tokenizer definition, so two tokenizers with the same name and size never share a cache."""
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.backend_tokenizer.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
