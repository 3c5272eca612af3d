"""The trainer's metrics endpoint is auxiliary: a port it cannot bind is a warning, never a failed run."""

import json
import socket
import urllib.request

from ttrv.metrics import TrainerMetrics
from ttrv.net import free_port


def warnings_of(stream) -> list[dict]:
    return [event for event in map(json.loads, stream.getvalue().splitlines()) if event["level"] == "warning"]


def test_a_taken_port_is_a_warning_and_training_goes_on(monkeypatch, log_stream):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        monkeypatch.setenv("TTRV_METRICS_PORT", str(taken.getsockname()[1]))
        metrics = TrainerMetrics.serve_from_env()
    assert metrics is not None  # still observes, so the loop needs no special case
    metrics.observe({"seconds": {"step": 1.0}, "sampled_tokens": 3, "reward": 0.5, "entropy": 0.1,
                     "weight_version": 1})
    [warning] = warnings_of(log_stream)
    assert warning["event"] == "metrics_not_served" and "in use" in warning["reason"]
    assert "TTRV_METRICS_PORT" in warning["fix"]


def test_a_malformed_port_is_a_warning(monkeypatch, log_stream):
    monkeypatch.setenv("TTRV_METRICS_PORT", "metrics")
    assert TrainerMetrics.serve_from_env() is None
    assert warnings_of(log_stream)[0]["event"] == "metrics_not_served"


def test_a_free_port_serves_the_metrics(monkeypatch):
    port = free_port()
    monkeypatch.setenv("TTRV_METRICS_PORT", str(port))
    metrics = TrainerMetrics.serve_from_env()
    metrics.weight_version.set(7)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    assert "ttrv_weight_version 7.0" in opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
