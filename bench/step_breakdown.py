"""Where a trainer step's time goes: a few steps of the tiny benchmark through the real trainer entrypoint, and
the share of each step spent outside generation, forward/backward and weight sync.

    python bench/step_breakdown.py [--steps 12] [--backend inprocess]

Phases (seconds recorded by the trainer in events.jsonl for every step):
    rollout                      generation (the rollout engine)
    old_log_prob, ref_log_prob,  forward/backward work of the learner
    update
    publish, sync                weight sync: publish a version to the store, the engine loads it
    reward, collate, the rest    overhead: answer extraction, rewards, advantages, batching, metrics, progress

Last line: overhead_fraction=<overhead seconds / step seconds, summed over the steps after the first> (goal <= 0.05).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

WORK = ("rollout", "old_log_prob", "ref_log_prob", "update", "publish", "sync")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--votes", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ttrv-bench-") as tmp:
        folder = Path(tmp)
        spec = {
            "name": "breakdown",
            "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": args.steps * args.prompts_per_step},
            "rollout": {"votes": args.votes, "groupSize": args.votes // 2, "maxNewTokens": 4},
            "grpo": {"lr": 1e-4, "epochs": 1, "promptsPerStep": args.prompts_per_step, "microBatchSize": 64},
            "eval": {"before": False, "after": False},
            "storage": {"uri": f"file://{folder / 'store'}", "checkpointEvery": 0},
            "resources": {"gpusPerNode": 0},
        }
        (folder / "run.yaml").write_text(yaml.safe_dump(spec))
        env = os.environ | {"DS_ACCELERATOR": "cpu", "TTRV_LOG_LEVEL": "warning"}
        subprocess.run([sys.executable, "-m", "ttrv.train", "--spec", str(folder / "run.yaml"), "--out",
                        str(folder)], env=env, check=True, stderr=subprocess.DEVNULL)
        events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    steady = events[1:]  # the first step pays one-time costs (allocator warm-up, prompt encoding cache)
    totals: dict[str, float] = {}
    for event in steady:
        for phase, seconds in event["seconds"].items():
            totals[phase] = totals.get(phase, 0.0) + seconds
    step_total = totals.pop("step")
    overhead = step_total - sum(totals.get(phase, 0.0) for phase in WORK)
    print(f"{'phase':<14}{'seconds':>9}{'share':>8}   ({len(steady)} steps after the first)")
    for phase, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        kind = "work" if phase in WORK else "overhead"
        print(f"{phase:<14}{seconds:>9.3f}{seconds / step_total:>8.1%}   {kind}")
    print(f"{'untimed':<14}{overhead - sum(v for k, v in totals.items() if k not in WORK):>9.3f}"
          f"{(overhead - sum(v for k, v in totals.items() if k not in WORK)) / step_total:>8.1%}   overhead")
    print(f"{'step':<14}{step_total:>9.3f}{1:>8.1%}")
    print(f"overhead_fraction={overhead / step_total:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
