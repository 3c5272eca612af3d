"""The operator's Prometheus metrics, served on TTRV_METRICS_PORT (the chart's metrics Service scrapes /metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "ttrv_operator_reconciles_total", "Reconciles of Experiments and AdaptationRuns, by outcome",
    ["kind", "result"])
RECONCILE_SECONDS = Histogram(
    "ttrv_operator_reconcile_duration_seconds", "Wall time of one reconcile: reads, decision, writes",
    ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
RESOURCES = Gauge(
    "ttrv_operator_resources", "Experiments and AdaptationRuns in the cluster, by phase", ["kind", "phase"])


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    """Counts one reconcile (ok, or error with the exception passed on) and observes its duration."""
    started = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        raise
    else:
        RECONCILES.labels(kind, "ok").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)


def set_phases(kind: str, phases: Mapping, known: tuple[str, ...]) -> None:
    """`phases`: a kopf index of the resources by phase; every known phase gets a value, zero included, so a
    phase that empties does not keep its last count."""
    for phase in known:
        RESOURCES.labels(kind, phase).set(len(phases.get(phase, ())))
