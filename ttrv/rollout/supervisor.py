"""`ttrv serve` as a child process of this machine: what runs beside the trainer locally (`ttrv run`), in the tests
and the benches, where a cluster runs the rollout pod."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from ttrv.rollout.vllm_process import free_port


class ServeProcess:
    """`ttrv serve` as a child process of this machine, in a session of its own, always at the same address: what
    runs beside the trainer locally where a cluster runs the rollout pod. A restart comes back at the same URL, as a
    pod does behind its Service."""

    def __init__(self, spec_path: str | Path, log_path: str | Path, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.spec_path = Path(spec_path)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> ServeProcess:
        """Start it and wait until /health answers 200; raises RuntimeError with the log's tail otherwise."""
        command = [sys.executable, "-m", "ttrv.cli", "serve", "--spec", str(self.spec_path), "--port", str(self.port)]
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ttrv serve exited with code {self.process.returncode}; its log "
                                   f"({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"ttrv serve not healthy after {timeout:.0f} s; its log ({self.log_path}) ends "
                           f"with:\n{self.log_tail()}")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, decoded JSON answer) of one call."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def kill(self) -> None:
        """SIGKILL, as when a node fails: no handler runs. (With the vLLM engine its server, in a process group of
        its own, gets SIGTERM from the kernel and shuts down by itself.)"""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace: float = 60.0) -> int:
        """SIGTERM, as Kubernetes stops a pod, then SIGKILL after `grace` seconds; the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        with self.log_path.open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
