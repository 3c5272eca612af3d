"""The trainer as a preemptible pod workload: the same command, killed and started again, continues exactly.

Everything is real: the trainer entrypoint (`python -m ttrv.train`) as a subprocess, DeepSpeed on CPU (gloo),
the bundled tiny model, and the weight/checkpoint store on disk (file://; the S3 store's faults are in
test_store_outage.py). Kills are real signals to the process group.
"""

import os
import random
import signal
import time

import pytest
from trainer_util import (
    TOTAL_STEPS,
    assert_each_prompt_once_per_epoch,
    assert_same_final_weights,
    events,
    log_events,
    trainer,
    wait_for,
    write_spec,
)

from ttrv import exitcodes
from ttrv.checkpoint import committed_steps
from ttrv.store import open_store

STEP_SECONDS = 0.3  # one step of SPEC on this machine's two cores, measured
_draw = random.Random(20261126)
# Kill once step k is recorded, plus a fraction of a step: depending on k and the delay the kill lands in a
# checkpoint (every 2 steps), a publish, the rollout or the update of the next step.
KILLS = [(k, round(_draw.uniform(0, STEP_SECONDS), 3)) for k in sorted(_draw.sample(range(1, TOTAL_STEPS), 5))]


def test_uninterrupted_run_visits_each_prompt_once_per_epoch(uninterrupted):
    assert_each_prompt_once_per_epoch(events(uninterrupted))


@pytest.mark.fault
@pytest.mark.parametrize(("step", "delay"), KILLS, ids=[f"after-step-{k}+{d}s" for k, d in KILLS])
def test_sigkill_then_restart_resumes_from_the_newest_checkpoint(tmp_path, uninterrupted, step, delay):
    write_spec(tmp_path)
    first = trainer(tmp_path)
    wait_for(lambda: len(events(tmp_path)) >= step, 240, first, interval=0.01)
    time.sleep(delay)
    os.killpg(first.pid, signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    with open_store(f"file://{tmp_path / 'store'}") as store:
        complete = committed_steps(store)
    log = tmp_path / "trainer.log"
    killed_log_size = log.stat().st_size

    second = trainer(tmp_path)
    assert second.wait(timeout=300) == 0, log.read_text()[-3000:]
    resumed = log_events(log, "resumed", start=killed_log_size)
    # the newest complete checkpoint at the kill, whatever was half-written after it; none: a fresh start
    assert [e["step"] for e in resumed] == complete[-1:], (complete, resumed)
    records = events(tmp_path)
    assert_each_prompt_once_per_epoch(records)
    assert [r["prompt_ids"] for r in records] == [r["prompt_ids"] for r in events(uninterrupted)]
    assert_same_final_weights(tmp_path, uninterrupted)


@pytest.mark.fault
def test_sigterm_checkpoints_exits_retryable_and_resumes(tmp_path, uninterrupted):
    write_spec(tmp_path)
    first = trainer(tmp_path)
    wait_for(lambda: len(events(tmp_path)) >= 3, 240, first)
    os.killpg(first.pid, signal.SIGTERM)
    code = first.wait(timeout=120)
    assert code == exitcodes.PREEMPTED and exitcodes.is_retryable(code)
    stopped_at = len(events(tmp_path))
    assert stopped_at < TOTAL_STEPS, "the run ended before the signal"
    with open_store(f"file://{tmp_path / 'store'}") as store:
        assert committed_steps(store)[-1] == stopped_at  # the checkpoint was written on the signal, at that step

    second = trainer(tmp_path)
    assert second.wait(timeout=300) == 0, (tmp_path / "trainer.log").read_text()[-3000:]
    assert [e["step"] for e in log_events(tmp_path / "trainer.log", "resumed")] == [stopped_at]
    assert_each_prompt_once_per_epoch(events(tmp_path))
    assert_same_final_weights(tmp_path, uninterrupted)
