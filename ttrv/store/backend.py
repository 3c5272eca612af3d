"""What a backend is: whole-object primitives over one store root (`Backend`), the sources an upload reads from
(`Source`), and the two signals a transfer raises when an object is not what its manifest says."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ttrv.store.checksums import new_hasher
from ttrv.store.errors import StoreConfigError, StoreError

MiB = 1 << 20


# Sources: what a set's file is read from while it is published


class Source(ABC):
    size: int

    @abstractmethod
    def chunk(self, offset: int, length: int) -> Any: ...

    @abstractmethod
    def digest(self, algorithm: str) -> str:
        """The checksum (`ttrv.store.checksums`) of the whole source; a streaming source fills itself here."""


class BufferSource(Source):
    def __init__(self, data: bytes | bytearray | memoryview | np.ndarray):
        self.view = memoryview(data).cast("B")
        self.size = len(self.view)

    def chunk(self, offset: int, length: int) -> memoryview:
        return self.view[offset:offset + length]

    def digest(self, algorithm: str) -> str:
        hasher = new_hasher(algorithm)
        hasher.update(self.view)
        return hasher.hexdigest()


class FileSource(Source):
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

    def digest(self, algorithm: str) -> str:
        hasher = new_hasher(algorithm)
        with open(self.path, "rb") as handle:
            while block := handle.read(8 * MiB):
                hasher.update(block)
        return hasher.hexdigest()


def as_source(name: str, value: Any) -> Source:
    if isinstance(value, (str, os.PathLike)):
        return FileSource(Path(value), f"files[{name!r}]")
    if isinstance(value, (bytes, bytearray, memoryview, np.ndarray)):
        return BufferSource(value)
    raise StoreConfigError(f"files[{name!r}]: expected bytes or a Path, got {type(value).__name__}")


# Backends: whole-object primitives, each retried or failed with a clear error


class SizeMismatch(Exception):
    """An object's size is not the manifest's; `actual` is None where the server only said "out of range"."""

    def __init__(self, key: str, actual: int | None):
        super().__init__(key)
        self.actual = actual


class Missing(Exception):
    """An object the manifest lists does not exist."""


class Backend(ABC):
    url: str

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Writes one small object atomically."""

    @abstractmethod
    def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    def upload(self, key: str, source: Source, pool: ThreadPoolExecutor) -> Callable[[], None]:
        """Starts writing `source` to `key` on `pool`; the returned function waits for it and makes it visible."""

    @abstractmethod
    def download(self, key: str, size: int, out: memoryview, pool: ThreadPoolExecutor) -> list[Range]:
        """Starts reading `key` into `out` (exactly `size` bytes), range by range in order; the futures raise
        Missing or SizeMismatch when the object is not what the manifest says."""

    @abstractmethod
    def fetch_file(self, key: str, size: int, path: Path, pool: ThreadPoolExecutor) -> list[Range]:
        """Starts reading `key` into the new local file `path`."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix/` (recursively), relative to the store root."""

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...


Range = tuple[Future, int, int]
"""A transfer task and the (offset, length) of the object it moves."""


def wait_all(futures: Iterable[Future]) -> None:
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
