"""bench/gpu_smoke.py --cpu-dry-run: the GPU smoke script runs every part a CPU can, with the same code at small
sizes, and writes its JSON, so that the script cannot rot before a GPU runs it (docs/gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from k8s_util import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import gpu_smoke  # noqa: E402

# Parts that fail on CPU today for a known reason, with the error they must fail with (any other error fails the
# test); once the cause is fixed they pass, and the entry goes.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.mark.timeout(1200)
def test_the_cpu_dry_run_runs_every_part_and_writes_its_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # About 1.5 minutes of CPU; the time limit is generous because this machine's 2 cores are often shared.
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--cpu-dry-run", "--out",
                             str(tmp_path), "--time-limit", "1100"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1150)
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    parts = report["parts"]
    assert report["mode"] == "cpu"
    assert list(parts) == [name for name, _ in gpu_smoke.PARTS], parts.keys()
    for name, part in parts.items():
        assert part["status"] in ("ok", "skip", "fail"), (name, part)
        if part["status"] == "fail":
            assert name in KNOWN_FAILURES and KNOWN_FAILURES[name] in part["error"], (name, part["error"])
    assert parts["learner[flash_attention_2]"] == {"status": "skip", "reason": "flash-attn needs a CUDA GPU",
                                                   "seconds": parts["learner[flash_attention_2]"]["seconds"]}
    assert parts["load[straight-to-gpu]"]["reason"] == "needs a GPU: on CPU the device is host memory"
    skipped = {name for name, part in parts.items() if part["status"] == "skip"}
    assert skipped == {"learner[flash_attention_2]", "load[straight-to-gpu]"}  # everything else runs on a CPU
    memory = parts["learner[token-budget+offload-ref]"]
    assert memory["micro_batches"] >= 2 and memory["offload_reference"] is True

    versions = parts["versions"]
    assert versions["deepspeed"] and versions["torch"] and versions["deepspeed_accelerator"] == "cpu"
    for name in ("deepspeed[zero2]", "deepspeed[zero3]", "learner[sdpa]", "learner[sdpa+checkpointing]",
                 "learner[token-budget+offload-ref]"):
        assert parts[name]["plan_gib"] > 0 and parts[name]["loss"] == parts[name]["loss"]  # a number, not NaN
    load = gpu_smoke.LOAD["cpu"]
    assert parts["serve"]["samples"] == load["concurrent"] * load["n"]
    assert parts["publish[full]"]["served_version"] == 1 and parts["publish[lora]"]["served_version"] == 1
    assert parts["ttrv-run"]["steps"] == 3
    # the table names every part; the exit code says whether one failed
    for name in parts:
        assert name in result.stdout
    assert result.returncode == (1 if report["failed"] else 0)


def test_a_failing_part_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """A part that raises is a failure with its error in the JSON and exit code 1; a Skip is a skip."""
    def broken(ctx):
        raise RuntimeError("broken on purpose")

    def skipped(ctx):
        raise gpu_smoke.Skip("not here")

    monkeypatch.setattr(gpu_smoke, "PARTS", [("broken", broken), ("skipped", skipped),
                                             ("fine", lambda ctx: {"value": 1})])
    monkeypatch.setattr(gpu_smoke, "build_models", lambda work, sizes, gpu: {"wide": work, "served": work})
    code = gpu_smoke.main(["--cpu-dry-run", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert code == 1 and report["failed"] == ["broken"]
    assert "broken on purpose" in report["parts"]["broken"]["error"]
    assert report["parts"]["skipped"]["status"] == "skip" and report["parts"]["skipped"]["reason"] == "not here"
    assert report["parts"]["fine"] | {"seconds": 0} == {"status": "ok", "value": 1, "seconds": 0}
    assert "broken on purpose" in capsys.readouterr().out
