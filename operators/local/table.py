"""The table `ttrv experiment run --local` prints at the end: what `kubectl get` would show of its objects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from operators.conditions import human_duration, parse_time
from ttrv.crds import adaptation_run_crd, experiment_crd


def status_table(document: Mapping, now: datetime | None = None) -> str:
    """`kubectl get experiments` and `kubectl get adaptationruns -o wide` of a status document (the CRDs' own
    printer columns), then why each failed run failed."""
    now = now or datetime.now(timezone.utc)
    lines = [_table([document["experiment"]], experiment_crd(), now), "", _table(document["runs"], adaptation_run_crd(), now)]
    for run in document["runs"]:
        if run["status"].get("phase") == "Failed":
            lines += ["", f"{run['metadata']['name']} failed: {run['status'].get('message', '')}".rstrip()]
    return "\n".join(lines)


def _table(items: Sequence[Mapping], crd: Mapping, now: datetime) -> str:
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    rows = [["NAME", *(column["name"].upper() for column in columns)]]
    rows += [[item["metadata"]["name"], *(_cell(item, column, now) for column in columns)] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _cell(item: Mapping, column: Mapping, now: datetime) -> str:
    value = item
    for key in column["jsonPath"].strip(".").split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if column["type"] == "date":
        return human_duration((now - parse_time(value)).total_seconds())
    return f"{value:g}" if isinstance(value, float) else str(value)
