"""Servers as child processes of this machine, each in a session of its own (so that it and its children stop as one
process group): `ServeProcess`, `ttrv serve` beside the trainer where a cluster runs the rollout pod (`ttrv run`,
the tests, the benches), and the pieces it shares with `VLLMProcess`, vLLM's server beside `ttrv serve`: a free
port, the wait for /health, the group's stop and the log's tail (the tie to the parent's life is ttrv.lifetime's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from ttrv import lifetime
from ttrv.net import free_port
from ttrv.rollout.jsonhttp import healthy, request_json


def wait_healthy(process: subprocess.Popen, url: str, timeout: float, what: str, log_path: Path,
                 error: type[Exception] = RuntimeError, interval: float = 0.2) -> None:
    """Wait until the server at `url` answers GET /health with 200; `error` naming `what` and quoting its log's tail
    when it exits first or is not healthy within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"{what} exited with code {process.returncode} while starting; its log ({log_path}) ends "
                        f"with:\n{log_tail(log_path)}")
        if healthy(url):
            return
        time.sleep(interval)
    raise error(f"{what} not healthy after {timeout:.0f} s; its log ({log_path}) ends with:\n{log_tail(log_path)}")


def stop_group(process: subprocess.Popen, grace: float, kill_wait: float = 10.0) -> int:
    """Stop the process's whole group (the process leads it: started with start_new_session): SIGTERM, then SIGKILL
    after `grace` seconds, as Kubernetes stops a pod; the process's exit code. The group may outlive its leader
    (vLLM's engine core and workers), so it is the group that is waited for."""
    group = process.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(group):
            process.poll()  # reaps the leader: a zombie would keep the group alive
            time.sleep(0.2)
        if not group_alive(group):
            break
    return process.wait(timeout=10)


def group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def log_tail(log_path: Path | None, lines: int = 40) -> str:
    if log_path is None or not log_path.exists():
        return "(no log)"
    with log_path.open(errors="replace") as handle:
        return "".join(deque(handle, maxlen=lines))


class ServeProcess:
    """`ttrv serve` as a child process of this machine, in a session of its own, always at the same address: what
    runs beside the trainer locally where a cluster runs the rollout pod. A restart comes back at the same URL, as a
    pod does behind its Service."""

    def __init__(self, spec_path: str | Path, log_path: str | Path, port: int | None = None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.spec_path = Path(spec_path)
        self.args = tuple(args)
        """More of `ttrv serve`'s arguments (`--shared runs.yaml`: an experiment's shared service)."""
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> ServeProcess:
        """Start it and wait until /health answers 200; raises RuntimeError with the log's tail otherwise."""
        command = [sys.executable, "-m", "ttrv.cli", "serve", "--spec", str(self.spec_path), "--port", str(self.port),
                   *self.args]
        with self.log_path.open("ab") as log_file:
            self.process = lifetime.start(command, serves=self.env.get(lifetime.RUN_LOCK_ENV), env=self.env,
                                          stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        wait_healthy(self.process, self.url, timeout, "ttrv serve", self.log_path)
        return self

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, decoded JSON answer) of one call."""
        return request_json(self.url, method, path, body, timeout=600)

    def kill(self) -> None:
        """SIGKILL, as when a node fails: no handler runs. (With the vLLM engine its server, in a process group of
        its own, gets SIGTERM from the kernel and shuts down by itself.)"""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace: float = 60.0) -> int:
        """SIGTERM, as Kubernetes stops a pod, then SIGKILL after `grace` seconds; the exit code."""
        if self.process is None:
            return 0
        return stop_group(self.process, grace)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)
