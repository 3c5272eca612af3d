"""ttrv.lifetime with real processes: children that end with their parent, even a SIGKILLed one; the race of a parent
that died before its child asked to be told; children of a short-lived thread; a run's service that outlives the
run's process until the run's trainers, which hold the run lock, have finished; the lock refusing a second run.

Each parent here is a small Python program of its own (its death must not be pytest's); the runs themselves are in
tests/faults/test_parent_death.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ttrv import lifetime
from ttrv.lifetime import alive

PARENT_HEADER = ("import os, signal, subprocess, sys, threading, time\nfrom pathlib import Path\n"
                 "from ttrv import lifetime, log\nlog.configure()\n")




def wait_gone(pids, timeout: float) -> list[int]:
    """The pids still alive after `timeout` seconds (empty as soon as all are gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def parent(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A Python parent process running `code`, in a session of its own; it prints lines the test reads."""
    return subprocess.Popen([sys.executable, "-c", PARENT_HEADER + textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


@pytest.fixture
def reap():
    """Pids a test started through its parents; whatever is left of them is killed after the test."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_child_gets_sigterm_when_its_parent_is_sigkilled(reap):
    run = parent("""
        child = lifetime.start(['sleep', '300'], start_new_session=True)
        print(child.pid, flush=True)
        time.sleep(300)
    """)
    child = int(run.stdout.readline())
    reap.append(child)
    assert alive(child)
    run.kill()  # SIGKILL: no handler, no atexit of the parent runs
    run.wait()
    assert wait_gone([child], 10) == [], "the child outlived its SIGKILLed parent"


def test_a_child_started_from_a_thread_is_not_ended_by_the_thread_ending(reap):
    """PR_SET_PDEATHSIG fires when the *thread* that forked ends: a child of a short-lived thread would be killed
    at once, so such a child is not tied (and said so in the log)."""
    run = parent("""
        started = []
        thread = threading.Thread(target=lambda: started.append(lifetime.start(['sleep', '300'])))
        thread.start()
        thread.join()
        print(started[0].pid, flush=True)
        time.sleep(1.0)
        print('alive' if started[0].poll() is None else f'ended {started[0].returncode}', flush=True)
        started[0].kill()
    """)
    reap.append(int(run.stdout.readline()))
    assert run.stdout.readline().strip() == "alive"
    assert run.wait(timeout=30) == 0


def test_a_worker_whose_launcher_is_sigkilled_gets_sigterm(reap, tmp_path):
    """torch elastic starts its workers itself; a worker ties itself to the launcher named in TTRV_PARENT_PID."""
    run = parent("""
        os.environ[lifetime.PARENT_PID_ENV] = str(os.getpid())
        worker = subprocess.Popen([sys.executable, '-c',
            'import time; from ttrv import lifetime\\n'
            'assert lifetime.die_with_launcher()\\n'
            'import os; assert lifetime.PARENT_PID_ENV not in os.environ\\n'
            'print("tied", flush=True)\\n'
            'time.sleep(300)'], start_new_session=True, stdout=sys.stdout)
        print(worker.pid, flush=True)
        time.sleep(300)
    """)
    worker = int(run.stdout.readline())
    reap.append(worker)
    assert run.stdout.readline().strip() == "tied"
    run.kill()
    run.wait()
    assert wait_gone([worker], 10) == [], "the worker outlived its SIGKILLed launcher"


def test_a_worker_whose_launcher_died_before_it_asked_ends_itself(tmp_path):
    """The race: the launcher is gone before the worker's prctl (the kernel would never signal it, its parent is
    init now); die_with_launcher sees the parent changed and says so, and the trainer exits 143 before any work."""
    run = parent("""
        os.environ[lifetime.PARENT_PID_ENV] = str(os.getpid())
        subprocess.Popen([sys.executable, '-c',
            'import time; time.sleep(1.0); from ttrv import lifetime\\n'
            'print("tied" if lifetime.die_with_launcher() else "launcher gone", flush=True)'], stdout=sys.stdout)
    """)
    assert run.wait(timeout=30) == 0  # gone before the worker's second of start-up is over
    assert run.stdout.readline().strip() == "launcher gone"
    # The trainer's own answer to it: ttrv.train's main with a launcher pid that is not its parent.
    env = {**os.environ, lifetime.PARENT_PID_ENV: str(run.pid), "DS_ACCELERATOR": "cpu"}
    code = subprocess.run([sys.executable, "-m", "ttrv.train", "--spec", str(tmp_path / "never-read.yaml")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert code.returncode == 143, code.stderr[-2000:]
    assert '"launcher_gone"' in code.stderr


CHILD = """
import signal, sys, time
name, seconds, events = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def stop(*_):
    time.sleep(seconds)  # a trainer's checkpoint
    with open(events, "a") as log:
        log.write(f"{name} stopped\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(300)
"""


def test_the_services_outlive_their_killed_parent_until_the_trainer_released_the_lock(tmp_path, reap):
    """SIGKILL the run's process: the trainer (holding the lock) gets SIGTERM and takes 2 s to checkpoint; the
    service it uses (1 s to stop) and the store the service reads stay up until then, in that order, the folder
    stays locked until all are gone, and a new run meanwhile is refused with the pids named."""
    (tmp_path / "child.py").write_text(CHILD)
    events = tmp_path / "events"
    run = parent("""
        out, child, events = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
        lock = lifetime.RunLock(out).acquire()
        store = lifetime.start([sys.executable, child, 'store', '0', events], serves=lock.path, last=True,
                               start_new_session=True, stdout=sys.stdout)
        service = lifetime.start([sys.executable, child, 'service', '1', events], serves=lock.path,
                                 start_new_session=True, stdout=sys.stdout)
        trainer = lifetime.start([sys.executable, child, 'trainer', '2', events], holds=lock,
                                 start_new_session=True, stdout=sys.stdout)
        print(store.pid, service.pid, trainer.pid, flush=True)
        time.sleep(300)
    """, str(tmp_path / "out"), str(tmp_path / "child.py"), str(events))
    store, service, trainer = map(int, run.stdout.readline().split())
    reap += [store, service, trainer]
    assert [run.stdout.readline().strip() for _ in range(3)] == ["ready"] * 3
    run.kill()
    run.wait()
    time.sleep(0.5)  # the trainer is checkpointing now
    assert alive(store) and alive(service) and alive(trainer)
    with pytest.raises(lifetime.RunFolderError) as refused:
        lifetime.RunLock(tmp_path / "out").acquire()
    message = str(refused.value)
    assert f"the run of pid {run.pid} has ended" in message and str(trainer) in message, message
    assert wait_gone([store, service, trainer], 30) == []
    assert events.read_text().splitlines() == ["trainer stopped", "service stopped", "store stopped"]
    lifetime.RunLock(tmp_path / "out").acquire().release()  # free once all are gone


def test_a_second_lock_on_a_held_folder_is_refused_with_the_holders_pid(tmp_path):
    holder = parent("""
        lock = lifetime.RunLock(Path(sys.argv[1])).acquire()
        print('locked', flush=True)
        time.sleep(300)
    """, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = sorted((path.name, path.stat().st_mtime_ns) for path in tmp_path.iterdir())
        with pytest.raises(lifetime.RunFolderError, match=f"in use by another run \\(pid {holder.pid}\\)"):
            lifetime.RunLock(tmp_path).acquire()
        assert sorted((path.name, path.stat().st_mtime_ns) for path in tmp_path.iterdir()) == before
        assert (tmp_path / ".lock").read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()
    lifetime.RunLock(tmp_path).acquire().release()  # the kernel released it with the holder


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_run_folder_that_cannot_be_one_is_named(tmp_path, where):
    (tmp_path / "file").write_text("x")
    folder = tmp_path / "file" if where == "a file" else tmp_path / "file" / "out"
    with pytest.raises(lifetime.RunFolderError, match=f"--out {folder}: "):
        lifetime.RunLock(folder).acquire()
    assert (tmp_path / "file").read_text() == "x"

