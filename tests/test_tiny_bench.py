"""The tiny benchmark's scripts: bench/tiny_ttrv_seeds.py prints every row of the README's table (on canned
report.json files, not real runs), bench/tiny_select.py chooses on the validation split only, and the frozen
examples hold the values its recorded selection chose."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seeds_bench = bench("tiny_ttrv_seeds")
select_bench = bench("tiny_select")

ROWS = ["base greedy (no training)", "base maj@32, ttrv's extraction (no training)",
        "base maj@32, reference's extraction (no training)",
        "letters-constrained decoding of the base (no training)", "TTRV, ttrv's reward: greedy",
        "TTRV, reference's reward: greedy", "TTRV, ttrv's reward: maj@32",
        "TTRV, reference's reward: maj@32 (reference's extraction)"]


def canned(root: Path) -> None:
    """Reports of two arms over seeds 0-2 and the baselines' rows, with values the table's means can be read from."""
    for arm, final in (("ttrv", 0.6), ("reference", 0.3)):
        for seed in range(3):
            report = {"base_accuracy": 0.4, "final_accuracy": final + 0.01 * seed, "base_maj_accuracy": 0.62,
                      "final_maj_accuracy": 0.58, "heldout_base_accuracy": 0.43,
                      "heldout_final_accuracy": final - 0.01 * seed, "maj_votes": 32}
            out = root / f"{arm}-seed{seed}" / "out"
            out.mkdir(parents=True)
            (out / "report.json").write_text(json.dumps(report))
    rows = [{"split": split, "seed": seed, "prompts": 400, "greedy": 0.4, "letters": 0.65 + 0.01 * (split == "heldout"),
             "maj@32": 0.61, "maj@32 reference": 0.41} for split in ("test", "heldout") for seed in range(3)]
    (root / "baselines.json").write_text(json.dumps(rows))


def test_seed_table_prints_every_row(tmp_path):
    canned(tmp_path)
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tiny_ttrv_seeds.py"), "--table", str(tmp_path)],
                            capture_output=True, text=True, check=True, timeout=60)
    lines = {line.split(" | ")[0].removeprefix("| "): line for line in result.stdout.splitlines()
             if line.startswith("| ")}
    for row in ROWS:
        assert row in lines, f"the table has no row {row!r}:\n{result.stdout}"
    assert lines["base greedy (no training)"] == "| base greedy (no training) | 0.400 ± 0.000 | 0.400 ± 0.000 |"
    assert lines["letters-constrained decoding of the base (no training)"].endswith("| 0.650 ± 0.000 | 0.660 ± 0.000 |")
    assert lines["TTRV, ttrv's reward: greedy"].endswith("| 0.610 ± 0.010 | 0.590 ± 0.010 |")
    assert lines["TTRV, reference's reward: greedy"].endswith("| 0.310 ± 0.010 | 0.290 ± 0.010 |")
    assert lines["TTRV, ttrv's reward: maj@32"].endswith("| 0.580 ± 0.000 | — |")  # no maj@N pass on held-out
    assert "ttrv_reward_test_gain=+0.210 ± 0.010" in result.stdout
    assert "ttrv_reward_heldout_gain=+0.160 ± 0.010" in result.stdout
    assert "reference_reward_test_gain=-0.090 ± 0.010" in result.stdout
    assert "target >= 0.15: met" in result.stdout


def test_seed_table_refuses_baselines_of_other_seeds(tmp_path):
    canned(tmp_path)
    rows = [r for r in json.loads((tmp_path / "baselines.json").read_text()) if r["seed"] != 2]
    (tmp_path / "baselines.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="baselines.json has seeds"):
        seeds_bench.table(*seeds_bench.load(tmp_path))


def test_selection_specs_read_validation_only():
    base = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    points = select_bench.grid_points()
    assert len(points) == 3  # the declared grid: 3 lr x 1 klCoef
    for reward in select_bench.REWARDS:
        for point in points:
            spec = select_bench.build_spec(base, reward, point, seed=0)
            assert spec["data"]["path"] == "ttrv://tiny-shapes/validation"
            assert spec["data"]["heldoutPath"] is None
            for key, value in point.items():
                section, field = key.split(".")
                assert spec[section][field] == value


@pytest.mark.parametrize("data", [{"path": "ttrv://tiny-shapes/test", "heldoutPath": None},
                                  {"path": "ttrv://tiny-shapes/heldout", "heldoutPath": None},
                                  {"path": "ttrv://tiny-shapes/validation", "heldoutPath": "ttrv://tiny-shapes/heldout"},
                                  {"path": "/data/test.jsonl", "heldoutPath": None}])
def test_selection_refuses_other_splits(data):
    with pytest.raises(select_bench.SelectionError, match="data\\.(path|heldoutPath)"):
        select_bench.check_validation_only({"data": data})


def test_selection_refuses_a_report_of_another_split():
    report = {"spec": {"data": {"path": "ttrv://tiny-shapes/test", "heldout_path": None}}, "heldout_prompts": 0}
    with pytest.raises(select_bench.SelectionError, match="refused"):
        select_bench.check_report(report)
    select_bench.check_report({"spec": {"data": {"path": "ttrv://tiny-shapes/validation", "heldout_path": None}},
                               "heldout_prompts": 0})


def test_selection_refuses_ttrv_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TTRV_SET", "data.path=ttrv://tiny-shapes/test")
    with pytest.raises(select_bench.SelectionError, match="TTRV_SET"):
        select_bench.run_one({"data": {"path": "ttrv://tiny-shapes/validation"}}, tmp_path)
    assert not (tmp_path / "spec.yaml").exists()  # refused before anything ran


def test_selection_takes_the_best_mean_and_the_earlier_point_on_a_tie():
    points = select_bench.grid_points()
    results = [{"reward": "ttrv", "point": p, "seed": 0, "validation_accuracy": a, "base_validation_accuracy": 0.4}
               for p, a in zip(points, [0.5, 0.6, 0.6], strict=True)]
    chosen = select_bench.select(results)
    assert chosen["ttrv"]["point"] == points[1] and chosen["ttrv"]["validation_accuracy"] == 0.6
    assert "reference" not in chosen


def frozen(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    return {key: spec[key.split(".")[0]][key.split(".")[1]] for key in select_bench.GRID}


def test_examples_hold_the_recorded_selection():
    """The frozen examples are what bench/tiny_select.py chose (its selection.json, kept in tests/data)."""
    recorded = json.loads((ROOT / "tests" / "data" / "tiny_selection.json").read_text())
    assert recorded["grid"] == select_bench.GRID and recorded["rewards"] == select_bench.REWARDS
    assert all(r["point"] in select_bench.grid_points() for r in recorded["results"])
    assert select_bench.select(recorded["results"]) == recorded["chosen"]
    assert frozen(ROOT / "examples" / "tiny.yaml") == recorded["chosen"]["ttrv"]["point"]
    assert frozen(ROOT / "examples" / "tiny-reference.yaml") == recorded["chosen"]["reference"]["point"]
    reference = yaml.safe_load((ROOT / "examples" / "tiny-reference.yaml").read_text())
    assert reference["reward"] == {"extractor": "reference", "entropyMode": "reference"}
    ttrv = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    # the two examples differ in the reward and the chosen values only
    for spec in (ttrv, reference):
        spec.pop("reward", None)
        for key in select_bench.GRID:
            spec[key.split(".")[0]].pop(key.split(".")[1])
    assert reference == ttrv | {"name": reference["name"]}
    assert os.path.basename(seeds_bench.ARMS["reference"]) == "tiny-reference.yaml"
