"""The rollout interface the trainer sees, and the one chat format every engine shares."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ttrv.data import Prompt


@dataclass(frozen=True)
class Sample:
    """One sampled response: its text, its token ids (what the trainer scores), and the sampler's log-probs of
    those tokens when the engine reports them."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None


class RolloutEngine(Protocol):
    """Samples responses from the current weight version."""

    weight_version: int | None
    """Step of the weight version being served (None: the base model)."""

    def generate(
        self, prompts: Sequence[Prompt], n: int, temperature: float, top_p: float, max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[Sample]]:
        """n samples for each prompt, in prompt order. temperature 0 means greedy (then n must be 1). With a seed,
        each prompt's samples depend only on (seed, prompt id): not on the other prompts of the call, nor on which
        trainer rank asks (`sample_seed`)."""
        ...

    def load_version(self, step: int) -> None:
        """Serve weight version `step` from the store before the next generate call."""
        ...

    def close(self) -> None: ...


def sample_seed(seed: int, prompt_id: str, index: int = 0) -> int:
    """A stable 63-bit seed for sample `index` of a prompt (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_id}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1
