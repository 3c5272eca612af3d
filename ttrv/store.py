"""Versioned weights and checkpoints over `file://` and `s3://`: the only channel between trainer and rollout pods.

Everything is a *set*: a prefix holding some files and a `manifest.json` that lists each file's size and sha256.
The manifest is written last and deleted first, so a set without one does not exist for readers, and a reader
verifies every byte against it before returning: a half-published, half-deleted, corrupt or truncated version is
never loaded. Weight versions are sets under `weights/v{step:06d}/` (safetensors shards, Hugging Face's index for
sharded full weights, peft's layout for LoRA adapters); the latest version is derived from the manifests, never
from a mutable pointer. Checkpoints and anything else use the same primitive under their own prefix.

Transfers run in parallel on a bounded thread pool: S3 objects go up as multipart uploads whose parts are slices of
the serialised shard (no copy per part) and come down as parallel ranged GETs into one buffer. Transient S3 errors
are retried with exponential backoff and jitter up to a time budget (then `StoreUnavailableError`); credential
errors fail at once (`StoreAuthError`). Credentials come from the environment or a mounted Secret directory, never
from the spec, and never reach a log line or an error message.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import mmap
import os
import random
import secrets
import shutil
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import check_bucket_name

from ttrv import log

if TYPE_CHECKING:  # torch is imported where tensors are handled: the operator reads progress without it
    import torch

logger = log.get_logger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ttrv.set/v1"
_TEMPORARY = ".ttrv-tmp"
"""Suffix of a file:// object or a fetched directory being written; listings skip it."""
WEIGHTS = "weights"
LEASES = f"{WEIGHTS}/leases"
MiB = 1 << 20
DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_SHARD_SIZE = 512 * MiB
DEFAULT_RETRY_SECONDS = float(os.environ.get("TTRV_STORE_RETRY_SECONDS", 90.0))
DEFAULT_LEASE_SECONDS = 600.0
_S3_MAX_PARTS = 10_000
_S3_MIN_PART = 5 * MiB
_READ_CHUNK = 1 * MiB
_AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidSecurity", "AuthorizationHeaderMalformed", "MissingSecurityHeader",
})
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted",
    "XMinioServerNotInitialized",
})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                               errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})
@cache
def _safetensors_dtypes() -> dict[torch.dtype, str]:
    import torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    return {name: dtype for dtype, name in _safetensors_dtypes().items()}
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


class StoreError(RuntimeError):
    """A store operation failed; the message names the store, the object and what to do."""


class StoreConfigError(StoreError, ValueError):
    """A store URI, key, credential source or argument that cannot work."""


class StoreAuthError(StoreError):
    """The object store refused the credentials (wrong, expired, or lacking permission)."""


class StoreUnavailableError(StoreError):
    """The object store did not answer within the retry budget; retrying the whole job later may succeed."""


class SetNotFoundError(StoreError, LookupError):
    """No complete set (no manifest) under a prefix, or it was deleted or replaced while being read."""


