"""A run folder or a file:// store that cannot be used is named before any work, with what to do, never with a
traceback (`ttrv run`, `ttrv experiment run --local`). A folder held by another run is refused too:
tests/faults/test_parent_death.py, with real runs holding it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("command", ["run", "experiment"])
def test_an_out_that_is_a_file_is_named(cli, tmp_path, command):
    (tmp_path / "taken").write_text("a file")
    argv = (["run", str(EXAMPLES / "tiny.yaml")] if command == "run" else
            ["experiment", "run", str(EXAMPLES / "experiment-tiny-shapes.yaml"), "--local"])
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        code, _, err = cli(*argv, "--out", str(out))
        assert code == 1
        assert f"error: --out {out}: " in err and "Traceback" not in err, err
    assert (tmp_path / "taken").read_text() == "a file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["taken"]


def test_a_file_store_that_cannot_be_written_is_named_before_the_model_loads(cli, tmp_path):
    (tmp_path / "taken").write_text("a file")
    spec = yaml.safe_load((EXAMPLES / "tiny.yaml").read_text())
    spec["storage"]["uri"] = f"file://{tmp_path / 'taken' / 'store'}"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    code, _, err = cli("run", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"))
    assert code == 1
    assert f"error: storage.uri {tmp_path / 'taken' / 'store'}: not writable" in err, err
    assert not (tmp_path / "out" / "run.yaml").exists()  # nothing started
