"""The run's report: `report.json` (numbers) and `report.png` (reward, vote entropy, response length and accuracy
per step, and where adapting stopped early and why), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ttrv.fsutil import atomic_write, strict_json


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(out: Path, report: dict, events: list[dict]) -> Path:
    atomic_write(out / "report.json", (strict_json(report, where=str(out / "report.json"), indent=2) + "\n").encode())
    atomic_write(out / "report.png", plot(report, events))
    return out / "report.json"


def stop_line(report: dict) -> tuple[int, str] | None:
    """Where adapting stopped before its last epoch and why (report.json's `stop_reason`), for the plot."""
    reason = report.get("stop_reason")
    if not reason:
        return None
    return report["steps"], f"{reason} at step {report['steps']}, {report.get('steps_saved', 0)} steps saved"


def plot(report: dict, events: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in events]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    series = [
        (axes[0, 0], "reward", "mean vote reward"),
        (axes[0, 1], "entropy", "mean normalised vote entropy"),
        (axes[1, 0], "response_length", "mean response length (tokens)"),
    ]
    for ax, key, title in series:
        ax.plot(steps, [e.get(key) for e in events], marker=".")
        if key == "response_length":
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    last = steps[-1] if steps else 1
    probes = [(0, report.get("subset_base_accuracy"))]
    probes += [(e["step"], e["subset_accuracy"]) for e in events if e.get("subset_accuracy") is not None]
    probes += [(last, report.get("subset_final_accuracy"))]
    probes = [(step, value) for step, value in probes if value is not None]
    if len(probes) > 1:
        ax.plot(*zip(*probes, strict=True), marker="o", label="greedy, adaptation subset")
    for key, label, style in [("accuracy", "greedy, test set", "-"), ("maj_accuracy", "maj@N, test set", "--"),
                              ("heldout_accuracy", "greedy, held-out", ":")]:
        base, final = report.get(f"base_{key}"), report.get(f"final_{key}")
        if key == "heldout_accuracy":
            base, final = report.get("heldout_base_accuracy"), report.get("heldout_final_accuracy")
        if base is not None and final is not None:
            ax.plot([0, last], [base, final], style, marker="s", label=label)
    ax.set_ylim(0, 1)
    stopped = stop_line(report)
    if stopped is not None:
        for axis in axes.flat:
            axis.axvline(stopped[0], color="tab:red", lw=1.0, ls="--", label=stopped[1])
    ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance (4 options)")
    ax.set_title("accuracy (labels used only here)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    title = str(report.get("name", "ttrv"))
    if report.get("base_accuracy") is not None and report.get("final_accuracy") is not None:
        title += f": test accuracy {report['base_accuracy']:.3f} -> {report['final_accuracy']:.3f}"
    if report.get("guard_fired_at"):
        title += f"  (collapse guard fired at step {report['guard_fired_at']})"
    elif stopped is not None:
        title += f"  ({stopped[1]})"
    fig.suptitle(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
