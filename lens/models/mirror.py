"""A hub model's files mirrored once into the run's storage, and read from there by every start.

Without it every pod downloads the model from the hub whenever it starts, and a spot restart is a fresh container:
gigabytes per pod per preemption, from a hub that rate-limits and can be down. With it the hub is read only while
the mirror is absent. The mirror of `<model.name>@<model.revision>` is one folder of a `Storage` (local or S3):

    MANIFEST.json        written last, create-only: format, model, revision, commit, folder, and per file its size
                         and sha256; a mirror is what its manifest says, and objects without one are ignored
    <folder>/config.json, model-00001-of-00002.safetensors, tokenizer.json, ...   the files, under the folder the
                         manifest names (`<commit[:12]>-<random>`: one per writer)

Starters that find no manifest at the same time each upload into their own folder and publish the manifest with a
create-only write (`Storage.write_if(key, data, None)`): exactly one wins; the others delete their folder and use
the winner's. Readers check every file's size against the manifest, and its sha256 whenever the bytes are copied.

An S3 mirror is copied to local scratch (`$LENS_CACHE/models/<name>@<revision>/<folder>`, on a cluster the pod's
cache volume or the chart's `modelCache` volume): the files in parallel, each in parallel ranged parts (boto3's
transfer manager, straight to disk), published by one rename; `from_pretrained` then memory-maps the safetensors
there, so no second full copy is held in host memory. A later start on the same node reuses a copy whose sizes match
the manifest. A local mirror is read in place.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lens.errors import InputError, RetryableError
from lens.storage import LocalStorage, Storage, file_sha256

MANIFEST = "MANIFEST.json"
FORMAT = 1
PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt")
"""Top-level files of a hub snapshot the mirror keeps: weights (safetensors only), configs, tokenizer files."""
THREADS = 4  # files copied at once; each S3 transfer also runs its parts in parallel (lens.storage)


@dataclass
class Snapshot:
    """A model's files in a local folder, as the hub gave them, and the commit they are of."""

    folder: Path
    commit: str


def _log(msg: str) -> None:
    print(f"[lens.mirror] {msg}", file=sys.stderr, flush=True)


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created): released by the kernel if we die, so a crash never leaves it held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mirror_key(name: str, revision: str) -> str:
    """The mirror's folder under `model.cache`: `org/name@revision` (a revision's own `/` become `--`)."""
    return f"{name}@{revision.replace('/', '--')}"