class CorruptVersionError(StoreError):
    """A file of a complete set is missing, truncated or has the wrong checksum."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What a complete set holds: each file's size and sha256, free-form `meta`, and when it was published."""

    prefix: str
    files: dict[str, FileEntry]
    meta: dict[str, Any]
    created: str
    raw: bytes = field(repr=False)
    """The manifest as stored."""

    @property
    def digest(self) -> str:
        """sha256 of the manifest as stored: two publishes of one prefix never share it."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @staticmethod
    def encode(files: Mapping[str, FileEntry], meta: Mapping[str, Any]) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "meta": dict(meta),
            "files": {name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(files.items())},
        }
        return json.dumps(document, indent=1).encode()

    @classmethod
    def decode(cls, prefix: str, data: bytes, where: str) -> Manifest:
        try:
            document = json.loads(data)
            if document.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format is {document.get('format')!r}, expected {MANIFEST_FORMAT!r}")
            files = {name: FileEntry(int(e["size"]), str(e["sha256"])) for name, e in document["files"].items()}
            return cls(prefix, files, dict(document["meta"]), str(document["created"]), bytes(data))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptVersionError(
                f"{where}: unreadable manifest ({error}); delete the set and publish it again") from None


# ----------------------------------------------------------------------------------------------------------------
# Keys and URIs


def check_key(key: str, field: str = "key", allow_empty: bool = False) -> str:
    """A relative `/`-separated key without empty, `.` or `..` segments; raises StoreConfigError naming `field`."""
    if not isinstance(key, str):
        raise StoreConfigError(f"{field}: expected a string, got {type(key).__name__}")
    if key == "" and allow_empty:
        return key
    if not key:
        raise StoreConfigError(f"{field}: empty; name the object, e.g. 'weights/v000001'")
    if key.startswith("/"):
        raise StoreConfigError(f"{field}: {key!r} is absolute; keys are relative to the store, drop the leading '/'")
    if "\\" in key or "\x00" in key:
        raise StoreConfigError(f"{field}: {key!r} contains a backslash or NUL; use '/' between parts")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise StoreConfigError(
            f"{field}: {key!r} has an empty, '.' or '..' segment; keys cannot leave their prefix, write 'a/b'"
        )
    return key


def _join(*parts: str) -> str:
    return "/".join(part for part in parts if part)


def weights_prefix(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise StoreConfigError(f"step: {step!r} is not a non-negative integer")
    return f"{WEIGHTS}/v{step:06d}"


def _parse_step(name: str) -> int | None:
    if len(name) >= 7 and name[0] == "v" and name[1:].isdigit():
        return int(name[1:])
    return None


# ----------------------------------------------------------------------------------------------------------------
# Sources: what a set's file is read from while it is published


class _Source(ABC):
    size: int

    @abstractmethod
    def chunk(self, offset: int, length: int) -> Any: ...

    @abstractmethod
    def sha256(self) -> str: ...


class _BufferSource(_Source):
    def __init__(self, data: bytes | bytearray | memoryview | np.ndarray):
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)

    def chunk(self, offset: int, length: int) -> memoryview:
        return self.view[offset:offset + length]

    def sha256(self) -> str:
        return hashlib.sha256(self.view).hexdigest()


class _FileSource(_Source):
    """A local file, read by ranges on demand so that a checkpoint larger than memory can be published."""

    def __init__(self, path: Path, field: str):
        try:
            self.size = path.stat().st_size
        except OSError as error:
            raise StoreConfigError(f"{field}: cannot read {path} ({error.strerror}); check the path") from None
        self.path = path

    def chunk(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as handle:
            data = os.pread(handle.fileno(), length, offset)
        if len(data) != length:
            raise StoreError(f"{self.path} shrank while being published; do not change files being published")
        return data

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            while block := handle.read(8 * MiB):
                digest.update(block)
        return digest.hexdigest()


def _source(name: str, value: Any) -> _Source:
    if isinstance(value, (str, os.PathLike)):
        return _FileSource(Path(value), f"files[{name!r}]")
    if isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        return _BufferSource(value)
    raise StoreConfigError(f"files[{name!r}]: expected bytes or a Path, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Backends: whole-object primitives, each retried or failed with a clear error


class _SizeMismatch(Exception):
    """An object's size is not the manifest's; `actual` is None where the server only said "out of range"."""

    def __init__(self, key: str, actual: int | None):
        super().__init__(key)
        self.actual = actual


class _Missing(Exception):
    """An object the manifest lists does not exist."""


class _UploadLost(Exception):
    """The server no longer knows a multipart upload (it restarted without it): upload the object again."""


class _Backend(ABC):
    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Writes one small object atomically."""

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def upload(self, key: str, source: _Source, pool: ThreadPoolExecutor) -> Callable[[], None]:
        """Starts writing `source` to `key` on `pool`; the returned function waits for it and makes it visible."""

    @abstractmethod
    def download(self, key: str, size: int, out: memoryview, pool: ThreadPoolExecutor) -> list[_Range]:
        """Starts reading `key` into `out` (exactly `size` bytes), range by range in order; the futures raise
        _Missing or _SizeMismatch when the object is not what the manifest says."""

    @abstractmethod
    def fetch_file(self, key: str, size: int, path: Path, pool: ThreadPoolExecutor) -> list[_Range]:
        """Starts reading `key` into the new local file `path`."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix/` (recursively), relative to the store root."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...


_Range = tuple[Future, int, int]
"""A transfer task and the (offset, length) of the object it moves."""


def _wait(futures: Iterable[Future]) -> None:
    """Waits for all futures and re-raises the first failure only after every one has finished, so that no task
    still writes into a buffer or file the caller is about to drop."""
    first: BaseException | None = None
    for future in list(futures):
        try:
            future.result()
        except BaseException as error:  # noqa: B036 - re-raised below once all tasks have stopped
            first = first or error
    if first is not None:
        raise first


class _FileBackend(_Backend):
    """A local directory. Every object is written to a temporary name in its directory, fsynced and renamed, so a
    crash or a full disk leaves the previous content intact."""

    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url

    def _path(self, key: str) -> Path:
        return self.root / key

    def _fail(self, action: str, key: str, error: OSError) -> StoreError:
        hint = {
            errno.ENOSPC: "the disk is full; free space or point storage.uri elsewhere",
            errno.EDQUOT: "the disk quota is exhausted; free space or point storage.uri elsewhere",
            errno.EROFS: "the file system is read-only; point storage.uri at a writable directory",
            errno.EACCES: "permission denied; make the directory writable by this user",
            errno.EFBIG: "the file exceeds this process's file-size limit (ulimit -f) or the file system's",
        }.get(error.errno, "check the directory")
        return StoreError(f"{self.url}: cannot {action} {key!r}: {error.strerror}; {hint}")

    @staticmethod
    def _create(path: Path) -> int:
        # `delete` removes directories it empties, in other processes too; one may vanish between creating it (or
        # its parent) and opening the file in it, so create it again: each retry means another process won a race.
        # (mkdir's exist_ok re-checks the directory after EEXIST, and raises FileExistsError if it vanished.)
        for _attempt in range(100):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except (FileNotFoundError, FileExistsError):
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def _write(self, key: str, source: _Source) -> None:
        target = self._path(key)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TEMPORARY}")
        try:
            descriptor = self._create(temporary)
            try:
                for offset in range(0, source.size, 64 * MiB):
                    chunk = memoryview(source.chunk(offset, min(64 * MiB, source.size - offset)))
                    while chunk:
                        chunk = chunk[os.write(descriptor, chunk):]
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            os.replace(temporary, target)
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise self._fail("write", key, error) from None

    def put(self, key: str, data: bytes) -> None:
        self._write(key, _BufferSource(data))

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._fail("read", key, error) from None

    def upload(self, key: str, source: _Source, pool: ThreadPoolExecutor) -> Callable[[], None]:
        future = pool.submit(self._write, key, source)
        return future.result

    def _read_into(self, key: str, size: int, out: memoryview) -> None:
        try:
            with open(self._path(key), "rb", buffering=0) as handle:
                actual = os.fstat(handle.fileno()).st_size
                if actual != size:
                    raise _SizeMismatch(key, actual)
                view = out[:size]
                while view:
                    read = handle.readinto(view)
                    if not read:
                        raise _SizeMismatch(key, size - len(view))
                    view = view[read:]
        except FileNotFoundError:
            raise _Missing(key) from None
        except OSError as error:
            raise self._fail("read", key, error) from None

    def download(self, key: str, size: int, out: memoryview, pool: ThreadPoolExecutor) -> list[_Range]:
        return [(pool.submit(self._read_into, key, size, out), 0, size)]

    def _link_or_copy(self, key: str, size: int, path: Path) -> None:
        source = self._path(key)
        try:
            actual = source.stat().st_size
            if actual != size:
                raise _SizeMismatch(key, actual)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Objects are only ever replaced by rename, never rewritten in place, so a hard link is a stable copy.
            try:
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)
        except FileNotFoundError:
            raise _Missing(key) from None
        except OSError as error:
            raise self._fail("copy", key, error) from None

    def fetch_file(self, key: str, size: int, path: Path, pool: ThreadPoolExecutor) -> list[_Range]:
        return [(pool.submit(self._link_or_copy, key, size, path), 0, size)]

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for directory, _, names in os.walk(base):
            for name in names:
                if not name.endswith(_TEMPORARY):
                    keys.append(Path(directory, name).relative_to(self.root).as_posix())
        return keys

    def delete(self, keys: list[str]) -> None:
        directories = set()
        for key in keys:
            try:
                self._path(key).unlink(missing_ok=True)
            except OSError as error:
                raise self._fail("delete", key, error) from None
            directories.add(self._path(key).parent)
        for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
            self._prune(directory)

    def _prune(self, directory: Path) -> None:
        """Removes `directory` and its parents below the root while they are empty. Other processes write and
        delete beside this one, so a directory may fill up or vanish at any moment: rmdir alone decides,
        atomically, and its refusals end the pruning. The leases' directory stays: every reader writes and deletes
        there all the time, and pruning it would only make their writes race its removal."""
        while directory != self.root and directory != self.root / LEASES:
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass  # pruned by another process; its parent may be empty now
            except OSError as error:
                if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    return
                raise self._fail("delete", directory.relative_to(self.root).as_posix(), error) from None
            directory = directory.parent


class _S3Backend(_Backend):
    """An S3 bucket through the minio client. Multipart uploads use the client's part-level calls so that each
    part is a zero-copy slice of the source buffer and is retried on its own."""

    def __init__(self, client: Minio, endpoint: str, bucket: str, root: str, url: str, part_size: int,
                 retry_seconds: float, credential_source: str):
        self.client, self.endpoint, self.bucket, self.root, self.url = client, endpoint, bucket, root, url
        self.part_size, self.retry_seconds = part_size, retry_seconds
        self.credential_source = credential_source

    def _key(self, key: str) -> str:
        return _join(self.root, key)

    def _classify(self, error: BaseException, action: str, key: str) -> StoreError | None:
        """The error to raise now, or None when `error` is transient and worth retrying."""
        where = f"{self.url}: cannot {action} {key!r}"
        if isinstance(error, S3Error):
            if error.code in _AUTH_CODES:
                return StoreAuthError(
                    f"{where}: the object store refused the credentials ({error.code}); check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY of {self.credential_source} and that they may read and write bucket "
                    f"{self.bucket!r}"
                )
            if error.code in _TRANSIENT_CODES:
                return None
            return StoreError(f"{where}: {error.code}: {error.message}")
        if isinstance(error, ServerError):
            return None if error.status_code >= 500 else StoreError(f"{where}: HTTP {error.status_code}")
        if isinstance(error, InvalidResponseError):
            # Non-XML answers come from proxies and load balancers; their 5xx are as transient as the server's.
            return None if getattr(error, "_code", 0) >= 500 else StoreError(f"{where}: {error}")
        reason = getattr(error, "reason", None)
        if isinstance(error, urllib3.exceptions.SSLError) or isinstance(reason, urllib3.exceptions.SSLError):
            return StoreConfigError(
                f"{where}: TLS failed ({reason or error}); for a plain-HTTP endpoint write http://host:port, "
                "for a private CA set SSL_CERT_FILE"
            )
        if isinstance(error, (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError,
                              TimeoutError)):
            return None
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return None
        return StoreError(f"{where}: {type(error).__name__}: {error}")

    def _retry(self, action: str, key: str, call: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        attempt = 0
        while True:
            try:
                return call()
            except (_Missing, _SizeMismatch, _UploadLost, StoreError):
                raise
            except Exception as error:
                fatal = self._classify(error, action, key)
                if fatal is not None:
                    raise fatal from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailableError(
                        f"{self.url}: cannot {action} {key!r}: the object store at {self.endpoint} did not "
                        f"answer for {self.retry_seconds:g} s ({type(error).__name__}: {error}); check "
                        "storage.endpoint / AWS_ENDPOINT_URL and that the server is up"
                    ) from None
                attempt += 1
                pause = min(random.uniform(delay / 2, delay), left)
                logger.warning("store_retry", action=action, key=key, attempt=attempt, pause_s=round(pause, 2),
                               error=f"{type(error).__name__}: {str(error)[:200]}")
                time.sleep(pause)
                delay = min(delay * 2, 2.0)

    def ensure_bucket(self) -> None:
        """Creates the bucket when missing. Probes with a GET (ListObjects), not a HEAD: a HEAD answer has no
        body, so a wrong secret would be reported as a bare AccessDenied instead of SignatureDoesNotMatch."""

        def create() -> None:
            try:
                next(iter(self.client.list_objects(self.bucket, prefix=self.root or None)), None)
                return
            except S3Error as error:
                if error.code != "NoSuchBucket":
                    raise
            try:
                self.client.make_bucket(self.bucket)
                logger.info("bucket_created", store=self.url)
            except S3Error as error:
                if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._retry("open bucket of", "", create)

    def put(self, key: str, data: bytes) -> None:
        self._retry("write", key, lambda: self.client._put_object(
            self.bucket, self._key(key), data, {"Content-Type": "application/octet-stream"}))

    def get(self, key: str) -> bytes | None:
        def call() -> bytes | None:
            try:
                response = self.client.get_object(self.bucket, self._key(key))
            except S3Error as error:
                if error.code in ("NoSuchKey", "NoSuchObject"):
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry("read", key, call)

    def upload(self, key: str, source: _Source, pool: ThreadPoolExecutor) -> Callable[[], None]:
        if source.size <= self.part_size:
            future = pool.submit(
                self._retry, "write", key,
                lambda: self.client._put_object(self.bucket, self._key(key), source.chunk(0, source.size),
                                                {"Content-Type": "application/octet-stream"}))
            return future.result
        part_size = max(self.part_size, -(-source.size // _S3_MAX_PARTS))
        state = {"id": None, "futures": []}

        def start() -> None:
            state["id"] = self._retry("start upload of", key, lambda: self.client._create_multipart_upload(
                self.bucket, self._key(key), {"Content-Type": "application/octet-stream"}))
            state["futures"] = [
                pool.submit(self._upload_part, key, state["id"], number, source, offset,
                            min(part_size, source.size - offset))
                for number, offset in enumerate(range(0, source.size, part_size), start=1)
            ]

        def complete(parts: list[Part]) -> None:
            try:
                self.client._complete_multipart_upload(self.bucket, self._key(key), state["id"], parts)
            except S3Error as error:
                if error.code == "NoSuchUpload":
                    raise _UploadLost(key) from None
                raise

        def finish() -> None:
            for _attempt in range(3):
                try:
                    _wait(state["futures"])
                    parts = [Part(number, future.result()) for number, future in enumerate(state["futures"], 1)]
                    self._retry("finish upload of", key, lambda parts=parts: complete(parts))
                    return
                except _UploadLost:
                    # The server forgot the upload (e.g. it restarted without it): start over with a new one.
                    logger.warning("multipart_upload_lost", key=key, action="uploading the object again")
                    start()
                except BaseException:
                    self._abort(key, state["id"])
                    raise
            raise StoreUnavailableError(f"{self.url}: cannot write {key!r}: the server kept losing the upload")

        start()
        return finish

    def _upload_part(self, key: str, upload_id: str, number: int, source: _Source, offset: int, length: int) -> str:
        def call() -> str:
            try:
                return self.client._upload_part(self.bucket, self._key(key), source.chunk(offset, length), None,
                                                upload_id, number)
            except S3Error as error:
                if error.code == "NoSuchUpload":
                    raise _UploadLost(key) from None
                raise

        return self._retry("write", key, call)

    def _abort(self, key: str, upload_id: str | None) -> None:
        if upload_id is None:
            return
        try:
            self.client._abort_multipart_upload(self.bucket, self._key(key), upload_id)
        except Exception as error:  # the upload is garbage either way; the server expires it
            logger.info("upload_abort_failed", key=key, error=type(error).__name__)

    def _get_range(self, key: str, size: int, offset: int, length: int, write: Callable[[int, bytes], None],
                   ranged: bool) -> None:
        def call() -> None:
            try:
                response = self.client.get_object(self.bucket, self._key(key), offset=offset,
                                                  length=length if ranged else 0)
            except S3Error as error:
                if error.code in ("NoSuchKey", "NoSuchObject"):
                    raise _Missing(key) from None
                if error.code == "InvalidRange":
                    raise _SizeMismatch(key, None) from None
                raise
            try:
                if ranged and response.status != 206:
                    raise StoreError(f"{self.url}: the server ignored a Range request for {key!r}; it is not an "
                                     "S3-compatible endpoint")
                total = _object_size(response.headers)
                if total != size:
                    raise _SizeMismatch(key, total)
                position = offset
                for block in response.stream(_READ_CHUNK):
                    write(position, block)
                    position += len(block)
                if position != offset + length:
                    raise http.client.IncompleteRead(b"", offset + length - position)
            finally:
                response.close()
                response.release_conn()

        self._retry("read", key, call)

    def _ranges(self, size: int) -> list[tuple[int, int]]:
        return [(offset, min(self.part_size, size - offset)) for offset in range(0, size, self.part_size)] or [(0, 0)]

    def download(self, key: str, size: int, out: memoryview, pool: ThreadPoolExecutor) -> list[_Range]:
        def write(position: int, block: bytes) -> None:
            out[position:position + len(block)] = block

        ranges = self._ranges(size)
        return [(pool.submit(self._get_range, key, size, offset, length, write, len(ranges) > 1), offset, length)
                for offset, length in ranges]

    def fetch_file(self, key: str, size: int, path: Path, pool: ThreadPoolExecutor) -> list[_Range]:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(descriptor, size)

        def write(position: int, block: bytes) -> None:
            os.pwrite(descriptor, block, position)

        ranges = self._ranges(size)
        transfers = [(pool.submit(self._get_range, key, size, offset, length, write, len(ranges) > 1), offset,
                      length) for offset, length in ranges]
        remaining = [len(transfers)]
        lock = threading.Lock()

        def close_when_done(_future: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    os.close(descriptor)

        for future, _, _ in transfers:
            future.add_done_callback(close_when_done)
        return transfers

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix)
        strip = len(self.root) + 1 if self.root else 0

        def call() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=f"{base}/" if base else None, recursive=True)
            return [obj.object_name[strip:] for obj in objects if not obj.is_dir]

        return self._retry("list", prefix or "/", call)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [DeleteObject(self._key(key)) for key in keys[start:start + 1000]]

            def call(batch=batch) -> None:
                errors = list(self.client.remove_objects(self.bucket, batch))
                if errors:
                    raise StoreError(f"{self.url}: cannot delete {errors[0].name!r}: {errors[0].code}: "
                                     f"{errors[0].message}")

            self._retry("delete", keys[start], call)


def _object_size(headers) -> int | None:
    content_range = headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = headers.get("Content-Length")
    return int(length) if length is not None else None


# ----------------------------------------------------------------------------------------------------------------
# safetensors, written straight into one buffer per shard and read back as views of the downloaded buffer


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    filled = 0
    for name, tensor in tensors.items():
        size = _tensor_bytes(tensor)
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, tensor))
        filled += size
    return shards


class _SafetensorsSource(_Source):
    """A safetensors file built in one buffer while it is uploaded: `sha256()` copies the tensors in (each once,
    from any device) and hashes each stretch right after writing it, and `chunk()` hands out a range as soon as
    it is filled, so the first parts are on the wire while the last tensors are still being copied.

    Tensors go in order of decreasing element size, so every tensor starts aligned to its element size."""

    def __init__(self, entries: list[tuple[str, torch.Tensor]]):
        self._ordered = sorted(entries, key=lambda item: -item[1].element_size())
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, tensor in self._ordered:
            if tensor.dtype not in _safetensors_dtypes():
                raise StoreConfigError(f"tensors[{name!r}]: dtype {tensor.dtype} cannot be stored in safetensors; "
                                       f"cast it to one of {sorted(str(d) for d in _safetensors_dtypes())}")
            size = _tensor_bytes(tensor)
            header[name] = {"dtype": _safetensors_dtypes()[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._start = 8 + len(encoded)
        self.buffer = np.empty(self._start + offset, dtype=np.uint8)
        self.buffer[:8] = np.frombuffer(len(encoded).to_bytes(8, "little"), dtype=np.uint8)
        self.buffer[8:self._start] = np.frombuffer(encoded, dtype=np.uint8)
        self.size = len(self.buffer)
        self._filled = 0
        self._failure: BaseException | None = None
        self._ready = threading.Condition()

    def chunk(self, offset: int, length: int) -> memoryview:
        with self._ready:
            self._ready.wait_for(lambda: self._filled >= offset + length or self._failure is not None)
            if self._failure is not None:
                raise StoreError(f"serialising the weights failed: {self._failure}")
        return memoryview(self.buffer)[offset:offset + length]

    def _advance(self, filled: int) -> None:
        with self._ready:
            self._filled = filled
            self._ready.notify_all()

    def sha256(self) -> str:
        import torch

        hasher = hashlib.sha256(self.buffer[:self._start])
        self._advance(self._start)
        target = torch.from_numpy(self.buffer)
        position = self._start
        try:
            for _, tensor in self._ordered:
                end = position + _tensor_bytes(tensor)
                if end > position:
                    target[position:end].copy_(tensor.detach().reshape(-1).view(torch.uint8))
                    self._advance(end)
                    hasher.update(self.buffer[position:end])
                position = end
        except BaseException as error:
            with self._ready:
                self._failure = error
                self._ready.notify_all()
            raise
        return hasher.hexdigest()


def serialize_safetensors(entries: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """One safetensors file in one buffer, as `publish_weights` writes it."""
    source = _SafetensorsSource(entries)
    source.sha256()
    return source.buffer


def parse_safetensors(buffer: np.ndarray, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer`, as views of it (no copy where aligned)."""
    import torch

    try:
        length = int.from_bytes(buffer[:8].tobytes(), "little")
        header = json.loads(buffer[8:8 + length].tobytes())
        start = 8 + length
        base = torch.from_numpy(buffer)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _torch_dtypes()[info["dtype"]]
            begin, end = (start + int(position) for position in info["data_offsets"])
            if not start <= begin <= end <= len(buffer):
                raise ValueError(f"tensor {name!r} lies outside the file")
            raw = base[begin:end]
            if begin % dtype.itemsize:
                raw = raw.clone()
            tensors[name] = raw.view(dtype).reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CorruptVersionError(f"{where}: not a readable safetensors file ({error})") from None


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The store


