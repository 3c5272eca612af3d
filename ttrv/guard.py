"""Label-free stopping rules read from each step's votes: the collapse guard (stop and roll back to the last healthy
weight version when reward hacking ends in one degenerate answer), early stopping (stop once the votes stop
changing) and the run's budget (steps, device-hours). The loop (ttrv.loop) feeds them each step's metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from ttrv.spec import BudgetSpec, EarlyStopSpec, GuardSpec, RunSpec

# Why a run stopped before its last epoch: progress.json's `stopReason`, report.json's `stop_reason`, the
# AdaptationRun's status.stopReason (operators/runs.py reads these words).
EARLY_STOPPED = "EarlyStopped"
MAX_STEPS = "MaxStepsReached"
GPU_HOURS = "GpuHoursSpent"
COLLAPSED = "CollapseGuard"
STOP_REASONS = (EARLY_STOPPED, MAX_STEPS, GPU_HOURS, COLLAPSED)


@dataclass
class CollapseGuard:
    """Reward hacking in TTRV ends in one consistent degenerate answer (the reference's collapsed runs: response
    length 1-2 tokens, one answer everywhere). Label-free signals, averaged over the last `window` steps (a step of
    a few prompts is noisy): the window is collapsed when its mean vote entropy is at or below `entropyBelow` AND
    either one answer takes `dominantAnswerShare` of each step's votes on average, or responses shrank far below
    their first-step length. `patience` collapsed windows in a row fire the guard.

    The rollback target (`healthy_version`) is the version published just before the first step of the first
    collapsed window of the streak: a collapse sets in over the window's steps before their mean shows it (on
    tiny-shapes' validation split at lr 3e-3, the subset accuracy was already below the base's inside that window).
    Until a window collapses it follows the newest version."""

    spec: GuardSpec
    first_length: float | None = None
    streak: int = 0
    healthy_version: int | None = None  # the rollback target (None: the base weights)
    recent: list = field(default_factory=list)  # [version, entropy, dominant share, length] of the window's steps

    def observe(self, step_version: int, entropy: float, dominant_share: float, length: float,
                prompts: int) -> bool:
        if self.first_length is None:
            self.first_length = length
        self.recent = (self.recent + [[step_version, entropy, dominant_share, length]])[-self.spec.window:]
        if self.window_collapsed(prompts):
            self.streak += 1
            if self.streak == 1:
                self.healthy_version = (self.recent[0][0] - 1) or None
        else:
            self.streak = 0
            self.healthy_version = step_version
        return self.spec.enabled and self.streak >= self.spec.patience

    def window_collapsed(self, prompts: int) -> bool:
        count = len(self.recent)
        mean_entropy, mean_share, mean_length = (sum(r[i] for r in self.recent) / count for i in (1, 2, 3))
        one_answer = prompts > 1 and mean_share >= self.spec.dominant_answer_share
        shrunk = mean_length <= self.spec.length_ratio * self.first_length
        return mean_entropy <= self.spec.entropy_below and (one_answer or shrunk)

    def protected_versions(self) -> set[int]:
        """Versions that are or may become the rollback target: garbage collection must keep them."""
        versions = {self.healthy_version} | {r[0] - 1 for r in self.recent} | {r[0] for r in self.recent}
        return {v for v in versions if v}

    def state(self) -> dict:
        return {"first_length": self.first_length, "streak": self.streak, "healthy_version": self.healthy_version,
                "recent": self.recent}


# The step metric each early-stopping signal reads, and the direction in which it improves.
SIGNALS = {"entropy": ("entropy", -1.0), "majorityShare": ("majority_share", 1.0), "reward": ("reward", 1.0)}


@dataclass
class EarlyStop:
    """Stop once the signal, averaged over `window` steps, has not improved by `minDelta` on its best value for
    `patience` steps, and at least `minSteps` steps were taken. Label-free: the votes converge (agreement rises,
    vote entropy falls) and once they stop moving, further steps only sharpen the policy."""

    spec: EarlyStopSpec
    values: list[float] = field(default_factory=list)  # the signal of the last `window` steps
    best: float | None = None
    since_best: int = 0

    def observe(self, step: int, metrics: dict) -> bool:
        key, sign = SIGNALS[self.spec.signal]
        self.values = (self.values + [float(metrics[key])])[-self.spec.window:]
        if len(self.values) < self.spec.window:
            return False
        value = sign * sum(self.values) / len(self.values)
        if self.best is None or value > self.best + self.spec.min_delta:
            self.best, self.since_best = value, 0
        else:
            self.since_best += 1
        return self.spec.enabled and step >= self.spec.min_steps and self.since_best >= self.spec.patience

    def state(self) -> dict:
        return {"values": self.values, "best": self.best, "since_best": self.since_best}


def devices(spec: RunSpec) -> int:
    """Devices a run holds: its GPUs, or on CPU its processes (each one is a device-hour of the budget)."""
    r = spec.resources
    return r.nodes * (r.gpus_per_node or r.nproc_per_node)


def budget_spent(budget: BudgetSpec, step: int, adapt_seconds: float, device_count: int) -> str | None:
    """Which limit of the budget the run has reached after `step` steps and `adapt_seconds` of adaptation, if any."""
    if budget.max_steps is not None and step >= budget.max_steps:
        return MAX_STEPS
    if budget.gpu_hours is not None and adapt_seconds * device_count / 3600.0 >= budget.gpu_hours:
        return GPU_HOURS
    return None


def dominant_share(answers: list[list[str | None]]) -> float:
    """Share of all votes of the step taken by its single most common answer."""
    flat = [a for row in answers for a in row if a is not None]
    if not flat:
        return 0.0
    return max(flat.count(a) for a in set(flat)) / sum(len(row) for row in answers)


def majority_share(answers: list[list[str | None]]) -> float:
    """Mean over prompts of the share of a prompt's votes won by its majority answer (agreement within prompts)."""
    shares = []
    for row in answers:
        valid = [a for a in row if a is not None]
        shares.append(max(valid.count(a) for a in set(valid)) / len(row) if valid else 0.0)
    return sum(shares) / len(shares) if shares else 0.0
