"""The local (file://) store's disk fills up in the middle of a real trainer run. The disk is a real one: a tmpfs
small enough to hold the first two weight versions (2.4 MB each) and the checkpoint after step 2 (10.8 MB), but not
the third version, so the kernel answers ENOSPC to the publish of version 3.

The trainer stops with a clear error (exit 1, permanent: a person must free space; the message names the store and
the fix), what it wrote before is intact, and once the disk has room the same command resumes from the checkpoint
and ends on the weights of the run without the fault."""

from __future__ import annotations

import subprocess

import pytest
from trainer_util import (
    assert_each_prompt_once_per_epoch,
    assert_same_final_weights,
    events,
    log_events,
    trainer,
    write_spec,
)

from ttrv import exitcodes
from ttrv.checkpoint import committed_steps, rank_prefix
from ttrv.store import open_store

SIZE = "16896k"  # 17.3 MB: 15.6 MB written by the checkpoint after step 2, 1.7 MB left for a 2.4 MB version


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "ttrv-faults", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.fault
def test_disk_full_stops_with_a_clear_error_and_the_run_resumes_once_there_is_room(tmp_path, small_disk,
                                                                                    uninterrupted):
    root = small_disk / "store"
    write_spec(tmp_path, f"file://{root}")
    log = tmp_path / "trainer.log"
    code = trainer(tmp_path).wait(timeout=300)
    assert code == exitcodes.PERMANENT_FAILURE, log.read_text()[-3000:]
    assert f"error (permanent, exit 1): file://{root}: cannot write 'weights/v000003/model.safetensors': No space " \
           "left on device; the disk is full; free space or point storage.uri elsewhere\n" in log.read_text()
    assert "Traceback" not in log.read_text()
    assert len(events(tmp_path)) == 2
    with open_store(f"file://{root}") as store:
        assert store.weight_versions() == [1, 2]
        for step in (1, 2):
            store.load_weights(step)  # every byte checked against the manifest
        assert committed_steps(store) == [2]
        store.read_set(rank_prefix(2, 0))
    assert not [path for path in root.rglob("*") if path.name.endswith(".ttrv-tmp")], "a half-written file stayed"

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    failed_log_size = log.stat().st_size
    assert trainer(tmp_path).wait(timeout=300) == 0, log.read_text()[-3000:]
    assert [e["step"] for e in log_events(log, "resumed", start=failed_log_size)] == [2]
    assert_each_prompt_once_per_epoch(events(tmp_path))
    assert_same_final_weights(tmp_path, uninterrupted)
