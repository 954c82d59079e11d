"""Benchmark: the data path at scale, each figure against a baseline measured in the same script.

    python bench/data.py                    # N = 20 million tokens (the rss runs tokenize 20 M and 200 M tokens)
    python bench/data.py --tokens 2e6       # a quicker look on a small machine

Prints three labelled ratios:
  rss ratio        peak RSS of `lens train` (tokenizing into the token store, then 20 steps on the fly) from a corpus
                   of 10 N tokens / the same from N tokens; each run is its own process with a fresh cache
                   (goal <= 1.1: memory does not grow with the corpus)
  tokenize ratio   token-store build throughput / the tokenizer's own batched encoding of the same documents in
                   this process (goal >= 0.8: the store adds little to the tokenizer)
  layers speedup   three single-layer `lens dump`s / one `lens dump` with `data.layers` of those 3 layers, medians
                   of 3 runs each (goal >= 2.5; the early-exit ideal is sum(layer + 1) / (deepest + 1))
The two throughput figures count this process's CPU time (all its threads), so other load on a shared machine
does not skew them.

The corpus is generated offline: Python's docstrings (the `stdlib` corpus), shuffled with a fixed seed and
repeated until the token count is reached, in a .txt file. The tokenizer is SmolLM2's (fast, `make model`); the
model is a small random Llama with its vocabulary, so the figures measure the data path, not the model.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lens.config import DataConfig, from_dictconfig  # noqa: E402
from lens.data.corpus import TOKENIZE_BATCH, iter_texts, stdlib_texts  # noqa: E402
from lens.storage import LocalStorage  # noqa: E402

RSS_CHILD = """
import resource, sys
from lens.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def make_corpus(path: Path, tokens: int, tokenizer) -> None:
    """A .txt corpus of about `tokens` tokens: shuffled docstrings, repeated, documents separated by blank lines."""
    docs = [d.replace("\n\n", "\n") for d in stdlib_texts()]  # one docstring = one document in the .txt
    sample = docs[:2000]
    per_char = sum(len(t) for t in tokenizer(sample, add_special_tokens=False)["input_ids"]) / sum(map(len, sample))
    want_chars = int(tokens / per_char)
    rng = random.Random(0)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < want_chars:
            rng.shuffle(docs)
            for d in docs:
                f.write(d + "\n\n")
                written += len(d) + 2
                if written >= want_chars:
                    break