def resolve(mirror: Storage, scratch: Path, name: str, revision: str, source: Callable[[], Snapshot]) -> Path:
    """A local folder holding the model: the mirror's (S3: its copy in `scratch`), or, when the mirror has no
    manifest yet, `source()`'s snapshot, which is first copied into the mirror.

    Processes sharing `scratch` (the ranks of one pod, pods sharing a node or volume) take turns, so one of them
    fetches and the others reuse its copy."""
    key = mirror_key(name, revision)
    lock = scratch / ".locks" / (key.replace("/", "--") + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as e:  # e.g. a node folder (the chart's modelCache.hostPath) owned by root
        raise InputError(f"model cache {scratch} is not writable ({e.strerror}); make it writable by this user (on a "
                         "cluster: the modelCache volume, by securityContext.runAsUser)") from None
    with file_lock(lock):
        manifest = read_manifest(mirror)
        if manifest is None:
            _log(f"{key}: no model mirror at {mirror.uri()} yet: copying the hub's files there")
            snapshot = source()
            manifest, won = publish(mirror, snapshot, name, revision)
            if won:  # this process just read these very files from the hub
                return snapshot.folder
        return local_copy(mirror, manifest, scratch / key)


def read_manifest(mirror: Storage) -> dict | None:
    """The mirror's manifest; None when there is none (no mirror, or one whose writer died before publishing)."""
    try:
        data = mirror.read_bytes(MANIFEST)
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
        for rel, entry in manifest["files"].items():
            if not isinstance(entry["size"], int) or len(entry["sha256"]) != 64 or not _one_name(rel):
                raise ValueError(f"bad entry for {rel!r}")
        if not _one_name(manifest["folder"]):
            raise ValueError(f"bad folder {manifest['folder']!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(mirror, MANIFEST, f"not a manifest: {e}") from None
    return manifest


def _one_name(name: object) -> bool:
    """Whether `name` is one path component (so a manifest cannot point outside the mirror or the local copy)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _damaged(mirror: Storage, what: str, problem: str) -> InputError:
    return InputError(f"model mirror {mirror.uri()}: {what} is damaged ({problem}); delete {mirror.uri()} (all of "
                      f"it) and the next start copies the model from the hub again")


def snapshot_files(folder: Path) -> list[str]:
    """The top-level files of a snapshot folder that the mirror keeps (`PATTERNS`), sorted."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in PATTERNS))


def publish(mirror: Storage, snapshot: Snapshot, name: str, revision: str) -> tuple[dict, bool]:
    """Upload `snapshot` into a folder of its own and publish its manifest, unless another writer's came first.
    Returns the mirror's manifest and whether it is ours."""
    files = snapshot_files(snapshot.folder)
    if not any(f.endswith(".safetensors") for f in files):
        raise InputError(f"model.name={name!r} (revision {revision}) has no .safetensors weights on the hub, and the "
                         "model mirror holds safetensors only; set model.cache=none to load it without a mirror")
    folder = f"{snapshot.commit[:12]}-{secrets.token_hex(4)}"
    start = time.perf_counter()

    def put(rel: str) -> tuple[str, dict]:
        path = snapshot.folder / rel
        entry = {"size": path.stat().st_size, "sha256": file_sha256(path)}
        mirror.write_file(f"{folder}/{rel}", path)
        return rel, entry

    try:
        with ThreadPoolExecutor(THREADS) as pool:
            entries = dict(pool.map(put, files))
        manifest = {"format": FORMAT, "model": name, "revision": revision, "commit": snapshot.commit,
                    "folder": folder, "files": entries, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        won = mirror.write_if(MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode(), None)
    except BaseException:
        _forget(mirror, folder)
        raise
    if won:
        size = sum(e["size"] for e in entries.values())
        _log(f"mirrored {len(files)} files ({size / 1e6:.0f} MB, commit {snapshot.commit[:12]}) to "
             f"{mirror.uri(folder)} in {time.perf_counter() - start:.1f} s")
        return manifest, True
    _forget(mirror, folder)
    theirs = read_manifest(mirror)
    if theirs is None:  # the create-only write failed, yet there is no manifest: someone deleted it meanwhile
        raise RetryableError(f"model mirror {mirror.uri()}: another writer's manifest vanished; retrying later")
    _log(f"another process published the mirror {mirror.uri()} first: using its copy")
    return theirs, False


def _forget(mirror: Storage, folder: str) -> None:
    try:
        mirror.delete_prefix(folder)
    except Exception as e:  # an orphan folder is harmless: no manifest names it
        _log(f"could not delete the unpublished upload {mirror.uri(folder)} ({type(e).__name__}); it is ignored")


def local_copy(mirror: Storage, manifest: dict, scratch: Path) -> Path:
    """The mirror's files as a local folder: a local mirror in place, an S3 one copied into `scratch` once."""
    if isinstance(mirror, LocalStorage):  # already on a file system: nothing to copy
        folder = Path(mirror.uri(manifest["folder"]))
        problem = mismatch(folder, manifest)
        if problem:
            raise _damaged(mirror, problem[0], problem[1])
        _log(f"loading the model from the mirror {folder}")
        return folder
    dest = scratch / manifest["folder"]
    if dest.is_dir():  # published by rename: complete unless damaged since
        problem = mismatch(dest, manifest)
        if problem is None:
            _log(f"reusing the local copy {dest} of the mirror {mirror.uri()}")
            return dest
        _log(f"the local copy {dest} does not match the mirror ({problem[0]}: {problem[1]}): fetching it again")
        shutil.rmtree(dest)
    scratch.mkdir(parents=True, exist_ok=True)
    for stale in scratch.glob(".fetch-*"):  # a killed fetch's; we hold the lock, so no one is writing it
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=scratch, prefix=".fetch-"))
    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda rel: _fetch(mirror, manifest, rel, tmp / rel), manifest["files"]))
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(e["size"] for e in manifest["files"].values())
    took = time.perf_counter() - start
    _log(f"fetched the model mirror {mirror.uri()} ({size / 1e6:.0f} MB in {took:.1f} s, "
         f"{size / 1e6 / max(took, 1e-9):.0f} MB/s) to {dest}")
    return dest


def _fetch(mirror: Storage, manifest: dict, rel: str, path: Path) -> None:
    """Copy one file of the mirror to `path`, checked against the manifest; a bad copy is fetched once more."""
    want, key = manifest["files"][rel], f"{manifest['folder']}/{rel}"
    for attempt in (1, 2):
        try:
            mirror.read_file(key, path)
        except FileNotFoundError:
            raise _damaged(mirror, rel, f"{mirror.uri(key)} is missing") from None
        size = path.stat().st_size
        if size != want["size"]:
            problem = f"{size} bytes, the manifest says {want['size']}"
        elif file_sha256(path) != want["sha256"]:
            problem = "its sha256 differs from the manifest's"
        else:
            return
        if attempt == 1:
            _log(f"{mirror.uri(key)}: {problem}; fetching it again")
    raise _damaged(mirror, rel, problem)


def mismatch(folder: Path, manifest: dict) -> tuple[str, str] | None:
    """(file, problem) for the first file of `folder` missing or not of the manifest's size; None if all match."""
    for rel, entry in sorted(manifest["files"].items()):
        try:
            size = (folder / rel).stat().st_size
        except FileNotFoundError:
            return rel, f"missing from {folder}"
        if size != entry["size"]:
            return rel, f"{size} bytes, the manifest says {entry['size']}"
    return None
