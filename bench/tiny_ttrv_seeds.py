"""TTRV on the tiny benchmark over several seeds: is the gain real or one seed's luck?

    python bench/tiny_ttrv_seeds.py [--seeds 0 1 2] [--spec examples/tiny.yaml]

Each seed changes the adaptation subset (data.subsetSeed), the vote sampling and the data order (seed); the test
and held-out splits stay the same. Prints each run and mean ± std of the greedy accuracy gains (labels are used
only to score, never by adaptation). Targets: test gain >= 0.15, held-out gain >= 0.10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

KEYS = ("base_accuracy", "final_accuracy", "base_maj_accuracy", "final_maj_accuracy", "heldout_base_accuracy",
        "heldout_final_accuracy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--spec", default="examples/tiny.yaml")
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    base_spec = yaml.safe_load(Path(args.spec).read_text())
    root = Path(args.out or tempfile.mkdtemp(prefix="ttrv-seeds-"))
    reports = []
    for seed in args.seeds:
        spec = base_spec | {"seed": seed, "data": base_spec["data"] | {"subsetSeed": seed}}
        folder = root / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
        subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(folder / "spec.yaml"), "--out",
                        str(folder / "out")], check=True, stderr=subprocess.DEVNULL)
        report = json.loads((folder / "out" / "report.json").read_text())
        reports.append(report)
        print(f"seed {seed}: " + "  ".join(f"{k}={report[k]:.3f}" for k in KEYS), flush=True)
    gains = {
        "test": [r["final_accuracy"] - r["base_accuracy"] for r in reports],
        "heldout": [r["heldout_final_accuracy"] - r["heldout_base_accuracy"] for r in reports],
        "maj": [r["final_maj_accuracy"] - r["base_maj_accuracy"] for r in reports],
    }
    for name, values in gains.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name}_gain={statistics.mean(values):.3f} ± {spread:.3f}  ({', '.join(f'{v:+.3f}' for v in values)})")
    print(f"runs in {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
