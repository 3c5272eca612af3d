"""The process a user holds, SIGKILLed: `ttrv run` and `ttrv experiment run --local` take every process they
started with them (ttrv.lifetime), a second run on their folder is refused while any of those lives, and the same
command run again afterwards continues from the last checkpoint to the report an uninterrupted run writes.

Everything is real: the CLI as a user types it, the trainer (and torch elastic's launcher and worker in the
experiment's pods), the embedded S3 server (SeaweedFS), `ttrv serve` with the Hugging Face engine, the bundled tiny
model and benchmark. Only the parent is killed (os.kill of its pid, not of a process group), as the OOM killer or
`kill -9` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_experiment_local import SHAPES, experiment
from trainer_util import SERVICE_SPEC, SPEC, log_events

from ttrv.lifetime import alive

pytestmark = pytest.mark.fault

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
       # where DeepSpeed's JIT-built ops are cached (a checkout of its own may keep its own)
       **{name: os.environ[name] for name in ("TORCH_EXTENSIONS_DIR", "PYTHONPATH") if name in os.environ}}
GONE_SECONDS = 60  # a step, a checkpoint and the S3 server's 2 s shutdown; a few seconds on an idle machine




def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> dict[int, str]:
    """Every process under `pid` (pid -> command line), read from /proc."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = {}, [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def wait_gone(processes: dict[int, str], timeout: float) -> tuple[dict[int, str], float]:
    """(the processes still alive after `timeout`, seconds until the last one was gone)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if not any(alive(pid) for pid in processes):
            return {}, time.monotonic() - started
        time.sleep(0.1)
    return {pid: command for pid, command in processes.items() if alive(pid)}, timeout


def events(out: Path) -> list[dict]:
    """The run's events.jsonl as far as it is written (a line being appended is not one yet)."""
    path = out / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def wait_for(predicate, process: subprocess.Popen, log: Path, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert process.poll() is None, f"exited {process.returncode} too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    return value


@pytest.fixture
def started():
    """Processes a test started; whatever is left of them (and of the trees under them) is killed after it."""
    processes: dict[int, str] = {}
    yield processes
    for pid in processes:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_sigkilled_ttrv_run_takes_its_trainer_store_and_service_with_it(tmp_path, started, fault_summary):
    """`ttrv run` with the rollout service and the embedded S3 store, SIGKILLed after step 1: the trainer gets
    SIGTERM, checkpoints into the store (still up for it) and exits 143; then the store and the service stop."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SERVICE_SPEC))
    out, log = tmp_path / "out", tmp_path / "run.log"
    with log.open("wb") as handle:
        run = subprocess.Popen([sys.executable, "-m", "ttrv.cli", "run", str(tmp_path / "spec.yaml"), "--out",
                                str(out)], env=ENV, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    started[run.pid] = "ttrv run"
    wait_for(lambda: events(out), run, log)
    tree = descendants(run.pid)
    started.update(tree)
    for kind in ("-m ttrv.train", "weed mini", "ttrv.cli serve"):
        assert any(kind in command for command in tree.values()), (kind, tree)

    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(timeout=30) == -signal.SIGKILL
    left, seconds = wait_gone(tree, GONE_SECONDS)
    assert left == {}, f"outlived the SIGKILLed ttrv run: {left}"
    fault_summary.append(f"ttrv run SIGKILLed: its {len(tree)} processes gone in {seconds:.1f} s")

    failed = log_events(log, "trainer_failed")
    assert [(e["exit_code"], "checkpoint written" in e["error"]) for e in failed] == [(143, True)], failed
    assert log_events(log, "sigterm_received")
    # The wrappers of the S3 server and of the service log into those services' own logs.
    stops = [line for path in (out / "s3" / "weed.log", out / "rollout.log") for line in path.read_text().splitlines()
             if '"run_lock_free"' in line]
    assert len(stops) == 2, "the store and the service did not wait for the trainer's lock"
    # The store stops after the service that reads it: the service is not left retrying a store that is gone.
    assert '"service_still_stopping"' not in (out / "rollout.log").read_text()


def test_kill_and_run_again_resumes_and_ends_as_an_uninterrupted_run(tmp_path, started):
    """The README's promise: `ttrv run` SIGKILLed and run again with the same command continues from its last
    checkpoint and writes the report of an uninterrupted run. While the killed run's trainer is still checkpointing
    (held here with SIGSTOP), and before that while the whole run is alive, the same command is refused, names the
    holder and writes nothing."""
    spec = SPEC | {"name": "again", "eval": {"before": True, "after": True, "limit": 16, "majVotes": 4},
                   "storage": {"checkpointEvery": 2}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "ttrv.cli", "run", str(tmp_path / "spec.yaml"), "--out", str(out)]

    def run_to_end(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(command(out), env=ENV, capture_output=True, text=True, timeout=900)

    reference = run_to_end(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]

    out, log = tmp_path / "out", tmp_path / "killed.log"
    with log.open("wb") as handle:
        first = subprocess.Popen(command(out), env=ENV, stdout=handle, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    started[first.pid] = "ttrv run"
    wait_for(lambda: len(events(out)) >= 2, first, log)
    tree = descendants(first.pid)
    started.update(tree)
    # Processes the trainer forks (compile or tokenizer workers) share its command line: the trainer is the first.
    (trainer,) = [pid for pid, command_line in tree.items()
                  if "-m ttrv.train" in command_line and "-m ttrv.train" not in tree.get(parent_of(pid), "")]
    os.kill(trainer, signal.SIGSTOP)  # mid-run, for as long as the test needs; it checkpoints once continued

    spec_written = (out / "run.yaml").stat().st_mtime_ns
    second = run_to_end(out)
    assert second.returncode == 1
    assert f"error: --out {out}: in use by another run (pid {first.pid})" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert (out / ".lock").read_text() == f"{first.pid}\n" and (out / "run.yaml").stat().st_mtime_ns == spec_written

    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    before = snapshot(out)
    third = run_to_end(out)
    assert third.returncode == 1
    assert f"the run of pid {first.pid} has ended, but its processes (pids {trainer})" in third.stderr, third.stderr
    assert snapshot(out) == before, "the refused run wrote into the folder"
    os.kill(trainer, signal.SIGCONT)
    left, _ = wait_gone({trainer: "trainer"}, GONE_SECONDS)
    assert left == {}, "the trainer outlived its SIGKILLed ttrv run"
    (failed,) = log_events(log, "trainer_failed")
    assert failed["exit_code"] == 143 and "checkpoint written" in failed["error"], failed
    checkpoint = int(failed["error"].split("after step ")[1].split(";")[0])

    again = run_to_end(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [e["step"] for e in log_events_text(again.stderr, "resumed")] == [checkpoint]
    resumed = json.loads((out / "report.json").read_text())
    expected = json.loads((tmp_path / "reference" / "report.json").read_text())
    assert resumed["attempts"] == expected["attempts"] + 1
    for report, folder in ((resumed, out), (expected, tmp_path / "reference")):
        assert report["spec"]["storage"].pop("uri") == f"file://{folder / 'store'}"  # each run's own store
    timing = ("attempts", "adapt_seconds", "wall_seconds")
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in expected.items()
                                                                     if k not in timing}
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in events(out)] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in events(tmp_path / "reference")]


def log_events_text(text: str, name: str) -> list[dict]:
    return [json.loads(line[line.index("{"):]) for line in text.splitlines() if f'"event": "{name}"' in line]


def test_a_sigkilled_local_experiment_takes_its_pods_and_store_with_it(tmp_path, started, fault_summary):
    """`ttrv experiment run --local` with a rollout Deployment, SIGKILLed while its trainer trains: a second one on
    the same folder is refused while it runs; after the kill the trainer pod (torch elastic's launcher and its
    worker) checkpoints and exits, then the rollout pod and the S3 server stop."""
    document = experiment("lifetime", [{"name": "shapes", "path": SHAPES, "subsetSize": 16, "subsetSeed": 1}],
                          maxParallelRuns=1)
    document["spec"]["rollout"] |= {"backend": "service", "engine": "hf"}
    (tmp_path / "experiment.yaml").write_text(yaml.safe_dump(document))
    out, log = tmp_path / "out", tmp_path / "experiment.log"
    command = [sys.executable, "-m", "ttrv.cli", "experiment", "run", str(tmp_path / "experiment.yaml"), "--local",
               "--out", str(out)]
    with log.open("wb") as handle:
        run = subprocess.Popen(command, env=ENV, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    started[run.pid] = "ttrv experiment run"
    master = out / "lifetime-shapes" / "lifetime-shapes-trainer-master-0"
    wait_for(lambda: events(master / "tmp" / "ttrv-out"), run, log)  # the pod's TTRV_OUT, in its /tmp emptyDir
    tree = descendants(run.pid)
    started.update(tree)
    for kind in ("-m ttrv.train", "ttrv.cli train", "weed mini", "ttrv.cli serve"):
        assert any(kind in command_line for command_line in tree.values()), (kind, tree)
    # The worker is torch elastic's child; processes it forks (compile or tokenizer workers) share its command line.
    launcher = next(pid for pid, command_line in tree.items() if "ttrv.cli train" in command_line)
    (worker,) = [pid for pid, command_line in descendants(launcher).items()
                 if "-m ttrv.train" in command_line and parent_of(pid) == launcher]
    os.kill(worker, signal.SIGSTOP)  # mid-run for as long as the test needs (a tiny run is over in seconds)

    second = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1
    assert f"error: --out {out}: in use by another run (pid {run.pid})" in second.stderr, second.stderr

    os.kill(run.pid, signal.SIGKILL)
    assert run.wait(timeout=30) == -signal.SIGKILL
    os.kill(worker, signal.SIGCONT)
    left, seconds = wait_gone(tree, GONE_SECONDS)
    assert left == {}, f"outlived the SIGKILLed experiment: {left}"
    fault_summary.append(f"ttrv experiment run --local SIGKILLed: its {len(tree)} processes gone in {seconds:.1f} s")
    master_log = (master / "log").read_text()
    assert '"sigterm_received"' in master_log
