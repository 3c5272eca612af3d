"""The object store down in the middle of a real trainer run on the S3 store: the server (SeaweedFS, EmbeddedS3) is
killed (SIGKILL: down at once, and harsher than a graceful stop) while the trainer publishes a weight version, or
while it writes a checkpoint, and started again on the same port and data after the outage. The store's retries (exponential backoff, the default 90 s budget) ride it out and
the run ends on the weights of the same run without an outage; a reader polling the store throughout, as a rollout
service does, never loads a partial version. A trainer killed while its checkpoint is stuck in the outage resumes
from the previous complete checkpoint.

The outage must begin at a known point of the trainer's work, and a step takes ~0.3 s here: the trainer is frozen
(SIGSTOP) the moment the test sees that point, the server is killed, and the trainer continued (SIGCONT), so how
fast the server goes down does not depend on the machine's load."""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime

import pytest
from trainer_util import (
    assert_each_prompt_once_per_epoch,
    assert_same_final_weights,
    events,
    final_weights,
    log_events,
    trainer,
    wait_for,
    write_spec,
)

from ttrv.checkpoint import committed_steps, rank_prefix
from ttrv.objectserver import EmbeddedS3
from ttrv.store import SetNotFoundError, StoreUnavailableError, open_store

OUTAGES = [pytest.param(6, id="6s"), pytest.param(30, id="30s", marks=pytest.mark.slow)]
PUBLISHED = 4  # the version published in the outage: after step 3, where no checkpoint comes between
CHECKPOINTED = 4  # the checkpoint written in the outage (checkpointEvery 2: the one after step 2 is complete)


@pytest.fixture
def object_server(tmp_path, monkeypatch):
    """A server of the test's own (it goes down), its endpoint and credentials in the environment the trainer
    inherits, and no TTRV_STORE_RETRY_SECONDS there: the trainer rides out the outage on its default budget."""
    monkeypatch.delenv("TTRV_STORE_RETRY_SECONDS", raising=False)
    monkeypatch.delenv("TTRV_S3_SECRET_DIR", raising=False)
    with EmbeddedS3(tmp_path / "s3") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


class Reader(threading.Thread):
    """A rollout service's view of the store, polled throughout the run: the newest complete weight version, loaded
    and verified byte for byte against its manifest. Allowed: no answer while the server is down, a version deleted
    (gc, or withdrawn by a resumed trainer) between listing and reading it. Anything else is a problem."""

    def __init__(self, uri: str, names: set[str]):
        super().__init__(daemon=True)
        self.store = open_store(uri, retry_seconds=1)
        self.names = names
        self.loads: dict[int, int] = {}
        self.unavailable = 0
        self.problems: list[str] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            try:
                step = self.store.latest_weights()
                if step is None:
                    continue
                tensors = self.store.load_weights(step)
                if set(tensors) != self.names:
                    self.problems.append(f"version {step} holds {len(tensors)} tensors, not {len(self.names)}")
                self.loads[step] = self.loads.get(step, 0) + 1
            except StoreUnavailableError:
                self.unavailable += 1
            except SetNotFoundError:
                pass
            except Exception as error:  # noqa: BLE001 - every other failure is what the test looks for
                self.problems.append(f"{type(error).__name__}: {error}")

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.store.close()

    def assert_saw_only_complete_versions(self) -> None:
        assert self.problems == []
        assert len(self.loads) >= 3, f"the reader loaded too few versions to tell: {self.loads}"


class Run:
    """A trainer on SPEC with its store on the test's server, and a Reader polling that store from start to end."""

    uri = "s3://faults/run"

    def __init__(self, folder, uninterrupted):
        self.folder, self.log = folder, folder / "trainer.log"
        write_spec(folder, self.uri)
        # The trainer's temporary files in a folder of the test's: its checkpoint's local copy shows when it begins.
        (folder / "tmp").mkdir()
        self.reader = Reader(self.uri, set(final_weights(uninterrupted)))
        self.reader.start()
        self.process = self.start_trainer()

    def start_trainer(self):
        self.process = trainer(self.folder, TMPDIR=str(self.folder / "tmp"))
        return self.process

    def wait_for_checkpoint(self) -> None:
        """Until the trainer begins the checkpoint after step CHECKPOINTED; its first upload comes after DeepSpeed
        has written the checkpoint locally, ~0.1 s later."""
        wait_for(lambda: len(events(self.folder)) >= CHECKPOINTED - 1 and any((self.folder / "tmp").glob("ttrv-ckpt-*")),
                 240, self.process, interval=0.002)

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.reader.stop()

    def assert_ended_as_uninterrupted(self, uninterrupted) -> None:
        self.reader.assert_saw_only_complete_versions()
        assert_each_prompt_once_per_epoch(events(self.folder))
        assert_same_final_weights(self.folder, uninterrupted)


