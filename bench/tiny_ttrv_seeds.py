"""The tiny benchmark over several seeds, every row side by side: is TTRV's gain real, and what is it against?

    python bench/tiny_ttrv_seeds.py [--seeds 0 1 2] [--jobs 2] [--out DIR]
    python bench/tiny_ttrv_seeds.py --table DIR      # print the table of finished runs again, running nothing
    python bench/tiny_ttrv_seeds.py --arms ttrv --out DIR; ... --arms reference --out DIR   # one arm at a time

For each seed, two real runs on the frozen configuration (hyper-parameters chosen on the validation split by
bench/tiny_select.py, never on test or held-out):
- TTRV with ttrv's reward: examples/tiny.yaml (choice extractor, -1 and no vote for an unreadable answer);
- TTRV with the reference's reward: examples/tiny-reference.yaml (the reference's extractor and entropy mode).
and, with no training, bench/tiny_baselines.py on the base model: greedy, maj@N (read by ttrv's extractor and by
the reference's) and letters-constrained decoding. Each seed changes the adaptation subset (data.subsetSeed), the
vote sampling and the data order (seed); the test and held-out splits stay the same. Labels only score.

Prints each run, then one table: a row per method, mean ± std over the seeds on test and on held-out (rows that
do not depend on the seed show ± 0.000), then the gains of both TTRV rows over base greedy.
Targets (README, bench table): test gain >= 0.15, held-out gain >= 0.10 for ttrv's reward.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"ttrv": ROOT / "examples" / "tiny.yaml", "reference": ROOT / "examples" / "tiny-reference.yaml"}
TARGETS = {"test": 0.15, "heldout": 0.10}


def run_spec(spec: dict, folder: Path) -> dict:
    """`ttrv run` of `spec` in `folder` (its store there, the spec as spec.yaml, the log as run.log); returns its
    report.json. TTRV_SET is not passed on: the spec as written, nothing else."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = spec | {"storage": (spec.get("storage") or {}) | {"uri": f"file://{folder / 'store'}"}}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "TTRV_SET"}
    with open(folder / "run.log", "w") as log:
        subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(folder / "spec.yaml"), "--out",
                        str(folder / "out")], check=True, stdout=log, stderr=log, cwd=ROOT, env=env)
    return json.loads((folder / "out" / "report.json").read_text())


def run_arm(spec_path: Path, seed: int, folder: Path) -> dict:
    base = yaml.safe_load(spec_path.read_text())
    return run_spec(base | {"seed": seed, "data": base["data"] | {"subsetSeed": seed}}, folder)


def run_baselines(seeds: list[int], out: Path) -> list[dict]:
    """bench/tiny_baselines.py's rows; a baselines.json already in --out that covers the seeds is reused (the rows
    depend only on the base model, the seeds and examples/tiny.yaml's rollout and eval settings)."""
    if out.exists() and {(r["split"], r["seed"]) for r in json.loads(out.read_text())} >= {
            (split, seed) for split in TARGETS for seed in seeds}:
        return json.loads(out.read_text())
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run([sys.executable, str(ROOT / "bench" / "tiny_baselines.py"), "--spec", str(ARMS["ttrv"]),
                        "--seeds", *map(str, seeds), "--json", str(out)], check=True, stdout=log, stderr=log)
    return json.loads(out.read_text())


def load(root: Path) -> tuple[dict[str, dict[int, dict]], list[dict]]:
    """The reports ({arm: {seed: report}}) and baseline rows of a finished --out folder."""
    reports: dict[str, dict[int, dict]] = {arm: {} for arm in ARMS}
    for path in sorted(root.glob("*-seed*/out/report.json")):
        arm, seed = path.parent.parent.name.rsplit("-seed", 1)
        if arm in reports:
            reports[arm][int(seed)] = json.loads(path.read_text())
    return reports, json.loads((root / "baselines.json").read_text())