class Store:
    """Sets, weight versions, leases and small JSON documents over one backend (see `open_store`)."""

    lease_seconds = DEFAULT_LEASE_SECONDS
    """How long a reader's lease protects its version from gc when the reader dies without releasing it."""

    def __init__(self, backend: _Backend, workers: int):
        self.url = backend.url
        self._backend = backend
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ttrv-store")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- small JSON documents (progress, run state) ------------------------------------------------------------

    def put_json(self, key: str, document: Any) -> None:
        """Replaces `key` atomically (rename on file://, one PUT on S3)."""
        check_key(key)
        try:
            data = json.dumps(document, indent=1).encode()
        except (TypeError, ValueError) as error:
            raise StoreConfigError(f"document for {key!r} is not JSON-serialisable: {error}") from None
        self._backend.put(key, data)

    def get_json(self, key: str) -> Any | None:
        """The document at `key`, or None when there is none."""
        data = self._backend.get(check_key(key))
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as error:
            raise StoreError(f"{self.url}: {key!r} is not valid JSON ({error}); delete or rewrite it") from None

    # -- sets ----------------------------------------------------------------------------------------------------

    def read_manifest(self, prefix: str) -> Manifest | None:
        """The manifest of the complete set at `prefix`, or None when there is none (yet)."""
        check_key(prefix, "prefix")
        data = self._backend.get(_join(prefix, MANIFEST))
        return None if data is None else Manifest.decode(prefix, data, f"{self.url}/{prefix}")

    def _require_manifest(self, prefix: str) -> Manifest:
        manifest = self.read_manifest(prefix)
        if manifest is None:
            parent = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
            known = self.list_sets(parent)[-5:]
            raise SetNotFoundError(f"{self.url}: no complete set at {prefix!r} (no manifest); "
                                   f"latest sets under {parent or '/'!r}: {known}")
        return manifest

    def list_sets(self, prefix: str = "") -> list[str]:
        """Names of the complete sets directly under `prefix`, sorted."""
        check_key(prefix, "prefix", allow_empty=True)
        depth = prefix.count("/") + 1 if prefix else 0
        names = set()
        for key in self._backend.list(prefix):
            parts = key.split("/")
            if len(parts) == depth + 2 and parts[-1] == MANIFEST:
                names.add(parts[depth])
        return sorted(names)

    def publish_set(self, prefix: str, files: Mapping[str, bytes | bytearray | memoryview | Path],
                    meta: Mapping[str, Any] | None = None) -> Manifest:
        """Writes `files` under `prefix` in parallel, then the manifest; until then readers see no set there.
        Publishing over an existing set first deletes it (manifest first)."""
        check_key(prefix, "prefix")
        if not files:
            raise StoreConfigError(f"files: a set at {prefix!r} needs at least one file")
        for name in files:
            check_key(name, f"files[{name!r}]")
            if name == MANIFEST:
                raise StoreConfigError(f"files[{name!r}]: the name {MANIFEST} is reserved for the set's manifest")
        sources = [(name, _source(name, value)) for name, value in files.items()]
        return self._publish(prefix, iter(sources), dict(meta or {}))

    def _publish(self, prefix: str, items: Iterator[tuple[str, _Source]], meta: dict[str, Any]) -> Manifest:
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as error:
            raise StoreConfigError(f"meta of {prefix!r} is not JSON-serialisable: {error}") from None
        started = time.monotonic()
        self._delete(prefix)
        finishes: list[Callable[[], None]] = []
        entries: dict[str, FileEntry] = {}
        failure: BaseException | None = None
        try:
            # Each upload starts before its source is hashed: a weight shard is copied in and hashed by `sha256()`
            # while its first parts are already on the wire, and the next shard is only built after that.
            for name, source in items:
                finishes.append(self._backend.upload(_join(prefix, name), source, self._pool))
                entries[name] = FileEntry(source.size, source.sha256())
        except BaseException as error:  # noqa: B036 - re-raised once the started uploads have stopped
            failure = error
        for finish in finishes:
            try:
                finish()
            except BaseException as error:  # noqa: B036 - the first failure is re-raised below
                failure = failure or error
        if failure is not None:
            raise failure
        data = Manifest.encode(entries, meta)
        self._backend.put(_join(prefix, MANIFEST), data)
        manifest = Manifest.decode(prefix, data, f"{self.url}/{prefix}")
        seconds = time.monotonic() - started
        logger.debug("set_published", store=self.url, prefix=prefix, files=len(entries),
                    mb=round(manifest.total_bytes / 1e6, 1), seconds=round(seconds, 3),
                    mb_per_s=round(manifest.total_bytes / 1e6 / max(seconds, 1e-9), 1))
        return manifest

    def _broken(self, manifest: Manifest, problem: str) -> StoreError:
        """A set that fails verification is corrupt, unless it was deleted or replaced while being read."""
        current = self.read_manifest(manifest.prefix)
        if current is None or current.digest != manifest.digest:
            return SetNotFoundError(f"{self.url}: {manifest.prefix!r} was deleted or replaced while being read; "
                                    "read the latest version again")
        return CorruptVersionError(f"{self.url}: {manifest.prefix}/{problem}; this version cannot be loaded, "
                                   "publish it again or load another one")

    def _verify(self, manifest: Manifest, transfers: dict[str, list[_Range]],
                digest: Callable[[str, list[_Range]], str]) -> None:
        """Checks each file's transfer and sha256 (`digest` waits for the ranges it hashes, so hashing overlaps
        with the ranges still arriving); raises only after every transfer has stopped."""
        problem: str | None = None
        failure: BaseException | None = None
        for name, ranges in transfers.items():
            entry = manifest.files[name]
            try:
                actual = digest(name, ranges)
            except _Missing:
                problem = problem or f"{name} is missing"
            except _SizeMismatch as error:
                actual_size = "a different number of" if error.actual is None else f"{error.actual}"
                problem = problem or f"{name} has {actual_size} bytes instead of {entry.size} (truncated or overwritten)"
            except BaseException as error:  # noqa: B036 - re-raised after the other transfers stopped
                failure = failure or error
            else:
                if problem is None and actual != entry.sha256:
                    problem = f"{name} does not match its sha256 in the manifest (corrupt)"
            finally:
                futures_wait([future for future, _, _ in ranges])
        if failure is not None:
            raise failure
        if problem is not None:
            raise self._broken(manifest, problem)

    def _read(self, manifest: Manifest) -> dict[str, np.ndarray]:
        buffers = {name: np.empty(entry.size, dtype=np.uint8) for name, entry in manifest.files.items()}
        transfers = {
            name: self._backend.download(_join(manifest.prefix, name), entry.size, memoryview(buffers[name]),
                                         self._pool)
            for name, entry in manifest.files.items()
        }

        def digest(name: str, ranges: list[_Range]) -> str:
            hasher = hashlib.sha256()
            for future, offset, length in ranges:
                future.result()
                hasher.update(buffers[name][offset:offset + length])
            return hasher.hexdigest()

        self._verify(manifest, transfers, digest)
        return buffers

    def read_set(self, prefix: str) -> tuple[Manifest, dict[str, memoryview]]:
        """Downloads a complete set into memory, verifying every file's size and sha256."""
        started = time.monotonic()
        manifest = self._require_manifest(prefix)
        buffers = self._read(manifest)
        self._log_read(manifest, started, "memory")
        return manifest, {name: memoryview(buffer) for name, buffer in buffers.items()}

    def fetch_set(self, prefix: str, dest_dir: str | Path) -> Manifest:
        """Downloads a complete set into the new directory `dest_dir`, verified, appearing all at once (the files
        land in a temporary sibling that is renamed). Fetching again into a directory that holds the same set is
        a no-op; a directory that holds anything else is refused."""
        started = time.monotonic()
        manifest = self._require_manifest(prefix)
        self._fetch(manifest, Path(dest_dir))
        self._log_read(manifest, started, str(dest_dir))
        return manifest

    def _fetch(self, manifest: Manifest, dest: Path) -> None:
        if dest.exists():
            local = dest / MANIFEST
            if local.is_file() and hashlib.sha256(local.read_bytes()).hexdigest() == manifest.digest:
                return
            raise StoreConfigError(f"dest_dir: {dest} exists and does not hold {manifest.prefix!r} as published "
                                   "now; fetch into a new directory")
        temporary = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}{_TEMPORARY}")
        transfers: dict[str, list[_Range]] = {}

        def digest(name: str, ranges: list[_Range]) -> str:
            _wait(future for future, _, _ in ranges)
            return _sha256_file(temporary / name)

        try:
            temporary.mkdir(parents=True)
            for name, entry in manifest.files.items():
                (temporary / name).parent.mkdir(parents=True, exist_ok=True)
                transfers[name] = self._backend.fetch_file(_join(manifest.prefix, name), entry.size,
                                                           temporary / name, self._pool)
            self._verify(manifest, transfers, digest)
            (temporary / MANIFEST).write_bytes(manifest.raw)
            try:
                temporary.rename(dest)
            except OSError:  # another reader fetched the same version first
                if not (dest / MANIFEST).is_file() or (dest / MANIFEST).read_bytes() != manifest.raw:
                    raise
        finally:
            futures_wait([future for ranges in transfers.values() for future, _, _ in ranges])
            shutil.rmtree(temporary, ignore_errors=True)

    def _log_read(self, manifest: Manifest, started: float, into: str) -> None:
        seconds = time.monotonic() - started
        logger.debug("set_read", store=self.url, prefix=manifest.prefix, into=into, files=len(manifest.files),
                    mb=round(manifest.total_bytes / 1e6, 1), seconds=round(seconds, 3),
                    mb_per_s=round(manifest.total_bytes / 1e6 / max(seconds, 1e-9), 1))

    def delete_set(self, prefix: str) -> None:
        """Deletes a set, manifest first, so that a half-deleted set is invisible."""
        self._delete(check_key(prefix, "prefix"))

    def _delete(self, prefix: str, listing: list[str] | None = None) -> None:
        keys = [key for key in (self._backend.list(prefix) if listing is None else listing)
                if key.startswith(prefix + "/")]
        manifest = _join(prefix, MANIFEST)
        if manifest in keys:
            self._backend.delete([manifest])
            keys.remove(manifest)
        if keys:
            self._backend.delete(keys)

    # -- weight versions -----------------------------------------------------------------------------------------

    def publish_weights(self, step: int, tensors: Mapping[str, torch.Tensor], *, kind: Literal["full", "lora"],
                        base_model: str, dtype: str,
                        extra_files: Mapping[str, bytes | bytearray | memoryview | Path] | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_SIZE) -> Manifest:
        """Publishes weight version `step` under weights/v{step:06d}/.

        full: safetensors shards of at most `max_shard_bytes` (model.safetensors, or model-0000i-of-0000n with
        Hugging Face's model.safetensors.index.json). lora: one adapter_model.safetensors next to
        `extra_files["adapter_config.json"]` (peft's layout, which vLLM's /v1/load_lora_adapter reads).
        Each shard is built once in memory and uploaded while it is being built."""
        import torch

        prefix = weights_prefix(step)
        if kind not in ("full", "lora"):
            raise StoreConfigError(f"kind: {kind!r} is neither 'full' nor 'lora'")
        if dtype not in WEIGHT_DTYPES:
            raise StoreConfigError(f"dtype: {dtype!r} is not one of {list(WEIGHT_DTYPES)}")
        if not isinstance(base_model, str) or not base_model:
            raise StoreConfigError("base_model: empty; name the model the weights belong to")
        if not tensors:
            raise StoreConfigError(f"tensors: version {step} has no tensors")
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise StoreConfigError(f"tensors: {name!r} is not a usable tensor name")
            if not isinstance(tensor, torch.Tensor):
                raise StoreConfigError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        if max_shard_bytes < 1:
            raise StoreConfigError(f"max_shard_bytes: {max_shard_bytes} must be positive")
        extra = dict(extra_files or {})
        if kind == "lora":
            if "adapter_config.json" not in extra:
                raise StoreConfigError("extra_files: a LoRA version needs 'adapter_config.json' (peft's "
                                       "LoraConfig.to_dict()); without it vLLM cannot load the adapter")
            groups, names = [list(tensors.items())], ["adapter_model.safetensors"]
        else:
            groups = _plan_shards(tensors, max_shard_bytes)
            names = (["model.safetensors"] if len(groups) == 1 else
                     [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
        index = None
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(_tensor_bytes(t) for t in tensors.values())},
                     "weight_map": {tensor: shard for shard, group in zip(names, groups, strict=True) for tensor, _ in group}}
            names_taken = [*names, "model.safetensors.index.json"]
        else:
            names_taken = names
        for name in extra:
            check_key(name, f"extra_files[{name!r}]")
            if name in names_taken or name == MANIFEST:
                raise StoreConfigError(f"extra_files[{name!r}]: the name is taken by the weights themselves")
        extra_sources = [(name, _source(name, value)) for name, value in extra.items()]

        def items() -> Iterator[tuple[str, _Source]]:
            for name, group in zip(names, groups, strict=True):
                yield name, _SafetensorsSource(group)
            if index is not None:
                yield "model.safetensors.index.json", _BufferSource(json.dumps(index, indent=1).encode())
            yield from extra_sources

        meta = {"step": step, "kind": kind, "base_model": base_model, "dtype": dtype, "shards": names,
                "tensors": len(tensors)}
        return self._publish(prefix, items(), meta)

    def weight_versions(self) -> list[int]:
        """Steps of the complete weight versions, ascending."""
        return sorted(step for name in self.list_sets(WEIGHTS) if (step := _parse_step(name)) is not None)

    def latest_weights(self) -> int | None:
        versions = self.weight_versions()
        return versions[-1] if versions else None

    @contextmanager
    def lease(self, step: int, seconds: float | None = None) -> Iterator[None]:
        """Marks version `step` as being read, so that `gc_weights` keeps it, until the block ends or `seconds`
        pass (the lease carries its expiry time by the reader's clock, so a crashed reader blocks nothing for long;
        pod clocks must agree to well within `seconds`)."""
        reader = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        key = f"{LEASES}/{reader}.json"
        self.put_json(key, {"reader": reader, "step": step,
                            "expires": time.time() + (seconds or self.lease_seconds)})
        try:
            yield
        finally:
            try:
                self._backend.delete([key])
            except StoreError as error:
                logger.warning("lease_not_released", key=key, action="it expires by itself", error=str(error))

    def _leased_steps(self) -> set[int]:
        steps, expired = set(), []
        now = time.time()
        for key in self._backend.list(LEASES):
            data = self._backend.get(key)
            try:
                lease = json.loads(data) if data is not None else None
                if lease is None:
                    continue
                if float(lease["expires"]) < now:
                    expired.append(key)
                else:
                    steps.add(int(lease["step"]))
            except (ValueError, KeyError, TypeError):
                logger.warning("lease_unreadable_ignored", key=key)
        if expired:
            self._backend.delete(expired)
        return steps

    def fetch_weights(self, step: int, dest_dir: str | Path) -> Path:
        """Downloads and verifies version `step` into `dest_dir/v{step:06d}-{digest}` and returns that path. The
        path names the exact bytes (vLLM caches adapters by path), so a republished step gets a new one; a path
        fetched before is returned at once. The local copy is a cache: it is not fsynced."""
        prefix = weights_prefix(step)
        started = time.monotonic()
        with self.lease(step):
            manifest = self._require_manifest(prefix)
            path = Path(dest_dir) / f"v{step:06d}-{manifest.digest[:12]}"
            self._fetch(manifest, path)
        self._log_read(manifest, started, str(path))
        return path

    def load_weights(self, step: int) -> dict[str, torch.Tensor]:
        """Version `step`'s tensors on CPU, downloaded and verified in memory (views of the downloaded shards)."""
        prefix = weights_prefix(step)
        started = time.monotonic()
        with self.lease(step):
            manifest = self._require_manifest(prefix)
            buffers = self._read(manifest)
        tensors: dict[str, torch.Tensor] = {}
        for name in manifest.meta.get("shards", []):
            tensors.update(parse_safetensors(buffers[name], f"{self.url}/{prefix}/{name}"))
        self._log_read(manifest, started, "memory")
        return tensors

    def gc_weights(self, keep: int, in_use: Iterable[int] = ()) -> list[int]:
        """Deletes weight versions except the newest `keep`, those in `in_use` and those leased by a reader;
        also removes leftovers of crashed publishes older than every kept version. Returns the deleted steps."""
        if not isinstance(keep, int) or keep < 1:
            raise StoreConfigError(f"keep: {keep!r} must be an integer >= 1 (the newest version is always kept)")
        listing = self._backend.list(WEIGHTS)
        complete, present = set(), set()
        for key in listing:
            parts = key.split("/")
            step = _parse_step(parts[1]) if len(parts) >= 3 else None
            if step is not None:
                present.add(step)
                if len(parts) == 3 and parts[2] == MANIFEST:
                    complete.add(step)
        newest = sorted(complete)[-keep:]
        kept = set(newest) | set(in_use) | self._leased_steps()
        victims = sorted(step for step in complete if step not in kept)
        if newest:
            victims += sorted(step for step in present - complete if step < newest[0] and step not in kept)
        for step in victims:
            self._delete(weights_prefix(step), listing)
        if victims:
            logger.debug("weight_versions_deleted", store=self.url, steps=victims, kept=sorted(kept & complete))
        return victims


