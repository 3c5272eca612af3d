"""What the trainer tests share: the trainer entrypoint and `ttrv run` as real processes on the bundled tiny model
and benchmark, the small spec they run, and the checks that an interrupted run ended where an uninterrupted one
does (each prompt once per epoch, the same batches, the same final weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

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

SERVICE_SPEC = {
    "name": "svc",
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 12},
    "rollout": {"votes": 8, "groupSize": 4, "maxNewTokens": 3, "backend": "service", "engine": "hf"},
    "grpo": {"lr": 1e-3, "epochs": 1, "promptsPerStep": 4, "microBatchSize": 32},
    "eval": {"limit": 16, "majVotes": 4},
    "resources": {"gpusPerNode": 0},
}
"""`ttrv run` with the rollout service beside the trainer and the store on the embedded S3 server: 3 steps."""


def write_spec(folder: Path, uri: str | None = None, **overrides) -> Path:
    """SPEC with its store at `uri` (default: file:// inside `folder`) as folder/run.yaml."""
    spec = SPEC | overrides
    spec["storage"] = SPEC["storage"] | {"uri": uri or f"file://{folder / 'store'}"}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trainer(folder: Path, **env: str) -> subprocess.Popen:
    """`python -m ttrv.train` on folder/run.yaml, in a session of its own, its log appended to folder/trainer.log."""
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0"} | env
    with open(folder / "trainer.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "ttrv.train", "--spec", str(folder / "run.yaml"), "--out",
                                 str(folder)], env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=log)


def wait_for(predicate, timeout: float, process: subprocess.Popen, interval: float = 0.05):
    """The first truthy value of `predicate()`; fails when `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"trainer exited {process.returncode} too early")
        time.sleep(interval)
    raise AssertionError("timed out")


def events(folder: Path) -> list[dict]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def log_events(log: Path, name: str, start: int = 0) -> list[dict]:
    """The structured log lines of event `name` in a process's log, from byte `start` on. tqdm's progress bar ends
    its updates with no newline, so a JSON line may follow one on the same line."""
    with log.open("rb") as handle:
        handle.seek(start)
        lines = handle.read().decode(errors="replace").splitlines()
    return [json.loads(line[line.index("{"):]) for line in lines if f'"event": "{name}"' in line]


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The newest weight version in the store that folder/run.yaml names."""
    uri = yaml.safe_load((folder / "run.yaml").read_text())["storage"]["uri"]
    with open_store(uri) as store:
        return store.load_weights(store.latest_weights())


def assert_same_final_weights(folder: Path, reference: Path) -> None:
    """The trainer is deterministic given its seed (votes are seeded per prompt and step), so an interrupted run
    ends on the uninterrupted run's weights, up to float reassociation."""
    resumed, expected = final_weights(folder), final_weights(reference)
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_each_prompt_once_per_epoch(records: list[dict], subset: int = SPEC["data"]["subsetSize"]):
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    by_epoch: dict[int, Counter] = {}
    for record in records:
        by_epoch.setdefault(record["epoch"], Counter()).update(record["prompt_ids"])
    assert sorted(by_epoch) == [0, 1]
    for counts in by_epoch.values():
        assert len(counts) == subset and set(counts.values()) == {1}, counts


def ttrv_run(folder: Path, spec: dict, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    """`ttrv run folder/spec.yaml --out folder/out`, as a user types it, with a bare environment."""
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(folder / "spec.yaml"), "--out",
                           str(folder / "out")], capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", **env})
