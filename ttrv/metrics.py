"""The trainer's Prometheus metrics (rank 0), served on TTRV_METRICS_PORT (the pod's `metrics` port, 9400)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ttrv.log import get_logger

logger = get_logger(__name__)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.steps = Counter("ttrv_steps", "Adaptation steps done", registry=self.registry)
        self.phase_seconds = Gauge("ttrv_step_phase_seconds", "Seconds of the last step spent in each phase",
                                   ["phase"], registry=self.registry)
        self.tokens_per_second = Gauge("ttrv_sampled_tokens_per_second", "Sampled response tokens per second of "
                                       "the last step", registry=self.registry)
        self.reward = Gauge("ttrv_reward", "Mean vote reward of the last step", registry=self.registry)
        self.entropy = Gauge("ttrv_vote_entropy", "Mean normalised vote entropy of the last step",
                             registry=self.registry)
        self.weight_version = Gauge("ttrv_weight_version", "Latest published weight version", registry=self.registry)

    @classmethod
    def serve_from_env(cls) -> TrainerMetrics | None:
        """The metrics, served on TTRV_METRICS_PORT. Metrics are auxiliary: a port that is taken or malformed is a
        warning, never a failed training run (the run's progress still reaches the operator through the store)."""
        value = os.environ.get("TTRV_METRICS_PORT", "0")
        try:
            port = int(value)
        except ValueError:
            logger.warning("metrics_not_served", port=value, reason="TTRV_METRICS_PORT is not a port number",
                           fix="set TTRV_METRICS_PORT to a free port, or 0 for no metrics endpoint")
            return None
        if not port:
            return None
        metrics = cls()
        try:
            start_http_server(port, registry=metrics.registry)
        except (OSError, OverflowError) as error:
            logger.warning("metrics_not_served", port=port, reason=str(error),
                           fix="set TTRV_METRICS_PORT to a free port, or 0 for no metrics endpoint")
            return metrics  # still counted, so a scrape after a restart on a free port has nothing to miss
        return metrics

    def observe(self, record: dict) -> None:
        self.steps.inc()
        seconds = record["seconds"]
        for phase, value in seconds.items():
            self.phase_seconds.labels(phase).set(value)
        self.tokens_per_second.set(record["sampled_tokens"] / max(seconds["step"], 1e-9))
        self.reward.set(record["reward"])
        self.entropy.set(record["entropy"])
        self.weight_version.set(record["weight_version"])
