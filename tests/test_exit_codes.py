"""Exit codes of the trainer pod's command (`ttrv train`, ttrv/launch.py) for each failure class, as the PyTorchJob
`restartPolicy: ExitCode` contract reads them: 1-127 permanent (the training-operator fails the job), 128-255
retryable (it restarts the pod, which resumes from its checkpoint).

Each case runs the real launcher with the variables the training-operator injects (PET_*), one worker per case
(two for the lost-peer case), on the bundled tiny model.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ttrv import exitcodes
from ttrv.net import free_port
from ttrv.train import exit_code_for

BASE = {
    "name": "codes",
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 8},
    "rollout": {"votes": 4, "groupSize": 2, "maxNewTokens": 3},
    "grpo": {"lr": 1e-3, "epochs": 1, "promptsPerStep": 2, "microBatchSize": 8},
    "eval": {"before": False, "after": False},
    "resources": {"gpusPerNode": 0},
}


def pod(folder: Path, spec: dict | str, nproc: int = 1, **env) -> subprocess.Popen:
    spec_file = folder / "run.yaml"
    spec_file.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    port = str(free_port())
    environment = os.environ | {
        "PET_NNODES": "1", "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": port, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "1", "RANK": "0",
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0", **env,
    }
    return subprocess.Popen([sys.executable, "-m", "ttrv.cli", "train", "--spec", str(spec_file), "--out", str(folder)],
                            env=environment, stdout=subprocess.DEVNULL, stderr=open(folder / "pod.log", "wb"),
                            start_new_session=True)


def finish(process: subprocess.Popen, folder: Path) -> tuple[int, str]:
    code = process.wait(timeout=300)
    return code, (folder / "pod.log").read_text()


def with_store(folder: Path, **overrides) -> dict:
    return BASE | {"storage": {"uri": f"file://{folder / 'store'}"}} | overrides


@pytest.mark.parametrize(
    ("case", "expected", "message"),
    [
        ("bad_spec", exitcodes.BAD_SPEC, "rollout: groupSize (4) > votes (2)"),
        ("bad_data", exitcodes.BAD_DATA, "no such data file; check data.path"),
        ("bad_model", exitcodes.BAD_MODEL, "model.path"),
        ("store_unavailable", exitcodes.STORE_UNAVAILABLE, "did not answer"),
        ("rollout_unavailable", exitcodes.ROLLOUT_UNAVAILABLE, "rollout service"),
    ],
)
def test_failure_classes(tmp_path, case, expected, message):
    env = {}
    if case == "bad_spec":
        spec = with_store(tmp_path, rollout={"votes": 2, "groupSize": 4})
    elif case == "bad_data":
        spec = with_store(tmp_path, data={"path": str(tmp_path / "missing.json")})
    elif case == "bad_model":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
        spec = with_store(tmp_path, model={"path": str(tmp_path / "model")})
    elif case == "store_unavailable":
        spec = BASE | {"storage": {"uri": "s3://ttrv/codes", "endpoint": f"http://127.0.0.1:{free_port()}"}}
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test-secret", "TTRV_STORE_RETRY_SECONDS": "2"}
    else:
        spec = with_store(tmp_path, rollout=BASE["rollout"] | {"backend": "service"})
        env = {"TTRV_ROLLOUT_URL": f"http://127.0.0.1:{free_port()}", "TTRV_ROLLOUT_RETRY_SECONDS": "2"}
    code, log = finish(pod(tmp_path, spec, **env), tmp_path)
    assert code == expected, log[-2000:]
    assert exitcodes.is_retryable(code) == (code >= 128)
    assert message in log
    assert "Traceback" not in log.split('"trainer_failed"')[0][-200:]


def test_sigterm_to_the_pod_checkpoints_and_exits_retryable(tmp_path):
    spec = with_store(tmp_path, data={"path": "ttrv://tiny-shapes/test", "subsetSize": 40},
                      storage={"uri": f"file://{tmp_path / 'store'}", "checkpointEvery": 0})
    process = pod(tmp_path, spec)
    events = tmp_path / "events.jsonl"
    deadline = time.monotonic() + 240
    while not (events.exists() and events.read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "pod.log").read_text()[-2000:]
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # what the kubelet does to a preempted pod
    code, log = finish(process, tmp_path)
    assert code == exitcodes.PREEMPTED, log[-2000:]
    assert '"checkpoint_saved"' in log


def test_a_lost_peer_fails_the_pod_retryably(tmp_path):
    """One of two workers dies (node failure, OOM kill): the pod exits with a retryable code, never 1."""
    spec = with_store(tmp_path, data={"path": "ttrv://tiny-shapes/test", "subsetSize": 40},
                      grpo=BASE["grpo"] | {"promptsPerStep": 4})
    process = pod(tmp_path, spec, nproc=2)
    events = tmp_path / "events.jsonl"
    deadline = time.monotonic() + 300
    while not (events.exists() and events.read_text().count("\n") >= 1):
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "pod.log").read_text()[-2000:]
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "ttrv.train"], capture_output=True, text=True)
    rank_one = sorted(int(pid) for pid in workers.stdout.split())[-1]  # the launcher's children are its workers
    os.kill(rank_one, signal.SIGKILL)
    code, log = finish(process, tmp_path)
    assert exitcodes.is_retryable(code), (code, log[-2000:])


def test_distributed_errors_map_to_lost_peer():
    assert exit_code_for(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer")) == \
        exitcodes.LOST_PEER
