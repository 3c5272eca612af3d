"""The fault-injection suite: the reference run its cases compare against, and the `faults survived` table that
ends the test output (one row per case marked `fault`, with its outcome and wall time)."""

from __future__ import annotations

import pytest
from trainer_util import trainer, write_spec

_cases: dict[str, dict] = {}
_lines: list[str] = []


@pytest.fixture(scope="session")
def fault_summary() -> list[str]:
    """Lines a test adds to the summary at the end of the test output (figures worth reading when it passes)."""
    return _lines


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """trainer_util.SPEC run to the end without a fault, on the file:// store: what every faulted run of the same
    spec must end on."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    write_spec(folder)
    process = trainer(folder)
    assert process.wait(timeout=300) == 0, (folder / "trainer.log").read_text()[-3000:]
    return folder


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "fault" not in report.keywords:
        return
    case = _cases.setdefault(report.nodeid, {"outcome": "survived", "seconds": 0.0})
    if report.when == "call":
        case["seconds"] = report.duration  # the fault and the recovery; shared fixtures' setup is not the case's
    if report.skipped:
        case["outcome"] = "skipped"
    elif report.failed:
        case["outcome"] = "FAILED" if report.when == "call" else f"ERROR ({report.when})"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _cases and not _lines:
        return
    ran = {name: case for name, case in _cases.items() if case["outcome"] != "skipped"}
    survived = sum(case["outcome"] == "survived" for case in ran.values())
    write = terminalreporter.write_line
    terminalreporter.write_sep("=", "fault injection")
    names = {nodeid: nodeid.split("::")[-1].removeprefix("test_") for nodeid in _cases}
    width = max(map(len, names.values()), default=0)
    for nodeid, case in _cases.items():
        write(f"{names[nodeid]:<{width}}  {case['outcome']:<9} {case['seconds']:6.1f} s")
    if _cases:
        skipped = len(_cases) - len(ran)
        write(f"faults survived: {survived}/{len(ran)}" + (f" ({skipped} skipped)" if skipped else ""))
    for line in _lines:
        write(line)
