"""Label-free early stopping (grpo.earlyStop) against fixed epochs, over several seeds (issue 19).

    python bench/early_stop.py [--seeds 0 1 2] [--spec examples/tiny.yaml] [--out DIR] [--set KEY=VALUE ...]
    python bench/early_stop.py --replay RUN_DIR [RUN_DIR ...] [--early KEY=VALUE ...]

Run mode: for each seed, two real runs of the spec (data.subsetSeed = seed, as bench/tiny_ttrv_seeds.py): fixed
epochs (grpo.earlyStop.enabled=false) and early stopping (enabled, with the settings below or --early overrides).
Prints, per seed, the steps and the greedy accuracy on test and held-out of both, then

    steps_saved_fraction   mean over seeds of 1 - early steps / fixed steps
    accuracy_delta         mean over seeds of held-out accuracy, early stopping minus fixed epochs
    test_accuracy_delta    the same on the test split

and whether the issue's goal is met (>= 30 % fewer steps, held-out accuracy within 0.01).

Replay mode chooses the settings: it applies the rule to the events.jsonl of finished fixed-epoch runs, which is
exact for the stop step (a stopped run is its fixed run's prefix: votes are seeded by (seed, step) and the
learning-rate schedule spans the epochs either way) and reads the adaptation-subset accuracy at the last probe
(`eval.every`) at or before the stop. Run it on runs of the *validation* split (ttrv://tiny-shapes/validation),
never on test or held-out: the settings below were chosen that way (README, "Early stopping").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ttrv.guard import EarlyStop  # noqa: E402
from ttrv.spec import EarlyStopSpec  # noqa: E402

# The rule's settings this bench measures by default: chosen on validation runs with --replay (README).
EARLY = {"signal": "majorityShare", "window": 4, "minDelta": 0.02, "patience": 4, "minSteps": 13}


def run(spec: Path, out: Path, sets: list[str]) -> dict:
    command = [sys.executable, "-m", "ttrv.cli", "run", str(spec), "--out", str(out)]
    for item in sets:
        command += ["--set", item]
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=ROOT)
    return json.loads((out / "report.json").read_text())


def compare(args: argparse.Namespace, early: dict) -> int:
    root = Path(args.out or tempfile.mkdtemp(prefix="ttrv-early-stop-"))
    spec = Path(args.spec).resolve()
    early_sets = ["grpo.earlyStop.enabled=true", *(f"grpo.earlyStop.{k}={v}" for k, v in early.items())]

    def arm(seed: int, name: str, sets: list[str]) -> dict:
        return run(spec, root / f"seed{seed}-{name}", [*args.set, f"seed={seed}", f"data.subsetSeed={seed}", *sets,
                                                       f"storage.uri=file://{root}/seed{seed}-{name}/store"])

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is a process of its own
        fixed_runs = {seed: pool.submit(arm, seed, "fixed", ["grpo.earlyStop.enabled=false"]) for seed in args.seeds}
        early_runs = {seed: pool.submit(arm, seed, "early", early_sets) for seed in args.seeds}
        rows = [(seed, fixed_runs[seed].result(), early_runs[seed].result()) for seed in args.seeds]
    for seed, fixed, stopped in rows:
        print(f"seed {seed}: fixed steps={fixed['steps']} test={fixed['final_accuracy']:.4f} "
              f"heldout={fixed['heldout_final_accuracy']:.4f} | early steps={stopped['steps']} "
              f"({stopped['stop_reason'] or 'ran all epochs'}) test={stopped['final_accuracy']:.4f} "
              f"heldout={stopped['heldout_final_accuracy']:.4f} | base test={fixed['base_accuracy']:.4f} "
              f"heldout={fixed['heldout_base_accuracy']:.4f}", flush=True)
    saved = statistics.mean(1 - s["steps"] / f["steps"] for _, f, s in rows)
    delta = statistics.mean(s["heldout_final_accuracy"] - f["heldout_final_accuracy"] for _, f, s in rows)
    test_delta = statistics.mean(s["final_accuracy"] - f["final_accuracy"] for _, f, s in rows)
    print(f"early stopping: {json.dumps(early)}")
    print(f"steps_saved_fraction={saved:.3f}")
    print(f"accuracy_delta={delta:+.4f}")
    print(f"test_accuracy_delta={test_delta:+.4f}")
    print(f"goal (>= 0.30 fewer steps, held-out within 0.01): {'met' if saved >= 0.30 and delta >= -0.01 else 'missed'}")
    print(f"runs in {root}")
    return 0


def replay_one(events: list[dict], report: dict, spec: EarlyStopSpec) -> tuple[int, int, float | None, float | None]:
    """(stop step, steps of the run, subset accuracy at the last probe at or before the stop, at the end)."""
    rule = EarlyStop(spec.model_copy(update={"enabled": True}))
    total = len(events)
    stop = next((e["step"] for e in events if rule.observe(e["step"], e)), total)
    probes = [(0, report.get("subset_base_accuracy"))] + \
        [(e["step"], e["subset_accuracy"]) for e in events if e.get("subset_accuracy") is not None]
    at_stop = [a for step, a in probes if step <= stop and a is not None]
    final = report.get("subset_final_accuracy")
    return stop, total, (at_stop[-1] if at_stop else None) if stop < total else final, final


def replay(args: argparse.Namespace, early: dict) -> int:
    spec = EarlyStopSpec.model_validate(early)
    saved, deltas = [], []
    for folder in map(Path, args.replay):
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines() if line.strip()]
        report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").exists() else {}
        missing = [e["step"] for e in events if spec.signal == "majorityShare" and "majority_share" not in e]
        if missing:
            raise SystemExit(f"{folder}: steps {missing[:3]}... have no majority_share; choose another signal")
        stop, total, at_stop, final = replay_one(events, report, spec)
        saved.append(1 - stop / total)
        if at_stop is not None and final is not None:
            deltas.append(at_stop - final)
        print(f"{folder}: stops at step {stop} of {total}; subset accuracy there {at_stop}, at the end {final}")
    print(f"early stopping: {json.dumps(early)}")
    print(f"steps_saved_fraction={statistics.mean(saved):.3f}")
    if deltas:
        print(f"subset_accuracy_delta={statistics.mean(deltas):+.4f}  (probe at or before the stop minus the end)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--spec", default="examples/tiny.yaml")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the spec in both arms (e.g. grpo.epochs=1 for a quick check)")
    parser.add_argument("--early", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of grpo.earlyStop (signal, window, minDelta, patience, minSteps)")
    parser.add_argument("--replay", nargs="+", metavar="RUN_DIR", help="replay the rule on finished runs' events")
    args = parser.parse_args()
    early = dict(EARLY)
    for item in args.early:
        key, sep, value = item.partition("=")
        if not sep or key not in EARLY:
            parser.error(f"--early {item!r}: write KEY=VALUE with KEY one of {', '.join(EARLY)}")
        early[key] = yaml.safe_load(value)
    return replay(args, early) if args.replay else compare(args, early)


if __name__ == "__main__":
    raise SystemExit(main())