def make_model(folder: Path, tokenizer, layers: int, d: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_config(model: Path, corpus: Path, run_dir: Path, **data) -> dict:
    return {
        "run": {"name": "bench-data", "dir": str(run_dir), "seed": 0},
        "model": {"name": str(model), "layer": 1},
        "decoder": {"prompt": "<bos>Explain <embed>:", "t_text": 2},
        "encoder": {"prompt": "<bos><text> means"},
        "loss": {"mse_weight": 1.0, "kl_weight": 1.0, "lm_weight": 0.0},
        "data": {"corpus": str(corpus), "seq_len": 64, **data},
        "optim": {"warmup": "1s", "decay": "constant"},
        "train": {"max_steps": 20, "batch_size": 4, "micro_batch_size": 4, "checkpoint_every": 1000,
                  "log_every": 10, "eval_every": 0, "eval_samples": 4},
        "wandb": {"mode": "disabled"},
    }


def peak_rss_mb(work: Path, name: str, model: Path, corpus: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of `lens train` (token store + 20 steps on the fly) in a fresh process and cache."""
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(run_config(model, corpus, work / f"run-{name}")))
    env = {**os.environ, "LENS_CACHE": str(work / f"cache-{name}"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, "train", str(config)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"lens train ({name}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    kb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return kb / 1024, time.perf_counter() - start


def tokenize_ratio(work: Path, corpus: Path, tokenizer) -> tuple[float, float, int]:
    """(store tokens/s, tokenizer tokens/s, tokens): the store build and a bare batched encoding of the same docs."""
    from lens.data import tokens

    def bare() -> int:
        n, batch = 0, []
        for doc in iter_texts(str(corpus)):
            batch.append(doc)
            if len(batch) == TOKENIZE_BATCH:
                n += sum(map(len, tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]))
                batch = []
        if batch:
            n += sum(map(len, tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]))
        return n

    start = time.process_time()
    n = bare()
    t_bare = time.process_time() - start
    store = LocalStorage(work / "store")
    start = time.process_time()
    tokens.build(DataConfig(corpus=str(corpus), seq_len=64), tokenizer, store)
    t_store = time.process_time() - start
    return n / t_store, n / t_bare, n


def layers_speedup(work: Path, corpus: Path, tokenizer, n_layers: int, layers: list[int],
                   repeats: int = 3) -> tuple[float, float]:
    """(CPU seconds of three single-layer dumps, of one dump of all three layers), the token store prebuilt. Each
    dump runs `repeats` times, round robin so that other load slows all alike; the medians are compared."""
    from lens.data.dump import dump

    model = work / "dump-model"
    make_model(model, tokenizer, n_layers, 256)
    base = run_config(model, corpus, work / "unused", on_the_fly=False, max_sequences=256, shard_size=128,
                      dump_batch_size=32, tokens=str(work / "dump-tokens"))

    def one(name: str, **data) -> float:
        cfg = from_dictconfig({**base, "data": {**base["data"], "activations": str(work / name), **data}})
        start = time.process_time()
        dump(cfg)
        return time.process_time() - start

    one("warm", layers=[0])  # builds the token store and warms the caches; not timed
    runs = [[layer] for layer in layers] + [layers]
    seconds = [[one(f"dump-{'-'.join(map(str, c))}-{r}", layers=c) for c in runs] for r in range(repeats)]
    median = [statistics.median(times) for times in zip(*seconds)]  # each dump's, over the repeats
    return sum(median[:-1]), median[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=20e6, help="N: the small corpus's tokens (the large has 10 N)")
    p.add_argument("--only", choices=("tokenize", "layers", "rss"), help="measure one figure only")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from lens.models.hub import SMOLLM2_FOLDER, default_cache_dir

    folder = default_cache_dir() / SMOLLM2_FOLDER
    if not folder.is_dir():
        sys.exit(f"the SmolLM2 tokenizer is not converted yet ({folder}): run `make model`")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    n = int(args.tokens)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        small, large = work / "small.txt", work / "large.txt"
        make_corpus(small, n, tokenizer)
        if args.only in (None, "tokenize"):
            store_tps, bare_tps, counted = tokenize_ratio(work, small, tokenizer)
            print(f"token store {store_tps / 1e6:.2f} M tokens/s, tokenizer alone {bare_tps / 1e6:.2f} M tokens/s "
                  f"({counted / 1e6:.1f} M tokens)")
            print(f"tokenize ratio {store_tps / bare_tps:.2f}")
        if args.only in (None, "layers"):
            singles, multi = layers_speedup(work, small, tokenizer, 8, [5, 6, 7])
            print(f"three single-layer dumps {singles:.1f} CPU s, one dump of layers [5, 6, 7] {multi:.1f} CPU s "
                  f"(early-exit ideal {(6 + 7 + 8) / 8:.2f}x)")
            print(f"layers speedup {singles / multi:.2f}")
        if args.only in (None, "rss"):
            make_model(work / "model", tokenizer, 2, 64)
            make_corpus(large, 10 * n, tokenizer)
            rss_small, t_small = peak_rss_mb(work, "small", work / "model", small)
            rss_large, t_large = peak_rss_mb(work, "large", work / "model", large)
            print(f"peak RSS: {rss_small:.0f} MB from {n / 1e6:.0f} M tokens ({t_small:.0f} s), {rss_large:.0f} MB "
                  f"from {10 * n / 1e6:.0f} M tokens ({t_large:.0f} s)")
            print(f"rss ratio {rss_large / rss_small:.2f}")


if __name__ == "__main__":
    main()
