"""Sets: a prefix holding some files and a `manifest.json` that lists each file's size and checksum (xxh3-128 for
sets published now, sha256 for older ones: the manifest names its algorithm, see `ttrv.store.checksums`).

The manifest is written last and deleted first, so a set without one does not exist for readers, and a reader
verifies every byte against it before returning: a half-published, half-deleted, corrupt or truncated set is never
loaded. `SetStore` publishes, reads, fetches and deletes sets over one backend, with transfers in parallel on a
bounded thread pool; `ttrv.store.weights.Store` adds weight versions and leases on top."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ttrv import log
from ttrv.fsutil import strict_json
from ttrv.store.backend import Backend, Missing, Range, SizeMismatch, Source, as_source, wait_all
from ttrv.store.checksums import DEFAULT_CHECKSUM, check_checksum_name, check_digest, new_hasher
from ttrv.store.errors import CorruptVersionError, SetNotFoundError, StoreConfigError, StoreError
from ttrv.store.keys import MANIFEST, TEMPORARY, check_key, join_key, local_path

logger = log.get_logger(__name__)

MANIFEST_FORMAT = "ttrv.set/v2"
"""v2 names its checksum (`"checksum": "xxh3_128"`) and lists `{"size", "digest"}` per file."""
MANIFEST_FORMAT_V1 = "ttrv.set/v1"
"""Sets published before v2: `{"size", "sha256"}` per file. Still read and verified (with sha256)."""
_Self = TypeVar("_Self", bound="SetStore")


@dataclass(frozen=True)
class FileEntry:
    size: int
    digest: str
    """The file's checksum, in hex, by the manifest's `checksum` algorithm."""


@dataclass(frozen=True)
class Manifest:
    """What a complete set holds: each file's size and checksum, free-form `meta`, and when it was published."""

    prefix: str
    files: dict[str, FileEntry]
    meta: dict[str, Any]
    created: str
    raw: bytes = field(repr=False)
    """The manifest as stored."""
    checksum: str = "sha256"
    """The algorithm of every `FileEntry.digest` (`ttrv.store.checksums`)."""

    @property
    def digest(self) -> str:
        """sha256 of the manifest as stored: two publishes of one prefix never share it."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    @staticmethod
    def encode(files: Mapping[str, FileEntry], meta: Mapping[str, Any], checksum: str = DEFAULT_CHECKSUM) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "checksum": checksum,
            "meta": dict(meta),
            "files": {name: {"size": e.size, "digest": e.digest} for name, e in sorted(files.items())},
        }
        return strict_json(document, where=MANIFEST, indent=1).encode()

    @classmethod
    def decode(cls, prefix: str, data: bytes, where: str) -> Manifest:
        try:
            document = json.loads(data)
            if document.get("format") == MANIFEST_FORMAT:
                checksum, digest_key = check_checksum_name(document.get("checksum")), "digest"
            elif document.get("format") == MANIFEST_FORMAT_V1:
                checksum, digest_key = "sha256", "sha256"
            else:
                raise ValueError(f"format is {document.get('format')!r}, expected {MANIFEST_FORMAT!r} "
                                 f"(or the older {MANIFEST_FORMAT_V1!r})")
            if not isinstance(document["files"], dict):
                raise TypeError("'files' is not an object")
            if len(document["files"]) > MAX_FILES:
                raise ValueError(f"{len(document['files'])} files, more than {MAX_FILES}")
            files = {check_file_name(name): FileEntry(check_size(e["size"]), check_digest(checksum, e[digest_key]))
                     for name, e in document["files"].items()}
            folders = {"/".join(name.split("/")[:depth]) for name in files for depth in range(1, name.count("/") + 1)}
            if clash := sorted(folders & files.keys()):
                raise ValueError(f"{clash[0]!r} is listed as a file and as a folder of another file")
            return cls(prefix, files, dict(document["meta"]), str(document["created"]), bytes(data), checksum)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            # The manifest is what anyone with write access to the store prefix wrote: its names are checked here
            # (and again by `local_path` where they meet a folder), so a hostile one is refused before any transfer.
            raise CorruptVersionError(
                f"{where}: unreadable manifest ({error}); delete the set and publish it again") from None


MAX_FILES = 100_000
"""Files one set may list: far above any model's shards (a 1 TB model in 512 MiB shards has ~2000), small enough
that a hostile manifest cannot make a reader allocate without bound."""


def check_file_name(name: Any) -> str:
    """A file name of a manifest: a key relative to its set (`check_key`'s rules), and not the manifest itself."""
    try:
        check_key(name, "name")
    except StoreConfigError as error:
        raise ValueError(f"file {str(name)[:80]!r} is not a relative name inside the set: {error}") from None
    if name == MANIFEST:
        raise ValueError(f"file {name!r} is the manifest's own name")
    return name


def check_size(size: Any) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size {size!r} is not a non-negative integer")
    return size


def _digest_file(path: Path, algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return hasher.hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            hasher.update(mapped)
            return hasher.hexdigest()


class SetStore:
    """Sets and small JSON documents over one backend."""

    def __init__(self, backend: Backend, workers: int):
        self.url = backend.url
        self._backend = backend
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ttrv-store")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self: _Self) -> _Self:
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
            data = strict_json(document, where=f"{self.url}/{key}", indent=1).encode()
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
        data = self._backend.get(join_key(prefix, MANIFEST))
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
        sources = [(name, as_source(name, value)) for name, value in files.items()]
        return self._publish(prefix, iter(sources), dict(meta or {}))

    def _publish(self, prefix: str, items: Iterator[tuple[str, Source]], meta: dict[str, Any]) -> Manifest:
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
            # Each upload starts before its source is hashed: a weight shard is copied in and hashed by `digest()`
            # while its first parts are already on the wire, and the next shard is only built after that.
            for name, source in items:
                finishes.append(self._backend.upload(join_key(prefix, name), source, self._pool))
                entries[name] = FileEntry(source.size, source.digest(DEFAULT_CHECKSUM))
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
        self._backend.put(join_key(prefix, MANIFEST), data)
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

    def _verify(self, manifest: Manifest, transfers: dict[str, list[Range]],
                digest: Callable[[str, list[Range]], str]) -> None:
        """Checks each file's transfer and checksum (`digest` waits for the ranges it hashes, so hashing overlaps
        with the ranges still arriving); raises only after every transfer has stopped."""
        problem: str | None = None
        failure: BaseException | None = None
        for name, ranges in transfers.items():
            entry = manifest.files[name]
            try:
                actual = digest(name, ranges)
            except Missing:
                problem = problem or f"{name} is missing"
            except SizeMismatch as error:
                actual_size = "a different number of" if error.actual is None else f"{error.actual}"
                problem = problem or f"{name} has {actual_size} bytes instead of {entry.size} (truncated or overwritten)"
            except BaseException as error:  # noqa: B036 - re-raised after the other transfers stopped
                failure = failure or error
            else:
                if problem is None and actual != entry.digest:
                    problem = f"{name} does not match its checksum ({manifest.checksum}) in the manifest (corrupt)"
            finally:
                futures_wait([future for future, _, _ in ranges])
        if failure is not None:
            raise failure
        if problem is not None:
            raise self._broken(manifest, problem)

    def _read(self, manifest: Manifest) -> dict[str, np.ndarray]:
        buffers = {name: np.empty(entry.size, dtype=np.uint8) for name, entry in manifest.files.items()}
        transfers = {
            name: self._backend.download(join_key(manifest.prefix, name), entry.size, memoryview(buffers[name]),
                                         self._pool)
            for name, entry in manifest.files.items()
        }

        def digest(name: str, ranges: list[Range]) -> str:
            hasher = new_hasher(manifest.checksum)
            for future, offset, length in ranges:
                future.result()
                hasher.update(buffers[name][offset:offset + length])
            return hasher.hexdigest()

        self._verify(manifest, transfers, digest)
        return buffers

    def read_set(self, prefix: str) -> tuple[Manifest, dict[str, memoryview]]:
        """Downloads a complete set into memory, verifying every file's size and checksum."""
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
        temporary = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}{TEMPORARY}")
        transfers: dict[str, list[Range]] = {}

        def digest(name: str, ranges: list[Range]) -> str:
            wait_all(future for future, _, _ in ranges)
            return _digest_file(local_path(temporary, name), manifest.checksum)

        try:
            temporary.mkdir(parents=True)
            for name, entry in manifest.files.items():
                path = local_path(temporary, name, f"{manifest.prefix}/{MANIFEST}: files[{name!r}]")
                path.parent.mkdir(parents=True, exist_ok=True)
                transfers[name] = self._backend.fetch_file(join_key(manifest.prefix, name), entry.size, path,
                                                           self._pool)
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
        manifest = join_key(prefix, MANIFEST)
        if manifest in keys:
            self._backend.delete([manifest])
            keys.remove(manifest)
        if keys:
            self._backend.delete(keys)
