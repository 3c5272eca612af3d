"""Logs for people at a terminal, JSON everywhere else; secrets redacted in both."""

import json
import os
import pty
import subprocess
import sys

SNIPPET = ("from ttrv import log; log.configure(); "
           "log.get_logger('ttrv.demo').warning('store_slow', attempt=2, secret_key='hunter22')")


def run_logging(stderr_is_tty: bool, **env) -> str:
    environ = os.environ | env
    if not stderr_is_tty:
        return subprocess.run([sys.executable, "-c", SNIPPET], env=environ, capture_output=True, text=True,
                              timeout=60, check=True).stderr
    leader, follower = pty.openpty()
    try:
        subprocess.run([sys.executable, "-c", SNIPPET], env=environ, stderr=follower, timeout=60, check=True)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(leader)


def test_a_pipe_gets_one_json_object_per_line():
    [line] = run_logging(False).splitlines()
    event = json.loads(line)
    assert (event["event"], event["level"], event["attempt"], event["secret_key"]) == ("store_slow", "warning", 2, "***")


def test_a_terminal_gets_lines_for_people():
    text = run_logging(True)
    assert "store_slow" in text and "attempt" in text and "hunter22" not in text and "***" in text
    assert not text.lstrip().startswith("{")


def test_the_format_can_be_chosen():
    assert run_logging(True, TTRV_LOG_FORMAT="json").strip().startswith("{")
    assert not run_logging(False, TTRV_LOG_FORMAT="console").strip().startswith("{")
