"""The trainer as a preemptible pod workload: the same command, killed and started again, continues exactly.

Everything is real: the trainer entrypoint (`python -m ttrv.train`) as a subprocess, DeepSpeed on CPU (gloo),
the bundled tiny model, and the weight/checkpoint store on disk (file://; the S3 variant runs in the torchrun
test). Kills are real signals to the process group.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from ttrv import exitcodes
from ttrv.checkpoint import committed_steps
from ttrv.store import open_store

SPEC = {
    "name": "resume",
    "seed": 3,
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 14},
    "rollout": {"votes": 6, "groupSize": 4, "maxNewTokens": 3},
    "grpo": {"lr": 1.0e-3, "epochs": 2, "promptsPerStep": 4, "microBatchSize": 8},
    "eval": {"before": False, "after": False},
    "storage": {"checkpointEvery": 2},
    "resources": {"gpusPerNode": 0},
}
TOTAL_STEPS = 8  # 14 prompts / 4 per step = 4 steps per epoch (the last takes 2), 2 epochs


def write_spec(folder: Path, **overrides) -> Path:
    spec = SPEC | overrides
    spec["storage"] = SPEC["storage"] | {"uri": f"file://{folder / 'store'}"}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trainer(folder: Path) -> subprocess.Popen:
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0"}
    return subprocess.Popen([sys.executable, "-m", "ttrv.train", "--spec", str(folder / "run.yaml"), "--out",
                             str(folder)], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(folder / "trainer.log", "ab"))


def wait_for(predicate, timeout: float, process: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"trainer exited {process.returncode} too early")
        time.sleep(0.05)
    raise AssertionError("timed out")


def events(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    store = open_store(f"file://{folder / 'store'}")
    return store.load_weights(store.latest_weights())


def assert_each_prompt_once_per_epoch(records: list[dict], subset: int):
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    by_epoch: dict[int, Counter] = {}
    for record in records:
        by_epoch.setdefault(record["epoch"], Counter()).update(record["prompt_ids"])
    assert sorted(by_epoch) == [0, 1]
    for counts in by_epoch.values():
        assert len(counts) == subset and set(counts.values()) == {1}, counts


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    write_spec(folder)
    process = trainer(folder)
    assert process.wait(timeout=300) == 0, (folder / "trainer.log").read_text()[-3000:]
    return folder


def test_uninterrupted_run_visits_each_prompt_once_per_epoch(uninterrupted):
    assert_each_prompt_once_per_epoch(events(uninterrupted), SPEC["data"]["subsetSize"])


@pytest.mark.parametrize("kill_after_checkpoint", [2, 4])
def test_sigkill_then_restart_resumes_from_the_checkpoint(tmp_path, uninterrupted, kill_after_checkpoint):
    write_spec(tmp_path)
    store = open_store(f"file://{tmp_path / 'store'}")
    first = trainer(tmp_path)
    wait_for(lambda: kill_after_checkpoint in committed_steps(store), 240, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = len(events(tmp_path))
    assert killed_at >= kill_after_checkpoint

    second = trainer(tmp_path)
    assert second.wait(timeout=300) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    assert '"event": "resumed"' in (tmp_path / "trainer.log").read_text()
    records = events(tmp_path)
    assert_each_prompt_once_per_epoch(records, SPEC["data"]["subsetSize"])
    expected = events(uninterrupted)
    assert [r["prompt_ids"] for r in records] == [r["prompt_ids"] for r in expected]
    resumed, reference = final_weights(tmp_path), final_weights(uninterrupted)
    assert resumed.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sigterm_checkpoints_exits_retryable_and_resumes(tmp_path, uninterrupted):
    write_spec(tmp_path)
    first = trainer(tmp_path)
    wait_for(lambda: (tmp_path / "events.jsonl").exists() and len(events(tmp_path)) >= 3, 240, first)
    os.killpg(first.pid, signal.SIGTERM)
    code = first.wait(timeout=120)
    assert code == exitcodes.PREEMPTED and exitcodes.is_retryable(code)
    store = open_store(f"file://{tmp_path / 'store'}")
    stopped_at = len(events(tmp_path))
    assert committed_steps(store)[-1] == stopped_at  # the checkpoint was written on the signal, at that step

    second = trainer(tmp_path)
    assert second.wait(timeout=300) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    assert_each_prompt_once_per_epoch(events(tmp_path), SPEC["data"]["subsetSize"])
    resumed, reference = final_weights(tmp_path), final_weights(uninterrupted)
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
