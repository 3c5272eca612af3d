"""Evaluation with labels (never seen by adaptation): greedy pass@1 and maj@N.

pass@1: the greedy answer equals the label. maj@N: the majority of N sampled answers (unreadable ones are no
votes) equals the label; the votes are seeded by the run's seed, so before and after are compared on the same
random numbers. Both read answers with the same extractor the reward uses.

On a real model these passes over the test set are a run's longest phases, so each asks the engine for its prompts
in chunks (`prompts_per_call`) and reports after each chunk through `advance(prompts_done)`: the trainer turns that
into a progress bar, log events and progress.json. Chunking changes no answer: with a seed, a prompt's samples
depend only on (seed, prompt id), not on the other prompts of a call (`RolloutEngine.generate`).

With several trainer ranks each pass is sharded (`Shards`): every rank evaluates a contiguous slice of the pass's
prompts on its own engine, the per-prompt results are gathered in rank order, and every rank computes the same
metrics over the whole pass, equal to one rank's evaluation of all of it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from ttrv import log
from ttrv.data import Example, Prompt
from ttrv.reward import extract_answer, normalize_label, vote_stats
from ttrv.rollout.base import RolloutEngine, Sample
from ttrv.spec import RunSpec

logger = log.get_logger(__name__)

Advance = Callable[[int], None]
"""Called with the number of prompts just finished."""


@dataclass(frozen=True)
class Shards:
    """How a pass is split over the trainer's ranks: rank `rank` of `size` takes the rank-th contiguous slice of
    each pass's examples, and `gather` returns every rank's list of per-prompt results in rank order (the
    trainer's Collectives.all_gather_object, a collective: every rank calls it once per pass). The default is one
    rank doing everything."""

    rank: int = 0
    size: int = 1
    gather: Callable[[list], list[list]] = lambda part: [part]

    def part(self, items: Sequence):
        per = math.ceil(len(items) / self.size)
        return items[self.rank * per : (self.rank + 1) * per]

    def join(self, part: list) -> list:
        """Every rank's `part`, concatenated in rank order: the whole pass's results in the examples' order."""
        return [item for rank_part in self.gather(part) for item in rank_part]


ONE_RANK = Shards()

# A service engine sends one request per prompt, at most `max_concurrency` in flight; a chunk drains to zero in
# flight before the next starts, which leaves about max_concurrency / (2 * chunk) of the engine idle. Sixteen
# waves per chunk keep that near 3 %.
SERVICE_WAVES_PER_CHUNK = 16
# An engine of unknown batching is asked about this many times per pass.
DEFAULT_CHUNKS = 20


def prompts_per_call(engine: RolloutEngine, n: int, count: int) -> int:
    """How many prompts (of `count`, n samples each) one generate call of an evaluation pass asks for.

    The in-process engine (ttrv.rollout.hf.HFEngine.generate) already splits a call into batches of
    `max_batch_sequences // n` prompts: chunks of exactly that size are the batches it would have run, so the
    numbers are bit for bit those of one call. The service engine (ttrv.rollout.client.ServiceEngine) keeps
    `max_concurrency` prompts in flight; its chunks hold SERVICE_WAVES_PER_CHUNK waves of them."""
    sequences = getattr(engine, "max_batch_sequences", None)
    if sequences:
        return max(1, sequences // n)
    concurrency = getattr(engine, "max_concurrency", None)
    if concurrency:
        return SERVICE_WAVES_PER_CHUNK * concurrency
    return max(1, math.ceil(count / DEFAULT_CHUNKS))


def generate_in_chunks(engine: RolloutEngine, prompts: Sequence[Prompt], n: int, temperature: float,
                       top_p: float, max_new_tokens: int, seed: int | None = None,
                       advance: Advance | None = None) -> list[list[Sample]]:
    """`engine.generate` over `prompts`, one chunk per call, `advance` told after each."""
    size = prompts_per_call(engine, n, len(prompts))
    outputs: list[list[Sample]] = []
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        outputs.extend(engine.generate(chunk, n=n, temperature=temperature, top_p=top_p,
                                       max_new_tokens=max_new_tokens, seed=seed))
        if advance is not None:
            advance(len(chunk))
    return outputs


def greedy_accuracy(engine: RolloutEngine, examples: Sequence[Example], spec: RunSpec,
                    advance: Advance | None = None, shards: Shards = ONE_RANK) -> dict:
    """pass@1 over `examples` (this rank's shard evaluated here, the whole pass's results returned)."""
    max_tokens = spec.eval.max_new_tokens or spec.rollout.max_new_tokens
    mine = shards.part(examples)
    outputs = generate_in_chunks(engine, [e.prompt for e in mine], n=1, temperature=0.0, top_p=1.0,
                                 max_new_tokens=max_tokens, advance=advance)
    r = spec.reward
    answers = [extract_answer(o[0].text, r.extractor, e.prompt.choices(r.choices))
               for o, e in zip(outputs, mine, strict=True)]
    labels = [normalize_label(e.answer, r.extractor, e.prompt.choices(r.choices)) for e in mine]
    records = shards.join([(e.prompt.id, a, a is not None and a == label, len(o[0].token_ids))
                           for e, a, label, o in zip(mine, answers, labels, outputs, strict=True)])
    return {
        "accuracy": sum(r[2] for r in records) / len(examples),
        "valid_ratio": sum(r[1] is not None for r in records) / len(examples),
        "response_length": sum(r[3] for r in records) / len(examples),
        "n": len(examples),
        "answers": {r[0]: r[1] for r in records},
    }


def majority_votes(spec: RunSpec) -> int:
    """N of maj@N."""
    return spec.eval.maj_votes or spec.rollout.votes


def majority_accuracy(engine: RolloutEngine, examples: Sequence[Example], spec: RunSpec,
                      advance: Advance | None = None, shards: Shards = ONE_RANK) -> dict:
    """maj@N over `examples` (this rank's shard evaluated here, the whole pass's results returned)."""
    votes = majority_votes(spec)
    max_tokens = spec.eval.max_new_tokens or spec.rollout.max_new_tokens
    mine = shards.part(examples)
    outputs = generate_in_chunks(engine, [e.prompt for e in mine], n=votes, temperature=spec.rollout.temperature,
                                 top_p=spec.rollout.top_p, max_new_tokens=max_tokens, seed=spec.seed,
                                 advance=advance)
    stats = shards.join([
        vote_stats([extract_answer(s.text, spec.reward.extractor, e.prompt.choices(spec.reward.choices))
                    for s in samples], normalize_label(e.answer, spec.reward.extractor,
                                                       e.prompt.choices(spec.reward.choices)))
        for samples, e in zip(outputs, mine, strict=True)
    ])
    return {
        "maj_accuracy": sum(s.majority_correct for s in stats) / len(examples),
        "pass_at_n": sum(s.pass_at_n for s in stats) / len(examples),
        "votes": votes,
    }


# --------------------------------------------------------------------------------------------------- a whole stage
@dataclass(frozen=True)
class EvalPass:
    """One pass over one split: greedy pass@1, or maj@N with N = `samples` per prompt."""

    kind: Literal["greedy", "majority"]
    split: str
    examples: Sequence[Example]
    samples: int = 1

    @property
    def metric(self) -> str:
        return "pass@1" if self.kind == "greedy" else f"maj@{self.samples}"


@dataclass(frozen=True)
class EvalProgress:
    """Where an evaluation stage is: prompts done of all its passes, and the time left. The time left weighs each
    prompt by its samples (a maj@32 prompt costs about 32 greedy ones); None until a chunk has finished."""

    stage: str
    done: int
    total: int
    remaining_seconds: float | None = None
    milestone: bool = False
    """The stage's start, or a pass's end."""


def evaluation_passes(spec: RunSpec, subset: Sequence[Example], test: Sequence[Example],
                      heldout: Sequence[Example]) -> list[EvalPass]:
    """Greedy pass@1 on the adaptation subset, the test set and the held-out split; maj@N on the test set (each
    split cut to `eval.limit`, the subset excepted)."""
    limit = spec.eval.limit
    passes = [EvalPass("greedy", "subset", subset)] if subset else []
    if spec.eval.full_test_set and test:
        passes += [EvalPass("greedy", "test", test[:limit]),
                   EvalPass("majority", "test", test[:limit], majority_votes(spec))]
    if heldout:
        passes.append(EvalPass("greedy", "heldout", heldout[:limit]))
    return passes


def evaluate(engine: RolloutEngine, spec: RunSpec, stage: str, passes: Sequence[EvalPass], *, show: bool = True,
             report: Callable[[EvalProgress], None] | None = None, shards: Shards = ONE_RANK) -> dict:
    """Runs `passes` and returns their results under the report's keys (subset_accuracy, accuracy, valid_ratio,
    response_length, maj_accuracy, pass_at_n, votes, heldout_accuracy; seconds: the stage's wall time).

    Shown as `ttrv.loop.adapt` shows its steps: a tqdm bar per pass on stderr when `show` (the trainer's rank 0),
    an `evaluation_pass_started` and an `evaluation_pass_finished` event per pass (with this rank's share of its
    prompts), and `report` called at the start and after each chunk of prompts. With `shards` every rank evaluates
    its share of each pass; the progress counts the whole stage, estimated from this rank's share."""
    from tqdm import tqdm

    total = sum(len(p.examples) for p in passes)
    mine_total = sum(len(shards.part(p.examples)) for p in passes)
    sequences = sum(len(shards.part(p.examples)) * p.samples for p in passes)
    started = time.perf_counter()
    done = done_sequences = 0

    def tell(milestone: bool) -> None:
        if report is None:
            return
        elapsed = time.perf_counter() - started
        remaining = elapsed / done_sequences * (sequences - done_sequences) if done_sequences else None
        # the other ranks run their shares alongside: the stage's progress is this rank's share of it, scaled
        whole = total if done == mine_total else round(done * total / mine_total) if mine_total else 0
        report(EvalProgress(stage, whole, total, remaining, milestone))

    tell(True)
    results: dict = {}
    for item in passes:
        fields = {"stage": stage, "metric": item.metric, "split": item.split, "prompts": len(item.examples)}
        share = len(shards.part(item.examples))
        logger.info("evaluation_pass_started", **fields, rank=shards.rank, shard=share)
        pass_started = time.perf_counter()
        bar = tqdm(total=share, desc=f"{stage.removeprefix('evaluating-')} {item.metric} {item.split}",
                   unit="prompt", disable=not show, file=sys.stderr, dynamic_ncols=True)

        pass_done = 0

        def advance(count: int, item: EvalPass = item, bar=bar, share: int = share) -> None:
            nonlocal done, done_sequences, pass_done
            bar.update(count)
            pass_done += count
            done += count
            done_sequences += count * item.samples
            tell(pass_done >= share)

        try:
            if item.kind == "majority":
                measured = majority_accuracy(engine, item.examples, spec, advance, shards)
                accuracy = measured["maj_accuracy"]
                results |= measured
            else:
                measured = greedy_accuracy(engine, item.examples, spec, advance, shards)
                accuracy = measured["accuracy"]
                if item.split == "test":
                    results |= {k: measured[k] for k in ("accuracy", "valid_ratio", "response_length")}
                else:
                    results[f"{item.split}_accuracy"] = accuracy
        finally:
            bar.close()
        logger.info("evaluation_pass_finished", **fields, rank=shards.rank, shard=share, accuracy=round(accuracy, 4),
                    seconds=round(time.perf_counter() - pass_started, 2))
    results["seconds"] = round(time.perf_counter() - started, 2)
    return results
