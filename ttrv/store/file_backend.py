"""The file:// backend: a local directory, written by temporary name, fsync and rename."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ttrv.store.backend import Backend, BufferSource, MiB, Missing, Range, SizeMismatch, Source
from ttrv.store.errors import StoreConfigError, StoreError
from ttrv.store.keys import LEASES, TEMPORARY, check_key, local_path


class FileBackend(Backend):
    """A local directory. Every object is written to a temporary name in its directory, fsynced and renamed, so a
    crash or a full disk leaves the previous content intact."""

    def __init__(self, root: Path, url: str):
        self.root, self.url = root, url

    def _path(self, key: str) -> Path:
        return local_path(self.root, key)

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

    def _write(self, key: str, source: Source) -> None:
        target = self._path(key)
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMPORARY}")
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
        self._write(key, BufferSource(data))

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise self._fail("read", key, error) from None

    def upload(self, key: str, source: Source, pool: ThreadPoolExecutor) -> Callable[[], None]:
        future = pool.submit(self._write, key, source)
        return future.result

    @contextlib.contextmanager
    def _reading(self, action: str, key: str) -> Iterator[None]:
        """An object that is not there is Missing (its version is incomplete); any other OSError is a StoreError."""
        try:
            yield
        except FileNotFoundError:
            raise Missing(key) from None
        except OSError as error:
            raise self._fail(action, key, error) from None

    def _read_into(self, key: str, size: int, out: memoryview) -> None:
        with self._reading("read", key), open(self._path(key), "rb", buffering=0) as handle:
            actual = os.fstat(handle.fileno()).st_size
            if actual != size:
                raise SizeMismatch(key, actual)
            view = out[:size]
            while view:
                read = handle.readinto(view)
                if not read:
                    raise SizeMismatch(key, size - len(view))
                view = view[read:]

    def download(self, key: str, size: int, out: memoryview, pool: ThreadPoolExecutor) -> list[Range]:
        return [(pool.submit(self._read_into, key, size, out), 0, size)]

    def _link_or_copy(self, key: str, size: int, path: Path) -> None:
        source = self._path(key)
        with self._reading("copy", key):
            actual = source.stat().st_size
            if actual != size:
                raise SizeMismatch(key, actual)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Objects are only ever replaced by rename, never rewritten in place, so a hard link is a stable copy.
            try:
                os.link(source, path)
            except OSError:
                shutil.copyfile(source, path)

    def fetch_file(self, key: str, size: int, path: Path, pool: ThreadPoolExecutor) -> list[Range]:
        return [(pool.submit(self._link_or_copy, key, size, path), 0, size)]

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for directory, _, names in os.walk(base):
            for name in names:
                if not name.endswith(TEMPORARY):
                    key = Path(directory, name).relative_to(self.root).as_posix()
                    try:
                        keys.append(check_key(key))
                    except StoreConfigError:
                        continue  # not written through a store (a backslash, an overlong name): no object of it
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
