"""The trainer as 2 data-parallel processes under torchrun's launcher, started as the README starts it:
`ttrv run SPEC --nproc 2`, which runs the pod's launcher (`ttrv train`, ttrv.launch) with torchrun's standalone
rendezvous on loopback; DeepSpeed on CPU with gloo, against a real S3 server (SeaweedFS). Votes are seeded per prompt, so the
2-process run must reproduce the 1-process run: same prompts per step, same final weights within float tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ttrv.modeling import load_model
from ttrv.store import open_store
from ttrv.weights import resolve_model

SPEC = {
    "name": "ddp",
    "seed": 11,
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 14},
    "rollout": {"votes": 6, "groupSize": 4, "maxNewTokens": 3},
    "grpo": {"lr": 1.0e-3, "epochs": 1, "promptsPerStep": 4, "microBatchSize": 4},
    "eval": {"before": False, "after": False},
    "storage": {"checkpointEvery": 0},
    "resources": {"gpusPerNode": 0, "zeroStage": 2},
}


def run_trainer(folder: Path, storage_uri: str, nproc: int) -> subprocess.CompletedProcess:
    spec = SPEC | {"storage": SPEC["storage"] | {"uri": storage_uri}}
    (folder / "run.yaml").write_text(yaml.safe_dump(spec))
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0"}
    entry = ["-m", "ttrv.train", "--spec", str(folder / "run.yaml"), "--out", str(folder)]
    if nproc == 1:
        command = [sys.executable, *entry]
    else:
        # The README's `ttrv run SPEC --nproc N`: torchrun's standalone rendezvous on loopback. (The pod's PET_*
        # path, one launcher per node, is taken by the local experiment's two-node trainer in test_experiment_local.)
        command = [sys.executable, "-m", "ttrv.cli", "run", str(folder / "run.yaml"), "--out", str(folder),
                   "--nproc", str(nproc)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def final_weights(uri: str) -> dict[str, torch.Tensor]:
    store = open_store(uri)
    return store.load_weights(store.latest_weights())


@pytest.mark.timeout(900)
def test_two_processes_under_torchrun_match_one_process(tmp_path, s3_uri):
    single = tmp_path / "one"
    double = tmp_path / "two"
    single.mkdir()
    double.mkdir()
    one = run_trainer(single, f"file://{single / 'store'}", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_trainer(double, s3_uri, 2)
    assert two.returncode == 0, two.stderr[-3000:]

    assert '"world": 2' in two.stderr  # the learner really ran data-parallel
    events_one = [json.loads(line) for line in (single / "events.jsonl").read_text().splitlines()]
    events_two = [json.loads(line) for line in (double / "events.jsonl").read_text().splitlines()]
    assert [e["prompt_ids"] for e in events_two] == [e["prompt_ids"] for e in events_one]
    ids = [i for e in events_two for i in e["prompt_ids"]]
    assert len(ids) == len(set(ids)) == SPEC["data"]["subsetSize"]

    reference, distributed = final_weights(f"file://{single / 'store'}"), final_weights(s3_uri)
    assert reference.keys() == distributed.keys()
    base = load_model(resolve_model("ttrv://tiny-qwen2vl")).state_dict()
    moved = sum((reference[k] - base[k]).square().sum() for k in reference).sqrt()
    apart = sum((distributed[k] - reference[k]).square().sum() for k in reference).sqrt()
    # Summation order differs between 1 and 2 ranks, and Adam turns float noise on parameters whose gradient is
    # zero in theory (e.g. k_proj biases) into lr-sized steps; one different vote would move the runs apart by a
    # sizeable share of the adaptation itself.
    assert moved > 0.01
    assert apart < 0.02 * moved, (float(apart), float(moved))

    progress = open_store(s3_uri).get_json("progress.json")
    assert progress["progressPercentage"] == 100.0 and progress["totalSteps"] == 4