# ----------------------------------------------------------------------------------------------------------------
# Opening a store


def _read_secret_dir(directory: str) -> tuple[str, str, str | None]:
    values = {}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        path = Path(directory, name)
        try:
            values[name] = path.read_text().strip()
        except FileNotFoundError:
            values[name] = None
        except OSError as error:
            raise StoreConfigError(f"TTRV_S3_SECRET_DIR: cannot read {path} ({error.strerror})") from None
    if not values["AWS_ACCESS_KEY_ID"] or not values["AWS_SECRET_ACCESS_KEY"]:
        raise StoreConfigError(f"TTRV_S3_SECRET_DIR={directory}: needs non-empty files AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY; mount the Secret with those keys (items: key -> path)")
    return values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], values["AWS_SESSION_TOKEN"] or None


def _credentials(uri: str) -> tuple[str, str, str | None, str]:
    """(access key, secret key, session token, where they came from) from a Secret directory or the environment."""
    directory = os.environ.get("TTRV_S3_SECRET_DIR")
    if directory:
        return (*_read_secret_dir(directory), f"the Secret mounted at {directory}")
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise StoreConfigError(
            f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a cluster they come "
            "from the Secret named by s3Secret), or TTRV_S3_SECRET_DIR to a directory holding them as files"
        )
    source = "the environment (in a cluster: the Secret named by the experiment's s3Secret)"
    return access, secret, os.environ.get("AWS_SESSION_TOKEN") or None, source


