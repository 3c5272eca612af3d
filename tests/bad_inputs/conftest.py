"""The catalogue's tally: each test parametrised with a `case` is one bad input, counted as rejected when all its
phases pass. The summary ends with `bad inputs rejected: X/Y (per kind ...)`. And `cli`: the `ttrv` command line
in this process."""

from __future__ import annotations

import pytest
import structlog

from ttrv.cli import main

_outcomes: dict[str, tuple[str, bool]] = {}
"""node id -> (kind, rejected as the contract says)."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    case = item.callspec.params.get("case") if hasattr(item, "callspec") else None
    if case is not None and (report.when == "call" or not report.passed):
        _, so_far = _outcomes.get(item.nodeid, (case.kind, True))
        _outcomes[item.nodeid] = (case.kind, so_far and report.passed)
    return report


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    kinds = sorted({kind for kind, _ in _outcomes.values()})
    counts = {kind: [ok for k, ok in _outcomes.values() if k == kind] for kind in kinds}
    detail = ", ".join(f"{kind} {sum(oks)}/{len(oks)}" for kind, oks in counts.items())
    rejected = sum(ok for _, ok in _outcomes.values())
    terminalreporter.write_line(f"bad inputs rejected: {rejected}/{len(_outcomes)} ({detail})")


@pytest.fixture
def cli(capsys):
    """`ttrv ARGS` in this process: (exit code, stdout, stderr). The CLI configures structlog for its own
    stderr; the configuration before the call is restored after it."""
    saved = structlog.get_config()

    def call(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield call
    structlog.configure(**saved)
