"""NaN and infinity in what ttrv writes: a metric that goes NaN (a step that diverged, an empty batch's mean) or
infinite must not make events.jsonl, progress.json, report.json, the checkpoint state or a log line unreadable to a
strict JSON reader (jq, Go, JavaScript; Python with `parse_constant`), nor end the run that writes it. Every writer
goes through `ttrv.fsutil.strict_json`: the value is written as null, and the writer says which field it was."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog

from ttrv import log
from ttrv.fsutil import strict_json
from ttrv.loop import RunState, _append_event, rewrite_events, write_progress
from ttrv.report import read_events, write_report

METRICS = {"reward": math.nan, "entropy": math.inf, "loss": -math.inf, "nested": {"kl": [0.5, math.nan]}}


def strict(text: str):
    """`text` as a strict reader reads it: NaN, Infinity and -Infinity are refused."""
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def logs():
    saved = structlog.get_config()
    stream = io.StringIO()
    log.configure(stream=stream)
    yield stream
    structlog.configure(**saved)


def test_events_jsonl_with_a_nan_metric_is_strict_json(tmp_path: Path, logs):
    events = tmp_path / "events.jsonl"
    _append_event(events, {"event": "step", "step": 1, **METRICS})
    for line in events.read_text().splitlines():
        record = strict(line)
        assert record["reward"] is None and record["entropy"] is None and record["nested"]["kl"] == [0.5, None]
    rewrite_events(events, read_events(events) + [{"event": "step", "step": 2, "reward": math.nan}])
    assert [strict(line)["step"] for line in events.read_text().splitlines()] == [1, 2]
    warning = [strict(line) for line in logs.getvalue().splitlines() if "non_finite_written_as_null" in line][0]
    assert warning["file"] == str(events) and "reward" in warning["fields"] and "nested.kl[1]" in warning["fields"]


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_progress_json_with_a_nan_metric_is_strict_json(store, logs):
    """write_progress is the trainer's own writer (what the operator polls), on both store backends."""
    ctx = SimpleNamespace(total_steps=4, store=store)
    state = RunState(step=1, before={"accuracy": math.nan})
    write_progress(ctx, state, "Adapting", **METRICS)
    raw = store._backend.get("progress.json").decode()
    document = strict(raw)
    assert document["baseAccuracy"] is None and document["reward"] is None and document["step"] == 1
    assert store.get_json("progress.json") == document


def test_report_and_log_lines_with_a_nan_metric_are_strict_json(tmp_path: Path, logs):
    path = write_report(tmp_path, {"accuracy": math.nan, "steps": 2}, [{"event": "step", "step": 1, **METRICS}])
    assert strict(path.read_text()) == {"accuracy": None, "steps": 2}
    log.get_logger("test").info("step_done", reward=math.nan, ok=1.5)
    line = [strict(line) for line in logs.getvalue().splitlines() if "step_done" in line][0]
    assert line["reward"] is None and line["ok"] == 1.5 and line["non_finite"] == ["reward"]


def test_strict_json_keeps_finite_documents_as_json_dumps_writes_them():
    document = {"a": [1, 2.5, "x", None, True], "b": {"c": -0.0}}
    assert strict_json(document, indent=1) == json.dumps(document, indent=1)
    with pytest.raises(TypeError):
        strict_json({"a": object()})