def stat(values: list[float | None]) -> str:
    if not values or any(v is None for v in values):
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def table(reports: dict[str, dict[int, dict]], baselines: list[dict]) -> str:
    """The benchmark's table in Markdown: every row on test and held-out, mean ± std over the seeds."""
    seeds = sorted(set.intersection(*(set(r) for r in reports.values())))
    if not seeds:
        raise ValueError("no seed has a finished run of every arm")
    votes = next(iter(reports["ttrv"].values()))["maj_votes"]
    base = {split: [b for b in baselines if b["split"] == split and b["seed"] in seeds] for split in TARGETS}
    for split, rows in base.items():
        if sorted(b["seed"] for b in rows) != seeds:
            raise ValueError(f"baselines.json has seeds {sorted(b['seed'] for b in rows)} on {split}, the runs {seeds}")

    def both(column: str) -> tuple[str, str]:
        return stat([b[column] for b in base["test"]]), stat([b[column] for b in base["heldout"]])

    def adapted(arm: str, test_key: str, heldout_key: str | None) -> tuple[str, str]:
        runs = [reports[arm][s] for s in seeds]
        return stat([r[test_key] for r in runs]), stat([r[heldout_key] for r in runs]) if heldout_key else "—"

    rows = [
        ("base greedy (no training)", *both("greedy")),
        (f"base maj@{votes}, ttrv's extraction (no training)", *both(f"maj@{votes}")),
        (f"base maj@{votes}, reference's extraction (no training)", *both(f"maj@{votes} reference")),
        ("letters-constrained decoding of the base (no training)", *both("letters")),
        ("TTRV, ttrv's reward: greedy", *adapted("ttrv", "final_accuracy", "heldout_final_accuracy")),
        ("TTRV, reference's reward: greedy", *adapted("reference", "final_accuracy", "heldout_final_accuracy")),
        (f"TTRV, ttrv's reward: maj@{votes}", *adapted("ttrv", "final_maj_accuracy", None)),
        (f"TTRV, reference's reward: maj@{votes} (reference's extraction)",
         *adapted("reference", "final_maj_accuracy", None)),
    ]
    lines = [f"seeds {', '.join(map(str, seeds))}; mean ± std over seeds", "",
             "| method | test | held-out |", "| --- | --- | --- |"]
    lines += [f"| {name} | {test} | {heldout} |" for name, test, heldout in rows]
    lines.append("")
    for arm in ARMS:
        for split, key, base_key in (("test", "final_accuracy", "base_accuracy"),
                                     ("heldout", "heldout_final_accuracy", "heldout_base_accuracy")):
            gains = [reports[arm][s][key] - reports[arm][s][base_key] for s in seeds]
            spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
            line = (f"{arm}_reward_{split}_gain={statistics.mean(gains):+.3f} ± {spread:.3f}  "
                    f"({', '.join(f'{g:+.3f}' for g in gains)})")
            if arm == "ttrv":
                met = statistics.mean(gains) >= TARGETS[split]
                line += f"  target >= {TARGETS[split]:.2f}: {'met' if met else 'missed'}"
            lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS),
                        help="run only these TTRV rows (the table needs both: run the other into the same --out)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each is a process of its own)")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--table", default=None, metavar="DIR", help="print the table of a finished --out folder")
    args = parser.parse_args()
    if args.table:
        print(table(*load(Path(args.table))))
        return 0
    root = Path(args.out or tempfile.mkdtemp(prefix="ttrv-seeds-"))
    root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        baselines = pool.submit(run_baselines, args.seeds, root / "baselines.json")
        runs = {(arm, seed): pool.submit(run_arm, spec, seed, root / f"{arm}-seed{seed}")
                for seed in args.seeds for arm, spec in ARMS.items() if arm in args.arms}
        for (arm, seed), future in runs.items():
            report = future.result()
            print(f"{arm} seed {seed}: test {report['base_accuracy']:.4f} -> {report['final_accuracy']:.4f}, "
                  f"held-out {report['heldout_base_accuracy']:.4f} -> {report['heldout_final_accuracy']:.4f}, "
                  f"maj@{report['maj_votes']} test {report['base_maj_accuracy']:.4f} -> "
                  f"{report['final_maj_accuracy']:.4f}, {report['steps']} steps, {report['wall_seconds']:.0f} s",
                  flush=True)
        baselines.result()
    if set(args.arms) != set(ARMS):
        print(f"runs in {root}; run the other arm into it, then --table {root}")
        return 0
    print(table(*load(root)))
    print(f"runs in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
