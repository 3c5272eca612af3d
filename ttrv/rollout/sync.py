"""The rollout service's sync agent: keeps the served weights on the newest version in the store that loads.

Weights travel only through the store (trainer and rollout pods share neither memory nor disk). The agent lists the
store's weight versions every `poll_min` seconds while versions keep arriving, backing off to `poll_max` while none
do; the trainer's client nudges it (`wake`, the service's POST /sync) right after publishing, so the back-off costs
no latency where it matters. Store outages back off exponentially, with jitter, up to `backoff_max`.

Loading a version: read it, verified and under a store lease, straight into memory for an engine that takes
tensors (Hugging Face), or into its own content-named directory for vLLM (which reloads from a folder; the engine
never sees a path twice), then load it under the write side of the service's lock, so that no request is in flight
while the weights change and every answer names the version that produced it. When several versions appeared, the
newest is loaded and the ones between skipped. A version the store refuses (corrupt, truncated) or the engine
refuses (tensors that do not fit) is remembered and skipped until it is republished, and the previous version keeps
serving. An engine that fails in the middle of a load serves unknown weights: the agent stops and reports itself
broken (the service's /health fails and `ttrv serve` exits with ROLLOUT_ENGINE_DIED to be restarted, and a fresh
start loads the newest version that loads).
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ttrv import log
from ttrv.store import (
    MANIFEST,
    CorruptVersionError,
    Manifest,
    SetNotFoundError,
    Store,
    StoreError,
    weights_prefix,
)

logger = log.get_logger(__name__)

KINDS = ("full", "lora")


class VersionRefused(Exception):
    """The engine refused a weight version before changing anything: the previous version is still served."""


class RWLock:
    """Many readers (rollout requests) or one writer (a weight reload). A waiting writer holds back new readers, so a
    stream of requests cannot starve a reload; the reload starts once the requests in flight have finished."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @property
    def readers(self) -> int:
        return self._readers

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _Broken(Exception):
    pass


class SyncAgent:
    """Follows the store's weight versions on a thread of its own. `load(step, path, kind)` puts a fetched version
    into the engine (raising `VersionRefused` when it cannot without changing anything); `version` is the step being
    served (None: the base model), changed only under `lock.write()`."""

    def __init__(self, store: Store, load: Callable[[int, Path, str], None], cache_dir: str | Path, *,
                 poll_min: float = 0.5, poll_max: float = 5.0, backoff_max: float = 30.0,
                 load_in_memory: Callable[[int, dict, str], None] | None = None):
        self.store = store
        self._load = load
        self._load_in_memory = load_in_memory
        """An engine that takes tensors (the Hugging Face one) gets them straight from the store's verified
        in-memory download, no file written; vLLM reloads from a folder (`/collective_rpc` passes JSON, so
        reload_weights gets `weights_path`), which `load` is given."""
        self.cache_dir = Path(cache_dir)
        self.poll_min, self.poll_max, self.backoff_max = poll_min, poll_max, backoff_max
        self.lock = RWLock()
        self.version: int | None = None
        self.digest: str | None = None
        """Manifest digest of the served version: a step republished with other bytes is another version."""
        self.path: Path | None = None
        self.refused: dict[int, tuple[str | None, str]] = {}
        """step -> (digest of the manifest refused, why); a republished step gets a new digest and a new try."""
        self.broken: str | None = None
        self.last_error: str | None = None
        self.synced = threading.Event()
        """Set after the first complete look at the store: the service is ready from then on."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> SyncAgent:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="ttrv-sync", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        """Look at the store now (the trainer has just published)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        delay, failures = self.poll_min, 0
        while not self._stop.is_set():
            try:
                loaded = self.sync_once()
            except _Broken:
                return
            except (StoreError, OSError) as error:
                failures += 1
                delay = min(self.backoff_max, self.poll_min * 2 ** failures) * random.uniform(0.8, 1.2)
                self.last_error = str(error)
                logger.warning("weights_sync_failed", error=str(error), retry_in=round(delay, 1))
            else:
                failures, self.last_error = 0, None
                self.synced.set()
                delay = self.poll_min if loaded else min(2 * delay, self.poll_max)
            if self._wake.wait(delay):
                delay = self.poll_min
            self._wake.clear()

    def sync_once(self) -> bool:
        """Loads the newest version, newer than the one served, that loads; True when one was loaded. A served
        version that was withdrawn or republished (a trainer resumed from an earlier checkpoint deletes the
        versions after it and publishes those steps again) no longer counts as served."""
        versions = self.store.weight_versions()
        if self.version is not None and not self._still_served(versions):
            logger.info("served_version_withdrawn", step=self.version)
            self.version = self.digest = None
        for step in reversed(versions):
            if self.version is not None and step <= self.version:
                return False
            if not self._still_refused(step) and self._try_load(step):
                return True
        return False

    def _still_served(self, versions: list[int]) -> bool:
        if self.version not in versions:
            return False
        manifest = self.store.read_manifest(weights_prefix(self.version))
        return manifest is not None and manifest.digest == self.digest

    def _still_refused(self, step: int) -> bool:
        refusal = self.refused.get(step)
        if refusal is None:
            return False
        try:
            manifest = self.store.read_manifest(weights_prefix(step))
        except CorruptVersionError:
            return True
        if manifest is not None and manifest.digest == refusal[0]:
            return True
        del self.refused[step]
        return manifest is None

    def _refuse(self, step: int, digest: str | None, reason: str) -> None:
        self.refused[step] = (digest, reason)
        logger.warning("weights_refused", step=step, reason=reason, serving=self.version)

    def _try_load(self, step: int) -> bool:
        prefix = weights_prefix(step)
        started = time.monotonic()
        digest = None
        path: Path | None = None
        tensors: dict | None = None
        try:
            manifest = self.store.read_manifest(prefix)
            if manifest is None:
                return False
            digest = manifest.digest
            if self._load_in_memory is not None:
                local, tensors = self.store.read_weights(step)
            else:
                path = self.store.fetch_weights(step, self.cache_dir)
                local = Manifest.decode(prefix, (path / MANIFEST).read_bytes(), str(path))
        except SetNotFoundError as error:  # deleted or replaced while being read: the next look decides
            logger.info("weights_vanished", step=step, error=str(error))
            return False
        except CorruptVersionError as error:
            self._refuse(step, digest, str(error))
            return False
        fetched = time.monotonic()
        kind = local.meta.get("kind")
        try:
            if kind not in KINDS:
                raise VersionRefused(f"its manifest's meta.kind is {kind!r}, not one of {list(KINDS)}; publish it "
                                     "with Store.publish_weights")
            with self.lock.write():
                if tensors is not None:
                    self._load_in_memory(step, tensors, kind)
                else:
                    self._load(step, path, kind)
                self.version, self.digest = step, local.digest
        except VersionRefused as error:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
            self._refuse(step, local.digest, str(error))
            return False
        except Exception as error:
            self.broken = (f"loading weight version {step} failed midway ({type(error).__name__}: {error}); the "
                           "served weights are unknown, restart the service")
            logger.error("weights_load_failed", step=step, error=str(error), exc_info=True)
            raise _Broken from error
        del tensors  # the engine copied them in: the downloaded buffers go now
        self.path = path
        for child in self.cache_dir.iterdir():
            if child != path:
                shutil.rmtree(child, ignore_errors=True)
        logger.info("weights_loaded", step=step, kind=kind, path=str(path) if path else "memory",
                    mb=round(local.total_bytes / 1e6, 1),
                    fetch_seconds=round(fetched - started, 2), load_seconds=round(time.monotonic() - fetched, 2))
        return True
