"""The collapse guard: label-free detection of the degenerate answer that reward hacking in TTRV ends in, so that
the loop (ttrv.loop) stops and rolls back to the last healthy weight version."""

from __future__ import annotations

from dataclasses import dataclass

from ttrv.spec import GuardSpec


@dataclass
class CollapseGuard:
    """Reward hacking in TTRV ends in one consistent degenerate answer (the reference's collapsed runs: response
    length 1-2 tokens, one answer everywhere). Label-free signals: a step is collapsed when its mean vote entropy
    is ~0 AND either one answer takes most votes across different prompts, or responses shrank far below their
    first-step length. `patience` collapsed steps in a row fire the guard."""

    spec: GuardSpec
    first_length: float | None = None
    streak: int = 0
    healthy_version: int | None = None  # last version published by a non-collapsed step (None: the base)

    def observe(self, step_version: int, entropy: float, dominant_share: float, length: float,
                prompts: int) -> bool:
        if self.first_length is None:
            self.first_length = length
        one_answer = prompts > 1 and dominant_share >= self.spec.dominant_answer_share
        shrunk = length <= self.spec.length_ratio * self.first_length
        collapsed = entropy <= self.spec.entropy_below and (one_answer or shrunk)
        if collapsed:
            self.streak += 1
        else:
            self.streak = 0
            self.healthy_version = step_version
        return self.spec.enabled and self.streak >= self.spec.patience


def dominant_share(answers: list[list[str | None]]) -> float:
    """Share of all votes of the step taken by its single most common answer."""
    flat = [a for row in answers for a in row if a is not None]
    if not flat:
        return 0.0
    return max(flat.count(a) for a in set(flat)) / sum(len(row) for row in answers)
