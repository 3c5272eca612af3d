"""Evaluation with labels (never seen by adaptation): greedy pass@1 and maj@N.

pass@1: the greedy answer equals the label. maj@N: the majority of N sampled answers (unreadable ones are no
votes) equals the label; the votes are seeded by the run's seed, so before and after are compared on the same
random numbers. Both read answers with the same extractor the reward uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from ttrv.data import Example
from ttrv.reward import extract_answer, vote_stats
from ttrv.rollout.base import RolloutEngine
from ttrv.spec import RunSpec


def greedy_accuracy(engine: RolloutEngine, examples: Sequence[Example], spec: RunSpec) -> dict:
    max_tokens = spec.eval.max_new_tokens or spec.rollout.max_new_tokens
    outputs = engine.generate([e.prompt for e in examples], n=1, temperature=0.0, top_p=1.0,
                              max_new_tokens=max_tokens)
    answers = [extract_answer(o[0].text, spec.reward.extractor, spec.reward.choices) for o in outputs]
    correct = [a is not None and a == e.answer for a, e in zip(answers, examples, strict=False)]
    return {
        "accuracy": sum(correct) / len(examples),
        "valid_ratio": sum(a is not None for a in answers) / len(examples),
        "response_length": sum(len(o[0].token_ids) for o in outputs) / len(examples),
        "n": len(examples),
        "answers": {e.prompt.id: a for e, a in zip(examples, answers, strict=False)},
    }


def majority_accuracy(engine: RolloutEngine, examples: Sequence[Example], spec: RunSpec) -> dict:
    votes = spec.eval.maj_votes or spec.rollout.votes
    max_tokens = spec.eval.max_new_tokens or spec.rollout.max_new_tokens
    outputs = engine.generate([e.prompt for e in examples], n=votes, temperature=spec.rollout.temperature,
                              top_p=spec.rollout.top_p, max_new_tokens=max_tokens, seed=spec.seed)
    stats = [
        vote_stats([extract_answer(s.text, spec.reward.extractor, spec.reward.choices) for s in samples], e.answer)
        for samples, e in zip(outputs, examples, strict=False)
    ]
    return {
        "maj_accuracy": sum(s.majority_correct for s in stats) / len(examples),
        "pass_at_n": sum(s.pass_at_n for s in stats) / len(examples),
        "votes": votes,
    }
