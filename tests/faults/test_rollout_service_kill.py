"""The rollout service killed (SIGKILL, as a node failure kills its pod) while the trainer's requests are in flight, in
a real `ttrv run` with `rollout.backend: service`: `ttrv serve` (Hugging Face engine) as a process of its own, the
trainer sampling over HTTP, the store on the embedded S3 server. `ttrv run` starts the service again at the same URL,
as the rollout Deployment would; the trainer's client retries within its budget, and the step completes on every
vote of every prompt, so the run ends where the unfaulted run of the same spec (conftest.service_run) ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_util import SERVICE_SPEC, events, log_events

from ttrv.local import EMBEDDED_BUCKET
from ttrv.objectserver import EmbeddedS3
from ttrv.rollout.jsonhttp import TRANSPORT_ERRORS, request_json
from ttrv.store import open_store

pytestmark = pytest.mark.fault

RETRY_SECONDS = 120  # the client's budget per request; starting the service again takes ~10 s here


def serve_pid(spec_file: Path) -> int | None:
    """The `ttrv serve` process started for `spec_file` (`ttrv run` starts one)."""
    wanted = ["serve", "--spec", str(spec_file)]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode().split("\0")
            except OSError:
                continue
            if any(argv[i:i + 3] == wanted for i in range(len(argv))):
                return int(entry.name)
    return None


def in_flight(url: str) -> int:
    """Requests the service holds now (its /health); 0 while it does not answer."""
    try:
        return request_json(url, "GET", "/health", timeout=2)[1].get("in_flight", 0)
    except TRANSPORT_ERRORS:
        return 0


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The newest weight version a finished `ttrv run` left in its embedded S3 server's data (served again)."""
    with EmbeddedS3(out / "s3") as server, pytest.MonkeyPatch.context() as patch:
        for name, value in server.env().items():
            patch.setenv(name, value)
        with open_store(f"s3://{EMBEDDED_BUCKET}/{SERVICE_SPEC['name']}") as store:
            return {name: tensor.clone() for name, tensor in store.load_weights(store.latest_weights()).items()}


def test_service_killed_mid_request_the_step_completes_and_the_run_matches(tmp_path, service_run):
    out, log = tmp_path / "out", tmp_path / "run.log"
    (tmp_path / "spec.yaml").write_text(json.dumps(SERVICE_SPEC))
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin",
           "TTRV_ROLLOUT_RETRY_SECONDS": str(RETRY_SECONDS)}
    with open(log, "wb") as handle:
        run = subprocess.Popen([sys.executable, "-m", "ttrv.cli", "run", str(tmp_path / "spec.yaml"), "--out",
                                str(out)], env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300

        def progress(ready) -> None:
            while not ready():
                assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.005)

        progress(lambda: log_events(log, "rollout_service_started") and serve_pid(out / "run.yaml"))
        url, pid = log_events(log, "rollout_service_started")[0]["url"], serve_pid(out / "run.yaml")
        # After step 1, so that the kill falls on an adaptation step's rollout, not on the evaluation before it.
        progress(lambda: events(out) and in_flight(url))
        os.kill(pid, signal.SIGKILL)
        killed_in_step = len(events(out)) + 1
        assert run.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)

    reference = service_run / "out"
    records, expected = events(out), events(reference)
    assert killed_in_step <= len(expected), "the kill came after the last step"
    retries = log_events(log, "rollout_request_retry")
    assert retries, "the trainer's client never retried: the kill missed the requests in flight"
    assert log_events(log, "rollout_service_exited")
    assert len(log_events(out / "rollout.log", "serve_listening")) == 2, "the service was not started again"
    # Each step trained on every vote of every prompt of its batch: the same votes as the unfaulted run's.
    fields = ("step", "prompt_ids", "prompts", "sampled_tokens", "reward", "entropy", "valid_ratio")
    assert [{k: r[k] for k in fields} for r in records] == [{k: r[k] for k in fields} for r in expected]
    assert all(r["prompts"] == len(r["prompt_ids"]) for r in records)
    report, reference_report = (json.loads((folder / "report.json").read_text()) for folder in (out, reference))
    for key in ("final_accuracy", "final_maj_accuracy", "subset_final_accuracy"):
        assert report[key] == reference_report[key], key
    faulted, unfaulted = final_weights(out), final_weights(reference)
    assert faulted.keys() == unfaulted.keys()
    for name in unfaulted:
        torch.testing.assert_close(faulted[name], unfaulted[name], rtol=1e-4, atol=1e-5, msg=name)