def _parse_endpoint(endpoint: str) -> tuple[str, bool]:
    """(host[:port], use TLS): a URL's scheme decides; a bare host:port gets TLS."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        scheme, rest = "https", endpoint
    host = rest.rstrip("/")
    if scheme not in ("http", "https") or not host or "/" in host:
        raise StoreConfigError(f"storage.endpoint: {endpoint!r} is not http(s)://host[:port] or host:port")
    return host, scheme == "https"


def open_store(uri: str, endpoint: str | None = None, *, retry_seconds: float = DEFAULT_RETRY_SECONDS,
               workers: int | None = None, part_size: int = DEFAULT_PART_SIZE) -> Store:
    """A store at `file:///abs/dir`, `file://rel/dir` (relative to the working directory) or
    `s3://bucket/prefix`. For S3 the endpoint is `endpoint` or AWS_ENDPOINT_URL (AWS when neither is set; an
    http:// URL means no TLS), credentials come from TTRV_S3_SECRET_DIR or AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, and the bucket is created when missing."""
    if not isinstance(uri, str):
        raise StoreConfigError(f"storage.uri: expected a string, got {type(uri).__name__}")
    workers = workers or min(16, 2 * (os.cpu_count() or 2))
    if part_size < _S3_MIN_PART:
        raise StoreConfigError(f"part_size: {part_size} is below S3's minimum part of {_S3_MIN_PART} bytes")
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "file":
        if not rest or any(part == ".." for part in rest.split("/")):
            raise StoreConfigError(f"storage.uri: {uri!r} needs a directory without '..' steps, e.g. "
                                   "file:///data/store or file://runs/store")
        root = Path(rest) if rest.startswith("/") else Path.cwd() / rest
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreConfigError(f"storage.uri: cannot create {root} ({error.strerror}); "
                                   "choose a writable directory") from None
        return Store(_FileBackend(root, f"file://{root}"), workers)
    if sep and scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or "@" in (endpoint or "").split("://", 1)[-1]:
            # Not repeated in the message: it would carry the credential into logs.
            raise StoreConfigError("storage.uri / storage.endpoint: holds credentials (user:password@); remove them "
                                   "and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if not bucket:
            raise StoreConfigError(f"storage.uri: {uri!r} names no bucket; write s3://bucket/prefix")
        prefix = prefix.strip("/")
        check_key(prefix, "storage.uri prefix", allow_empty=True)
        host, secure = _parse_endpoint(endpoint or os.environ.get("AWS_ENDPOINT_URL") or "https://s3.amazonaws.com")
        access, secret, token, source = _credentials(uri)
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or (None if host.endswith("amazonaws.com") else "us-east-1"))
        # No retries inside urllib3: `_S3Backend._retry` owns the policy and its time budget. TLS trusts the
        # system store, which OpenSSL extends with SSL_CERT_FILE / SSL_CERT_DIR (for a private CA).
        http = urllib3.PoolManager(num_pools=4, maxsize=workers + 4, retries=False, cert_reqs="CERT_REQUIRED",
                                   timeout=urllib3.Timeout(connect=5.0, read=60.0))
        client = Minio(host, access_key=access, secret_key=secret, session_token=token, secure=secure,
                       region=region, http_client=http)
        try:
            check_bucket_name(bucket, strict=True, s3_check=host.endswith("amazonaws.com"))
        except ValueError as error:
            raise StoreConfigError(f"storage.uri: {uri!r}: {error}; bucket names are 3-63 lowercase letters, "
                                   "digits, '-' and '.'") from None
        url = f"s3://{_join(bucket, prefix)}"
        backend = _S3Backend(client, f"{'https' if secure else 'http'}://{host}", bucket, prefix, url, part_size,
                             retry_seconds, source)
        backend.ensure_bucket()
        return Store(backend, workers)
    raise StoreConfigError(f"storage.uri: {uri!r} has no known scheme; use file:///abs/path, file://rel/path or "
                           "s3://bucket/prefix")
