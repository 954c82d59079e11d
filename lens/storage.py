"""Storage: the only module that knows local paths from ``s3://`` URIs.

Everything else names objects by *keys*: ``/``-separated paths relative to a root URI, such as
``checkpoints/step-00000100/state.json``. :func:`open_storage` turns the root URI into a backend:

* a local path (``runs/x``, ``/abs/runs/x`` or ``file:///abs/runs/x``) -> :class:`LocalStorage`;
* ``s3://bucket/prefix`` -> :class:`S3Storage` (boto3, also any S3-compatible endpoint).

Both backends keep one contract, so callers never branch on the scheme:

* a write publishes a complete object or nothing: readers never see half an object, even after ``kill -9``;
* a missing key on read raises ``FileNotFoundError`` naming the full URI;
* "folders" exist only as key prefixes: ``list``/``list_dirs`` see a folder while it holds an object, and
  ``delete``/``delete_prefix`` leave no empty folder behind;
* deleting something that is not there is not an error (retries and garbage collection stay simple).

Writes are not ordered across keys (S3 gives no such promise either): a caller that needs "all of these or none"
writes a marker object last and treats objects without it as absent (see ``lens/train/checkpoint.py``).

S3 faults: every S3 operation is retried as a whole with exponential backoff (``S3_ATTEMPTS`` tries) on throttling,
5xx and connection errors, on top of botocore's own per-request retries; an object is still complete or absent, so a
retried write is safe. A missing bucket, denied access or bad credentials are ``InputError`` (exit 2) naming the
bucket; ``Storage.check()`` finds them before any work is done.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
import re
import shutil
import logging
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import BinaryIO

from lens.errors import InputError

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Local writes go to ".<name>.<random>.tmp" beside the target; a killed writer leaves one behind, never listed.
_TMP_SUFFIX = ".tmp"
_TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a local file (a fetched object checked against the digest its manifest records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):  # hashlib releases the GIL on large updates: files hash in parallel
            digest.update(chunk)
    return digest.hexdigest()


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """Open the storage rooted at ``uri``: a local path, ``file://...`` or ``s3://bucket/prefix``.

    ``endpoint_url`` selects an S3-compatible server (MinIO, moto, ...); without it boto3 reads
    ``AWS_ENDPOINT_URL`` and its usual configuration. It is ignored for local paths.
    """
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else ""
    if scheme == "":
        return LocalStorage(uri)
    if scheme == "file":
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InputError(f"storage URI {uri!r} names host {parsed.netloc!r}; file:// URIs must be local")
        return LocalStorage(urllib.request.url2pathname(parsed.path))
    if scheme == "s3":
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise InputError(f"storage URI {uri!r} has no bucket; expected s3://bucket[/prefix]")
        return S3Storage(bucket, prefix.strip("/"), _s3_client(endpoint_url))
    raise InputError(f"storage URI {uri!r} has unsupported scheme {scheme!r}; expected a local path, file:// or s3://")


def _check_key(key: str, *, allow_root: bool = False) -> str:
    """Return ``key`` without surrounding slashes; refuse keys that could escape the root."""
    stripped = key.strip("/")
    if not stripped:
        if allow_root:
            return ""
        raise ValueError(f"storage key {key!r} is empty; expected a path relative to the storage root")
    parts = stripped.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in stripped:
        raise ValueError(f"storage key {key!r} is invalid; expected '/'-separated names without '.', '..' or '//'")
    return stripped


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


class Storage(abc.ABC):
    """Objects under one root URI, addressed by ``/``-separated keys relative to it."""

    @abc.abstractmethod
    def uri(self, key: str = "") -> str:
        """The full URI (or local path) of ``key``; ``uri()`` is the root itself."""

    @abc.abstractmethod
    def sub(self, prefix: str) -> Storage:
        """The storage rooted at ``prefix`` under this root (nothing is created)."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing any old object; the object is complete or absent."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object at ``key``; ``FileNotFoundError`` naming its URI when there is none."""

    @abc.abstractmethod
    def write_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Store the local file ``local_path`` at ``key`` without holding it in memory; complete or absent."""

    @abc.abstractmethod
    def read_file(self, key: str, local_path: str | os.PathLike) -> None:
        """Copy the object at ``key`` to ``local_path``, published atomically there; ``FileNotFoundError`` if none."""

    @abc.abstractmethod
    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """The object and a version tag for ``write_if``; ``FileNotFoundError`` when absent."""

    @abc.abstractmethod
    def write_if(self, key: str, data: bytes, version: str | None) -> bool:
        """Compare-and-swap: write only if the object is still at ``version`` (``None``: still absent). Returns
        False, writing nothing, when another writer got there first. On an S3 server without conditional writes it
        falls back to a plain write (logged once)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object (not a folder) is stored at ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) of all objects under the folder ``prefix``, at any depth."""

    @abc.abstractmethod
    def list_dirs(self, prefix: str = "") -> list[str]:
        """Sorted names (one path component each) of the non-empty folders directly under ``prefix``."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; nothing happens if there is none."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder ``prefix`` (which must not be the root). Not atomic."""

    @abc.abstractmethod
    def move_prefix(self, prefix: str, to: str) -> None:
        """Move every object under the folder ``prefix`` to the folder ``to`` (which must hold nothing). Not atomic:
        a move cut short leaves some objects in each folder, none lost."""

    @abc.abstractmethod
    def dcp_writer(self, thread_count: int = 1):
        """A ``torch.distributed.checkpoint`` storage writer into this root (a folder: one file per rank and
        thread, and DCP's ``.metadata``, written last)."""

    @abc.abstractmethod
    def dcp_reader(self):
        """A ``torch.distributed.checkpoint`` storage reader of what ``dcp_writer`` wrote here."""

    def check(self, write: bool = False) -> None:
        """Raise ``InputError`` now if the root can never be used (S3: missing bucket, access denied, bad
        credentials; local with `write`: the folder cannot be created or written), so a job fails in its first
        second with one line instead of after hours of work."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"


class LocalStorage(Storage):
    """A directory on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))

    def check(self, write: bool = False) -> None:
        if not write:
            return
        existing = self.root
        while not os.path.exists(existing):  # the folder is made on the first write: its nearest existing parent
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise InputError(f"storage path {self.root}: {existing} is a file, not a folder; choose another path")
        try:  # a scratch file is the only test that also holds for root and for read-only mounts
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise InputError(f"storage path {self.root}: cannot write in {existing} ({e.strerror}); choose a "
                             "writable path") from None

    def _path(self, key: str, *, allow_root: bool = False) -> str:
        key = _check_key(key, allow_root=allow_root)
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def uri(self, key: str = "") -> str:
        return self._path(key, allow_root=True)

    def sub(self, prefix: str) -> LocalStorage:
        return LocalStorage(self._path(prefix))

    def write_bytes(self, key: str, data: bytes) -> None:
        _publish(self._path(key), lambda f: f.write(data))

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"no object at {path}") from None

    def write_file(self, key: str, local_path: str | os.PathLike) -> None:
        with open(local_path, "rb") as src:
            _publish(self._path(key), lambda f: shutil.copyfileobj(src, f, 16 << 20))

    def read_file(self, key: str, local_path: str | os.PathLike) -> None:
        path = self._path(key)
        try:
            src = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"no object at {path}") from None
        with src:
            _publish(os.path.abspath(local_path), lambda f: shutil.copyfileobj(src, f, 16 << 20))

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read(), _file_version(f.fileno())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(f"no object at {path}") from None

    def write_if(self, key: str, data: bytes, version: str | None) -> bool:
        import fcntl

        path = self._path(key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        lock = os.open(directory, os.O_RDONLY)
        try:  # writers of this folder take turns; every publish is a rename, so a new version is a new inode
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                current = None
            else:
                current = _file_version(fd)
                os.close(fd)
            if current != version:
                return False
            _publish(path, lambda f: f.write(data))
            return True
        finally:
            os.close(lock)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def list(self, prefix: str = "") -> list[str]:
        prefix = _check_key(prefix, allow_root=True)
        top = self._path(prefix, allow_root=True)
        keys = []
        for directory, _, files in os.walk(top):
            rel = os.path.relpath(directory, top)
            rel = "" if rel == "." else rel.replace(os.sep, "/")
            keys += [_join(prefix, rel, name) for name in files if not _TMP_NAME.match(name)]
        return sorted(keys)

    def list_dirs(self, prefix: str = "") -> list[str]:
        top = self._path(prefix, allow_root=True)
        try:
            entries = list(os.scandir(top))
        except (FileNotFoundError, NotADirectoryError):
            return []
        # A folder holding nothing (or only a killed writer's temp file) does not exist as far as S3 is concerned.
        return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False) and _has_objects(e.path))

    def delete(self, key: str) -> None:
        path = self._path(key)
        _remove_if_present(path)
        self._prune_empty_parents(os.path.dirname(path))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            self._prune_empty_parents(os.path.dirname(path))

    def move_prefix(self, prefix: str, to: str) -> None:
        source, target = self._path(prefix), self._path(to)
        if os.path.exists(target):
            raise FileExistsError(f"cannot move {source} to {target}: it exists")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)  # one rename: the folder moves whole
        self._prune_empty_parents(os.path.dirname(source))

    def dcp_writer(self, thread_count: int = 1):
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(self.root, sync_files=True, thread_count=thread_count)

    def dcp_reader(self):
        from torch.distributed.checkpoint import FileSystemReader

        return FileSystemReader(self.root)

    def _prune_empty_parents(self, directory: str) -> None:
        """Remove now-empty folders up to (not including) the root, as S3 would show no folder there."""
        while directory.startswith(self.root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:  # not empty (or already gone): stop
                return
            directory = os.path.dirname(directory)


def _publish(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` into a temp file beside ``path``, fsync it, then rename it over ``path``.

    ``os.replace`` within one directory is atomic on POSIX, so ``path`` holds the old object or the whole new one,
    whenever the writer dies. The directory is fsynced too, so the rename itself survives a power loss.
    """
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_if_present(tmp)
        raise
    _fsync_dir(directory)


def _file_version(fd: int) -> str:
    st = os.fstat(fd)
    return f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _has_objects(directory: str) -> bool:
    """Whether ``directory`` holds at least one object (at any depth), ignoring writers' temp files."""
    for _, _, files in os.walk(directory):
        if any(not _TMP_NAME.match(name) for name in files):
            return True
    return False


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except (FileNotFoundError, IsADirectoryError):  # a folder is no object, as on S3
        pass


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _s3_client(endpoint_url: str | None):
    import boto3  # only S3 users need boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    # botocore's "standard" mode retries throttling, 5xx and connection errors per request with jittered backoff;
    # the timeouts bound how long a hung server can stall one request before that retry kicks in.
    # One transfer runs 10 parts at once and callers run several transfers at once (the model mirror copies 4 files):
    # a pool of botocore's default 10 connections would make them wait for, and discard, connections.
    config = Config(retries={"max_attempts": BOTO_ATTEMPTS, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                    max_pool_connections=64)
    if endpoint_url:  # self-hosted S3 servers (MinIO, moto, s3rver) route requests by path, not by bucket subdomain
        config = config.merge(Config(s3={"addressing_style": "path"}))
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


BOTO_ATTEMPTS = 5  # per request, inside botocore
S3_ATTEMPTS = 6  # per whole operation, around botocore: rides out a server gone for ~30 s (connection refused)
S3_BACKOFF = (0.5, 8.0)  # first and largest sleep between whole-operation attempts, seconds
# Transfers above 16 MiB go multipart in 16 MiB parts, up to 10 at once (a single PUT stops at 5 GB; parts retry one
# by one; 10,000 parts allow objects of 160 GB). Measured against a loopback S3 server, 16 MiB parts upload 384 MB
# 35% faster than 64 MiB ones (more parts in flight) and as fast as boto3's 8 MiB default.
MULTIPART_BYTES = 16 << 20
# Error codes that no retry can fix: the user must change the bucket, the credentials or the permissions.
_INPUT_CODES = {
    "NoSuchBucket": "does not exist",
    "AccessDenied": "is not accessible with these credentials (access denied)",
    "AllAccessDisabled": "is not accessible (all access disabled)",
    "InvalidAccessKeyId": "rejected the credentials (invalid access key id)",
    "SignatureDoesNotMatch": "rejected the credentials (wrong secret key)",
    "ExpiredToken": "rejected the credentials (expired token)",
    "InvalidToken": "rejected the credentials (invalid token)",
}
_RETRY_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable"}


def _error_code(e: BaseException) -> tuple[str, int]:
    """(S3 error code, HTTP status) of a botocore ClientError, else ("", 0)."""
    response = getattr(e, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")), int(response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode", 0) or 0)


def _classify(e: BaseException) -> tuple[str, str]:
    """("input", why) for errors the user must fix, ("retry", "") for transient ones, ("", "") for the rest."""
    from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return "input", "cannot be used: no AWS credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    if isinstance(e, ClientError):
        code, status = _error_code(e)
        if code in _INPUT_CODES:
            return "input", _INPUT_CODES[code]
        if status == 403:  # HEAD responses have no body, so no code: 403 is all we learn
            return "input", "is not accessible with these credentials (access denied or invalid credentials)"
        if code in _RETRY_CODES or status == 429 or status >= 500 or (code.isdigit() and int(code) >= 500):
            return "retry", ""
        return "", ""
    if isinstance(e, (S3UploadFailedError, S3TransferFailedError)):
        # The transfer manager folds the ClientError into its message: "... An error occurred (NoSuchBucket) ..."
        text = str(e)
        for code, why in _INPUT_CODES.items():
            if f"({code})" in text:
                return "input", why
        return "retry", ""
    if isinstance(e, (ConnectionError, HTTPClientError)):  # refused, reset, timed out, DNS: the server may come back
        return "retry", ""
    return "", ""


class S3Storage(Storage):
    """Objects under ``s3://bucket/prefix``. An S3 PUT (single or multipart) is atomic: complete or absent."""

    _warned_unconditional = False

    def __init__(self, bucket: str, prefix: str, client):
        self.bucket, self.prefix, self.client = bucket, prefix, client

    def _call(self, what: str, fn: Callable):
        """``fn()`` with whole-operation retries on transient faults; unfixable ones become ``InputError``.

        ``what`` (e.g. ``"write s3://b/k"``) names the operation in the log line and the error."""
        delay, longest = S3_BACKOFF
        for attempt in range(1, S3_ATTEMPTS + 1):
            try:
                return fn()
            except Exception as e:
                kind, why = _classify(e)
                if kind == "input":
                    raise InputError(f"S3 bucket {self.bucket!r} {why} ({what})") from e
                if kind != "retry" or attempt == S3_ATTEMPTS:
                    raise
                log.warning("S3 %s failed (%s: %s); retry %d/%d in %.1f s", what, type(e).__name__,
                            str(e).splitlines()[0][:200], attempt, S3_ATTEMPTS - 1, delay)
                time.sleep(delay)
                delay = min(2 * delay, longest)
        raise AssertionError("unreachable")

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

    def check(self, write: bool = False) -> None:
        from botocore.exceptions import ClientError

        try:
            self._call(f"check {self.uri()}", lambda: self.client.head_bucket(Bucket=self.bucket))
        except ClientError as e:  # HEAD responses carry no body: only the status says what went wrong
            code, status = _error_code(e)
            if code in ("404", "NoSuchBucket") or status == 404:
                raise InputError(f"S3 bucket {self.bucket!r} does not exist ({self.uri()})") from None
            if code in ("403", "AccessDenied") or status == 403:
                raise InputError(f"S3 bucket {self.bucket!r} is not accessible with these credentials "
                                 f"(access denied or invalid credentials; {self.uri()})") from None
            raise

    def _key(self, key: str, *, allow_root: bool = False) -> str:
        return _join(self.prefix, _check_key(key, allow_root=allow_root))

    def _folder(self, prefix: str) -> str:
        """The S3 key prefix of a folder: ends with '/' unless it is the bucket root."""
        folder = self._key(prefix, allow_root=True)
        return folder + "/" if folder else ""

    def uri(self, key: str = "") -> str:
        return f"s3://{_join(self.bucket, self._key(key, allow_root=True))}"

    def sub(self, prefix: str) -> S3Storage:
        return S3Storage(self.bucket, self._key(prefix), self.client)

    def write_bytes(self, key: str, data: bytes) -> None:
        # upload_fileobj switches to a multipart upload for large objects (a single PUT stops at 5 GB); a fresh
        # stream per attempt, since a failed attempt may have consumed the old one.
        self._call(f"write {self.uri(key)}", lambda: self.client.upload_fileobj(
            io.BytesIO(data), self.bucket, self._key(key), Config=self._transfer_config()))

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        try:
            return self._call(f"read {self.uri(key)}", read)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no object at {self.uri(key)}") from None

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        def read() -> tuple[bytes, str]:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), response["ETag"]

        try:
            return self._call(f"read {self.uri(key)}", read)
        except self.client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no object at {self.uri(key)}") from None

    def write_if(self, key: str, data: bytes, version: str | None) -> bool:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

        def put() -> bool | None:  # None: the server does not do conditional writes
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                return True
            except ClientError as e:
                code, status = _error_code(e)
                if status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if status == 501 or code == "NotImplemented":
                    return None
                raise

        written = self._call(f"write {self.uri(key)}", put)
        if written is None:
            if not S3Storage._warned_unconditional:
                log.warning("this S3 endpoint has no conditional writes; writing %s unconditionally", self.uri(key))
                S3Storage._warned_unconditional = True
            self.write_bytes(key, data)
            return True
        return written

    def write_file(self, key: str, local_path: str | os.PathLike) -> None:
        self._call(f"write {self.uri(key)}", lambda: self.client.upload_file(
            os.fspath(local_path), self.bucket, self._key(key), Config=self._transfer_config()))

    def read_file(self, key: str, local_path: str | os.PathLike) -> None:
        from botocore.exceptions import ClientError

        local_path = os.path.abspath(local_path)
        directory, name = os.path.split(local_path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=directory)
        os.close(fd)
        try:
            self._call(f"read {self.uri(key)}", lambda: self.client.download_file(
                self.bucket, self._key(key), tmp, Config=self._transfer_config()))
            os.replace(tmp, local_path)
        except ClientError as e:
            _remove_if_present(tmp)
            if _error_code(e)[0] in ("404", "NoSuchKey"):
                raise FileNotFoundError(f"no object at {self.uri(key)}") from None
            raise
        except BaseException:
            _remove_if_present(tmp)
            raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(f"stat {self.uri(key)}", lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except ClientError as e:
            if _error_code(e)[0] in ("404", "NoSuchKey"):
                return False
            raise
        return True

    def _objects(self, folder: str, what: str, **kwargs) -> list[dict]:
        """All list_objects_v2 pages under ``folder`` (key prefix), listed again from the start on a fault."""
        def pages() -> list[dict]:
            paginator = self.client.get_paginator("list_objects_v2")
            return list(paginator.paginate(Bucket=self.bucket, Prefix=folder, **kwargs))

        return self._call(what, pages)

    def list(self, prefix: str = "") -> list[str]:
        folder = self._folder(prefix)
        root = self._folder("")
        pages = self._objects(folder, f"list {self.uri(prefix)}")
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        return sorted(key[len(root) :] for key in keys)

    def list_dirs(self, prefix: str = "") -> list[str]:
        folder = self._folder(prefix)
        pages = self._objects(folder, f"list {self.uri(prefix)}", Delimiter="/")
        return sorted(p["Prefix"][len(folder) :].rstrip("/") for page in pages for p in page.get("CommonPrefixes", []))

    def delete(self, key: str) -> None:
        self._call(f"delete {self.uri(key)}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def delete_prefix(self, prefix: str) -> None:
        folder = self._folder(_check_key(prefix))
        pages = self._objects(folder, f"list {self.uri(prefix)}")
        keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            response = self._call(f"delete under {self.uri(prefix)}", lambda: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            if response.get("Errors"):
                first = response["Errors"][0]
                raise OSError(
                    f"could not delete {len(response['Errors'])} objects under {self.uri(prefix)}, "
                    f"first s3://{self.bucket}/{first['Key']}: {first.get('Code')} {first.get('Message')}"
                )

    def move_prefix(self, prefix: str, to: str) -> None:
        folder, target = self._folder(_check_key(prefix)), self._folder(_check_key(to))
        if self._objects(target, f"list {self.uri(to)}")[0].get("Contents"):
            raise FileExistsError(f"cannot move {self.uri(prefix)} to {self.uri(to)}: it holds objects")
        pages = self._objects(folder, f"list {self.uri(prefix)}")
        for key in [obj["Key"] for page in pages for obj in page.get("Contents", [])]:
            # A server-side copy: no bytes pass through this process (multipart above 16 MiB, as uploads).
            self._call(f"copy s3://{self.bucket}/{key}", lambda key=key: self.client.copy(
                {"Bucket": self.bucket, "Key": key}, self.bucket, target + key[len(folder):],
                Config=self._transfer_config()))
        self.delete_prefix(prefix)

    def _dcp_client(self):
        """s3torchconnector's client for this bucket's endpoint and region (path-style on a self-hosted server)."""
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client

        endpoint = self.client.meta.endpoint_url
        custom = not endpoint.endswith(".amazonaws.com")
        region = self.client.meta.region_name or "us-east-1"
        return region, S3Client(region, endpoint=endpoint if custom else None,
                                s3client_config=S3ClientConfig(force_path_style=custom))

    def dcp_writer(self, thread_count: int = 1):
        from s3torchconnector.dcp import S3FileSystem, S3StorageWriter

        region, client = self._dcp_client()
        writer = S3StorageWriter(region, self.uri(), thread_count=thread_count)
        # The writer builds its client from the environment only; this one reaches this storage's endpoint.
        writer.fs = S3FileSystem(region, s3_client=client)
        writer.path = writer.fs.init_path(self.uri())
        return writer

    def dcp_reader(self):
        from s3torchconnector.dcp import S3FileSystem, S3StorageReader

        region, client = self._dcp_client()
        reader = S3StorageReader(region, self.uri())
        reader.fs = S3FileSystem(region, s3_client=client, reader_constructor=reader._reader_constructor)
        reader.path = reader.fs.init_path(self.uri())
        return reader
