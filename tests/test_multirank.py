"""The trainer's multi-rank and GPU-bound paths, shown on CPU (issue 15): ZeRO-Offload of the optimiser, ZeRO-3
publish/checkpoint/resume with 2 processes, collectives on the engine's device, the accelerator choice, sharded
evaluation, SIGTERM during start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from trainer_util import SPEC, events, final_weights

SMALL = SPEC | {
    "name": "multirank",
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 8},
    "grpo": SPEC["grpo"] | {"epochs": 1},
    "storage": {"checkpointEvery": 0},
}
"""8 prompts, 4 a step: 2 steps."""


def run_trainer(folder, spec: dict, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python -m ttrv.train` (one process) on `spec` with its store inside `folder`."""
    spec = spec | {"storage": spec.get("storage", {}) | {"uri": f"file://{folder / 'store'}"}}
    (folder / "run.yaml").write_text(yaml.safe_dump(spec))
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0", **env}
    return subprocess.run([sys.executable, "-m", "ttrv.train", "--spec", str(folder / "run.yaml"), "--out",
                           str(folder)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(600)
def test_offloaded_optimizer_trains(tmp_path):
    """resources.offloadOptimizer: DeepSpeed refuses torch's AdamW under ZeRO-Offload (ZeRORuntimeException at
    initialisation); the learner hands it DeepSpeed's CPU Adam, and the run trains."""
    spec = SMALL | {"resources": {"gpusPerNode": 0, "zeroStage": 2, "offloadOptimizer": True}}
    done = run_trainer(tmp_path, spec)
    assert done.returncode == 0, done.stderr[-3000:]
    ready = [json.loads(line[line.index("{"):]) for line in done.stderr.splitlines() if '"learner_ready"' in line]
    assert ready[0]["optimizer"] == "DeepSpeedCPUAdam" and ready[0]["offload"] is True
    assert [e["step"] for e in events(tmp_path)] == [1, 2]
    assert final_weights(tmp_path)
