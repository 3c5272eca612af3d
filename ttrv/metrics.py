"""The trainer's Prometheus metrics (rank 0), served on TTRV_METRICS_PORT (the pod's `metrics` port, 9400)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


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
        port = int(os.environ.get("TTRV_METRICS_PORT", "0"))
        if not port:
            return None
        metrics = cls()
        start_http_server(port, registry=metrics.registry)
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