@pytest.fixture
def run(tmp_path, object_server, uninterrupted):
    started = Run(tmp_path, uninterrupted)
    yield started
    started.close()


@contextmanager
def frozen(process):
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


def restart_after(server: EmbeddedS3, outage: float, run: Run) -> int:
    """The server stays down `outage` seconds, then comes back; the trainer's exit code."""
    time.sleep(outage)
    server.start()
    return run.process.wait(timeout=300)


def assert_rode_it_out(run: Run, first_key: str | tuple[str, ...], outage: float) -> None:
    """The trainer's first failed call was `first_key`'s and it kept retrying for the whole outage."""
    retries = log_events(run.log, "store_retry")
    assert retries and retries[0]["key"].startswith(first_key), retries[:1]
    stamps = [datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")) for e in retries]
    assert (stamps[-1] - stamps[0]).total_seconds() >= outage - 1
    assert run.reader.unavailable, "the reader never met the outage"


@pytest.mark.fault
@pytest.mark.parametrize("outage", OUTAGES)
def test_outage_during_a_weight_publish(run, object_server, uninterrupted, outage):
    with open_store(run.uri, retry_seconds=5) as watcher:
        wait_for(lambda: (watcher.get_json("progress.json") or {}).get("step", 0) >= PUBLISHED - 1, 240, run.process,
                 interval=0.01)
        with frozen(run.process):
            assert watcher.get_json("progress.json")["step"] == PUBLISHED - 1, "the freeze came a step late"
            object_server.kill()
    assert restart_after(object_server, outage, run) == 0, run.log.read_text()[-3000:]
    # A publish with storage.fullEvery > 1 first re-reads its delta base's manifest (here the previous version: this
    # tiny run's updates change too many values for a delta, so each version is full and the next one's base).
    assert_rode_it_out(run, (f"weights/v{PUBLISHED:06d}", f"weights/v{PUBLISHED - 1:06d}/manifest.json"), outage)
    run.assert_ended_as_uninterrupted(uninterrupted)


@pytest.mark.fault
@pytest.mark.parametrize("outage", OUTAGES)
def test_outage_during_a_checkpoint(run, object_server, uninterrupted, outage):
    run.wait_for_checkpoint()
    with frozen(run.process):
        step = len(events(run.folder))
        object_server.kill()
    assert restart_after(object_server, outage, run) == 0, run.log.read_text()[-3000:]
    assert step == CHECKPOINTED
    assert_rode_it_out(run, f"checkpoints/s{step:06d}-r000", outage)
    assert step in [e["step"] for e in log_events(run.log, "checkpoint_saved")]
    with open_store(run.uri) as store:
        for kept in committed_steps(store):
            store.read_set(rank_prefix(kept, 0))  # complete and verified, so a resume could take it
    run.assert_ended_as_uninterrupted(uninterrupted)


@pytest.mark.fault
def test_trainer_killed_in_an_interrupted_checkpoint_resumes_from_the_previous_one(run, object_server, uninterrupted):
    run.wait_for_checkpoint()
    with frozen(run.process):
        step = len(events(run.folder))
        object_server.kill()
    wait_for(lambda: any(e["key"].startswith(f"checkpoints/s{step:06d}")
                         for e in log_events(run.log, "store_retry")), 60, run.process)
    os.killpg(run.process.pid, signal.SIGKILL)
    run.process.wait()
    object_server.start()
    with open_store(run.uri) as store:
        assert committed_steps(store) == [step - 2]
    killed_log_size = run.log.stat().st_size
    assert run.start_trainer().wait(timeout=300) == 0, run.log.read_text()[-3000:]
    assert [e["step"] for e in log_events(run.log, "checkpoint_restored", start=killed_log_size)] == [step - 2]
    run.assert_ended_as_uninterrupted(uninterrupted)
