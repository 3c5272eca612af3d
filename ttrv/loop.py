"""The adaptation loop: the data cursor, the step timer, one adaptation step, `adapt` over the run's steps, and the
evaluations around it. The process around it (distributed set-up, loading, the report, exit codes) is ttrv.train.

One step, for a batch of unlabeled prompts (verl's `fit()` story, each phase timed):

    rollout   sample N answers per prompt from weight version k
    reward    extract answers, vote rewards r_j = count(a_j)/N - w H_norm (ttrv.reward)
    ref       log-probs of the trained group (first G samples) under the frozen base, for the KL term
    update    GRPO advantages (ttrv.grpo) and a clipped policy-gradient step (DeepSpeed)
    publish   rank 0 writes weight version k+1 to the store (manifest last); with rollout.maxStaleness >= 1 on a
              background thread, overlapping the next step's sampling (`WeightPublisher`)
    sync      the rollout engine loads version k+1 (with maxStaleness 1: at least version k) before the next step
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import torch

from ttrv import exitcodes, log
from ttrv.collectives import Collectives
from ttrv.data import Example, Prompt
from ttrv.evaluate import EvalProgress, Shards, evaluate, evaluation_passes
from ttrv.fsutil import strict_json
from ttrv.grpo import ttrv_advantages
from ttrv.guard import (
    COLLAPSED,
    EARLY_STOPPED,
    CollapseGuard,
    EarlyStop,
    budget_spent,
    devices,
    dominant_share,
    majority_share,
)
from ttrv.learner import Learner, World
from ttrv.policy import PromptEncoder, collate
from ttrv.reward import extract_answer, normalized_entropy, vote_rewards
from ttrv.rollout.base import RolloutEngine, Sample
from ttrv.spec import RunSpec, RunStage
from ttrv.splits import subset_examples
from ttrv.status_report import report_progress

logger = log.get_logger(__name__)

# What the trainer is doing, as progress.json's `stage` says (operators/progress.py reads it).
EVALUATING_BEFORE, ADAPTING, EVALUATING_AFTER, FINISHED = get_args(RunStage)
# Evaluation reports after every chunk of prompts; progress.json is rewritten at the start of a stage, at the end of
# each pass, and in between at most this often, which is plenty for an operator that polls every 30 s.
EVAL_PROGRESS_SECONDS = 1.0


# --------------------------------------------------------------------------------------------------- data cursor
@dataclass
class Cursor:
    """Where the run is in its data. Epoch e visits the prompts in a permutation seeded by (seed, e); a step takes
    the next `prompts_per_step` of it, and the last step of an epoch takes what is left (no prompt is skipped or
    repeated within an epoch)."""

    epoch: int = 0
    position: int = 0

    def order(self, count: int, seed: int) -> list[int]:
        indices = list(range(count))
        random.Random(f"{seed}:{self.epoch}").shuffle(indices)
        return indices

    def next_batch(self, prompts: Sequence[Prompt], size: int, seed: int) -> list[Prompt]:
        order = self.order(len(prompts), seed)
        return [prompts[i] for i in order[self.position : self.position + size]]

    def advance(self, taken: int, count: int) -> None:
        self.position += taken
        if self.position >= count:
            self.epoch, self.position = self.epoch + 1, 0


def steps_per_epoch(count: int, prompts_per_step: int) -> int:
    return math.ceil(count / prompts_per_step)


# --------------------------------------------------------------------------------------------------- timing
@dataclass
class StepTimer:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------------- reward
@dataclass(frozen=True)
class Scored:
    answers: list[list[str | None]]  # [P][N]
    rewards: list[list[float]]  # [P][N]
    entropies: list[float]  # [P]


def score(prompts: list[Prompt], samples: list[list[Sample]], spec: RunSpec) -> Scored:
    """Label-free: each prompt's N votes reward each other; answers are read against the prompt's own options."""
    r = spec.reward
    answers = [[extract_answer(s.text, r.extractor, prompt.choices(r.choices)) for s in prompt_samples]
               for prompt, prompt_samples in zip(prompts, samples, strict=True)]
    rewards = [vote_rewards(a, r.entropy_weight, r.invalid_reward) for a in answers]
    return Scored(answers, rewards, [normalized_entropy(a) for a in answers])


# --------------------------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """Everything a resumed trainer needs besides the DeepSpeed state: it goes into each checkpoint's commit."""

    cursor: Cursor = field(default_factory=Cursor)
    step: int = 0
    guard: dict = field(default_factory=dict)
    early_stop: dict = field(default_factory=dict)
    stop: dict = field(default_factory=dict)  # why and where the run stopped before its last epoch
    before: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    checkpoint_step: int | None = None
    elapsed_seconds: float = 0.0
    attempts: int = 1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, document: dict) -> RunState:
        return cls(**(document | {"cursor": Cursor(**document["cursor"])}))


class Preempted(Exception):
    """SIGTERM arrived (preemption, eviction, drain); a checkpoint was written and the trainer should exit
    exitcodes.PREEMPTED."""


class Interrupted(BaseException):  # noqa: N818 - named as KeyboardInterrupt, its kind
    """SIGTERM outside the adaptation steps (start-up, evaluation, the report): nothing there is worth a checkpoint,
    so the trainer leaves at once with exitcodes.PREEMPTED, and a restart repeats the phase. A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` on the way (ours or a library's) swallows it."""


class PreemptionSignal:
    """SIGTERM during the adaptation steps sets a flag that the loop reads between steps (every rank must agree
    before they checkpoint together, so the flag is max-reduced across ranks). In every other phase, model loading
    and evaluation included, the handler raises Interrupted where the main thread is, so the trainer ends promptly
    instead of finishing a phase of minutes first. Python runs the handler in the main thread between bytecodes
    (a blocking system call is interrupted and, PEP 475, the handler's exception propagates from it)."""

    def __init__(self):
        self.received = False
        self.deferred = False

    def install(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True
        if not self.deferred:
            logger.warning("sigterm_received", action=f"exit {exitcodes.PREEMPTED} now (no step to checkpoint)")
            raise Interrupted("SIGTERM outside the adaptation steps")
        logger.warning("sigterm_received", action=f"checkpoint after this step, then exit {exitcodes.PREEMPTED}")

    @contextmanager
    def deferred_to_step_end(self):
        """While adapting: SIGTERM only sets the flag, read after each step."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False

    def any_rank(self, collectives: Collectives) -> bool:
        return collectives.any(self.received)


# --------------------------------------------------------------------------------------------------- run context
@dataclass
class RunContext:
    spec: RunSpec
    out: Path
    world: World
    store: object
    engine: RolloutEngine
    learner: Learner
    encoder: PromptEncoder
    prompts: list[Prompt]
    pad_id: int
    collectives: Collectives
    preemption: PreemptionSignal = field(default_factory=PreemptionSignal)
    events: Path = field(init=False)

    def __post_init__(self):
        self.events = self.out / "events.jsonl"

    @property
    def total_steps(self) -> int:
        return steps_per_epoch(len(self.prompts), self.spec.grpo.prompts_per_step) * self.spec.grpo.epochs


def shard(batch: list[Prompt], world: World) -> list[Prompt]:
    return batch[world.rank :: world.size]


def adaptation_step(ctx: RunContext, step: int, batch: list[Prompt], timer: StepTimer) -> dict:
    """One TTRV step on this rank's share of the batch; returns the step's metrics (this rank's). Votes are
    seeded by (run seed, step, prompt), so they do not depend on the number of ranks or on restarts."""
    spec = ctx.spec
    mine = shard(batch, ctx.world) or batch[:1]  # a rank without prompts runs zero-weight passes on one
    idle = not shard(batch, ctx.world)
    g = spec.rollout.group_size
    with timer.phase("rollout"):
        samples = ctx.engine.generate(mine, spec.rollout.votes, spec.rollout.temperature, spec.rollout.top_p,
                                      spec.rollout.max_new_tokens, seed=spec.seed * 1_000_003 + step)
    with timer.phase("reward"):
        scored = score(mine, samples, spec)
        advantages = step_advantages(ctx.collectives, ctx.world, [row[:g] for row in scored.rewards],
                                     scored.entropies, spec)
    with timer.phase("collate"):
        encoded = [ctx.encoder.encode(p) for p in mine for _ in range(g)]
        responses = [s.token_ids for prompt_samples in samples for s in prompt_samples[:g]]
        train_batch = collate(encoded, responses, ctx.pad_id)
        if idle:
            advantages = torch.zeros_like(advantages)
            train_batch.target_mask.zero_()
    with timer.phase("old_log_prob"):
        old = ctx.learner.old_log_probs(train_batch)
    with timer.phase("ref_log_prob"):
        ref = ctx.learner.reference_log_probs(train_batch)
    with timer.phase("update"):
        stats = ctx.learner.update(train_batch, advantages, old, ref)
    answers, rewards, entropies, lengths = gather_votes(ctx.collectives, scored, samples, idle)
    return {
        **stats,
        "reward": sum(sum(row) for row in rewards) / sum(len(row) for row in rewards),
        "entropy": sum(entropies) / len(entropies),
        "response_length": sum(lengths) / len(lengths),
        "valid_ratio": sum(a is not None for row in answers for a in row) / len(lengths),
        "dominant_share": dominant_share(answers),
        "majority_share": majority_share(answers),
        "sampled_tokens": sum(lengths),
        "prompts": len(answers),
    }


def step_advantages(collectives: Collectives, world: World, rewards: list[list[float]], entropies: list[float],
                    spec: RunSpec):
    """This rank's advantages, computed over the whole step's batch (all ranks' groups, in rank order), so that
    a batch-wide normalisation sees the same batch however many ranks share it."""
    parts = collectives.all_gather_object((rewards, entropies))
    start = sum(len(part[0]) for part in parts[: world.rank if len(parts) > 1 else 0])
    all_rewards = torch.tensor([row for part in parts for row in part[0]], dtype=torch.float32)
    all_entropies = torch.tensor([h for part in parts for h in part[1]], dtype=torch.float32)
    advantages = ttrv_advantages(all_rewards, all_entropies, spec.reward.entropy_mode, spec.reward.entropy_weight)
    return advantages[start : start + len(rewards)].flatten()


def gather_votes(collectives: Collectives, scored: Scored, samples: list[list[Sample]], idle: bool):
    """Every rank's answers, rewards, entropies and response lengths, so the step's metrics (and the collapse
    guard) see the whole batch, not rank 0's share; an idle rank's stand-in prompt is left out."""
    mine = ([], [], [], []) if idle else (scored.answers, scored.rewards, scored.entropies,
                                           [len(s.token_ids) for row in samples for s in row])
    parts = collectives.all_gather_object(mine)
    if len(parts) == 1:
        return mine
    return tuple([item for part in parts for item in part[i]] for i in range(4))


def adapt(ctx: RunContext, state: RunState, metrics=None, probe=None) -> dict:
    """The adaptation loop, from `state` on. Returns what the report needs (steps, guard outcome). `probe`, when
    given, measures greedy accuracy on the adaptation subset every `eval.every` steps (every rank its shard, for
    the report's curve): labels stay in that callback and never reach the loop."""
    spec = ctx.spec
    guard = CollapseGuard(spec.guard, **state.guard)
    early_stop = EarlyStop(spec.grpo.early_stop, **state.early_stop)
    progress = _progress_bar(ctx.total_steps, state.step, ctx.world)
    if ctx.world.is_main:
        write_progress(ctx, state, ADAPTING)
    publisher = WeightPublisher(ctx)
    with ctx.preemption.deferred_to_step_end():
        try:
            guard_fired_at = _steps(ctx, state, guard, early_stop, progress, metrics, probe, publisher)
        except BaseException:
            publisher.close()  # the run fails with its own error; a failed background publish is logged
            raise
        publisher.finish()
    progress.close()
    rollback = None
    if guard_fired_at is not None:
        rollback = guard.healthy_version
        restore_version(ctx, rollback)
        logger.warning("collapse_guard_fired", step=guard_fired_at, rolled_back_to=rollback or "base")
    return {"steps": state.step, "total_steps": ctx.total_steps, "guard_fired_at": guard_fired_at,
            "rolled_back_to": rollback, "stop_reason": state.stop.get("reason"),
            "steps_saved": state.stop.get("stepsSaved", 0)}


def _steps(ctx: RunContext, state: RunState, guard: CollapseGuard, early_stop: EarlyStop, progress, metrics,
           probe, publisher: WeightPublisher) -> int | None:
    """adapt's steps, until the epochs are done, the guard fires (its step is returned), the budget is spent or
    early stopping stops the run (`state.stop` says which)."""
    spec = ctx.spec
    step_seconds: list[float] = []
    while state.cursor.epoch < spec.grpo.epochs:
        started = time.perf_counter()
        batch = state.cursor.next_batch(ctx.prompts, spec.grpo.prompts_per_step, spec.seed)
        timer = StepTimer()
        step_metrics = adaptation_step(ctx, state.step + 1, batch, timer)
        version = state.step + 1
        publish_and_sync(ctx, publisher, version, state, guard, timer)
        state.cursor.advance(len(batch), len(ctx.prompts))
        state.step = version
        step_seconds.append(time.perf_counter() - started)
        state.elapsed_seconds += step_seconds[-1]
        record = {"step": version, "epoch": state.cursor.epoch if state.cursor.position else state.cursor.epoch - 1,
                  "prompt_ids": [p.id for p in batch], "weight_version": version, **_round(step_metrics),
                  "seconds": _round(timer.seconds | {"step": step_seconds[-1]})}
        every = spec.eval.every
        if probe is not None and every and version % every == 0:  # every rank: the probe is sharded
            accuracy = probe()
            if accuracy is not None:
                record["subset_accuracy"] = round(accuracy, 4)
        fired = guard.observe(version, step_metrics["entropy"], step_metrics["dominant_share"],
                              step_metrics["response_length"], step_metrics["prompts"])
        state.guard = guard.state()
        stop_reason = _stop_reason(ctx, state, early_stop, step_metrics, fired)
        if stop_reason:
            record["stop"] = state.stop
        if ctx.world.is_main:
            state.events.append(record)
            _append_event(ctx.events, record)
            recent = step_seconds[-10:]
            write_progress(ctx, state, ADAPTING, epoch=record["epoch"],
                           estimatedRemainingSeconds=round(sum(recent) / len(recent) * (ctx.total_steps - state.step)),
                           metrics={k: record[k] for k in ("reward", "entropy", "response_length", "loss",
                                                           "valid_ratio")})
            if metrics is not None:
                metrics.observe(record)
            progress.update(1)
            progress.set_postfix(reward=f"{step_metrics['reward']:.3f}", entropy=f"{step_metrics['entropy']:.3f}",
                                 len=f"{step_metrics['response_length']:.1f}", loss=f"{step_metrics['loss']:.4f}")
        preempted = ctx.preemption.any_rank(ctx.collectives)
        every = spec.storage.checkpoint_every
        if preempted or (every and version % every == 0 and state.cursor.epoch < spec.grpo.epochs):
            publisher.wait()  # a checkpoint's step names a weight version that must be in the store
            save_checkpoint(ctx, state)
        if preempted:
            progress.close()
            raise Preempted(f"preempted after step {version}; checkpoint written")
        if fired:
            return version
        if stop_reason:
            return None
    return None


class PublishFailed(RuntimeError):
    """Publishing a weight version in the background failed: the run stops with the store's error."""


class WeightPublisher:
    """Publishes each step's weight version (rank 0), on the critical path or, with `rollout.maxStaleness` >= 1,
    on a background thread so that publishing version k overlaps step k+1's sampling (which may use version k-1).

    At most one publish is in the background: the next publish, a checkpoint and the end of the run wait for it
    (`wait`), and a failed one raises `PublishFailed` there, so the run stops loudly. A version is visible only once
    its manifest is written, which the store does last (ttrv.store.sets), so a SIGKILL or crash mid-publish leaves
    no half-visible version; SIGTERM is deferred to the step's end, where the checkpoint waits for the publish.
    The published tensors are the learner's private CPU copies (`Learner.trainable_state` clones them), so the next
    optimizer step cannot change them while they are uploaded."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.overlapping = ctx.spec.rollout.max_staleness >= 1
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ttrv-publish") if self.overlapping else None
        self._pending: tuple[int, Future] | None = None
        self.last: int | None = None
        """The newest version published, on every rank (rank 0 publishes it; `finish` has all ranks meet on it)."""
        self.overlapped_seconds: float | None = None
        """How long the last background publish that `wait` collected took (off the critical path)."""

    def publish(self, version: int, tensors, protected: set[int]) -> None:
        """Rank 0: publish `tensors` as `version` (in the background when overlapping) after waiting for the
        previous background publish, then delete versions beyond storage.keepVersions except `protected`."""
        spec = self.ctx.spec

        def run() -> float:
            started = time.perf_counter()
            self.ctx.store.publish_weights(
                version, tensors, kind=weights_kind(spec), base_model=spec.model.path,
                dtype=dtype_name(self.ctx.learner.dtype), extra_files=self.ctx.learner.weight_files(),
                full_every=spec.storage.full_every, delta_max_share=spec.storage.delta_max_share)
            self.ctx.store.gc_weights(spec.storage.keep_versions, in_use=protected)
            return time.perf_counter() - started

        self.wait()
        if self._pool is None:
            run()
            return
        self._pending = (version, self._pool.submit(run))

    def wait(self) -> None:
        """Waits for the background publish, if any; raises PublishFailed when it failed."""
        if self._pending is None:
            return
        version, future = self._pending
        self._pending = None
        try:
            self.overlapped_seconds = future.result()
        except Exception as error:
            logger.error("weights_publish_failed", version=version, error=f"{type(error).__name__}: {error}")
            raise PublishFailed(f"publishing weight version {version} in the background failed "
                                f"({type(error).__name__}: {error}); the run stops, resume it once the store "
                                "works again") from error
        logger.debug("weights_published_in_background", version=version, seconds=round(self.overlapped_seconds, 3))

    def finish(self) -> None:
        """End of the adaptation steps: the last version is in the store on every rank's return, and an
        in-process engine serves it (a service engine is told the trainer's last version, as after each step)."""
        self.wait()
        self.close()
        if self.overlapping and self.last is not None:
            self.ctx.collectives.barrier()
            self.ctx.engine.load_version(self.last)

    def close(self) -> None:
        """Stops the background thread after its publish (failures are logged, not raised: the caller is already
        failing with its own error)."""
        try:
            self.wait()
        except PublishFailed:
            pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def publish_and_sync(ctx: RunContext, publisher: WeightPublisher, version: int, state: RunState,
                     guard: CollapseGuard, timer: StepTimer) -> None:
    """The publish and sync phases of a step. `publish` and `sync` time only the critical path; a background
    publish's own time is recorded as `publish_overlapped` on the step that collects it (the next one)."""
    with timer.phase("publish"):
        tensors = ctx.learner.trainable_state()  # every rank: a collective under ZeRO-3; rank 0 gets them
        publisher.last = version  # every rank: `finish` is a barrier and a load that all ranks take part in
        if ctx.world.is_main:
            protected = {v for v in (state.checkpoint_step,) if v} | guard.protected_versions()
            publisher.overlapped_seconds = None
            publisher.publish(version, tensors, protected)
            if publisher.overlapped_seconds is not None:
                timer.seconds["publish_overlapped"] = publisher.overlapped_seconds
        del tensors
        ctx.collectives.barrier()
    with timer.phase("sync"):
        if not publisher.overlapping or hasattr(ctx.engine, "max_staleness"):
            # the rollout service's client waits for a version within maxStaleness of `version`: version-1,
            # whose publish has finished, is enough while `version` is still being published
            ctx.engine.load_version(version)
        elif version > 1:
            # an in-process engine loads from the store: it takes version-1, complete since rank 0 waited for it
            # before the barrier above (one-step-off, as maxStaleness 1 allows)
            ctx.engine.load_version(version - 1)


def _stop_reason(ctx: RunContext, state: RunState, early_stop: EarlyStop, step_metrics: dict,
                 guard_fired: bool) -> str | None:
    """Why the run stops after this step, if it does: the collapse guard, the budget, or early stopping (in that
    order; all of them are observed every step so their windows stay current). Sets `state.stop`, which
    events.jsonl, progress.json and report.json carry."""
    spec = ctx.spec
    converged = early_stop.observe(state.step, step_metrics)
    state.early_stop = early_stop.state()
    reason = (COLLAPSED if guard_fired else budget_spent(spec.budget, state.step, state.elapsed_seconds, devices(spec))
              or (EARLY_STOPPED if converged else None))
    # Ranks time their steps apart: every rank takes rank 0's decision, so that they stop together.
    reason = ctx.collectives.all_gather_object(reason)[0]
    if reason and state.step < ctx.total_steps:
        state.stop = {"reason": reason, "step": state.step, "stepsSaved": ctx.total_steps - state.step}
        logger.info("run_stopping", reason=reason, step=state.step, steps_saved=state.stop["stepsSaved"],
                    signal=spec.grpo.early_stop.signal if reason == EARLY_STOPPED else None)
        return reason
    return None


def save_checkpoint(ctx: RunContext, state: RunState) -> None:
    from ttrv import checkpoint

    state.checkpoint_step = state.step
    checkpoint.save(ctx.store, ctx.learner.engine, state.step, state.to_json(), ctx.world.rank, ctx.world.size,
                    ctx.collectives.barrier)
    if ctx.world.is_main:
        checkpoint.prune(ctx.store, keep=2, world_size=ctx.world.size)


def resume(ctx: RunContext) -> RunState | None:
    """Continue from the newest complete checkpoint, if any: learner state, RNG, cursor, events; versions
    published after the checkpoint (by the attempt that died) are deleted so `latest` cannot point past it."""
    from ttrv import checkpoint

    restored = checkpoint.load_latest(ctx.store, ctx.learner.engine, ctx.world.rank, ctx.world.size)
    if restored is None:
        return None
    state = RunState.from_json(restored.state)
    state.attempts += 1
    if ctx.world.is_main:
        for stale in [v for v in ctx.store.weight_versions() if v > state.step]:
            ctx.store.delete_set(weights_prefix(stale))
        rewrite_events(ctx.events, state.events)
    ctx.collectives.barrier()
    if state.step:
        ctx.engine.load_version(state.step)
    logger.info("resumed", step=state.step, epoch=state.cursor.epoch, position=state.cursor.position,
                attempt=state.attempts)
    return state


def write_progress(ctx: RunContext, state: RunState, stage: str, **fields) -> None:
    """progress.json in the run's store prefix, in the shape of Kubeflow's trainer status (KEP-2779), whole on every
    write, and in a cluster the same document into the run's status, where the operator reads it for `kubectl get`
    columns (operators/progress.py is the contract). `stage` says what the trainer does; `fields` are the stage's
    own keys (the step's metrics and time left while adapting, the prompts done while evaluating)."""
    total = ctx.total_steps
    document = {
        "stage": stage,
        "progressPercentage": round(100.0 * state.step / total, 1) if total else 100.0,
        "step": state.step, "totalSteps": total, "weightVersion": state.step or None,
        "checkpointStep": state.checkpoint_step, "baseAccuracy": state.before.get("accuracy"), "accuracy": None,
        "stopReason": state.stop.get("reason"), "stepsSaved": state.stop.get("stepsSaved"),
        **fields,
        "updatedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ctx.store.put_json("progress.json", document)
    # In a cluster the operator reads progress only from the run's status, never from the store (status_report.py).
    report_progress(document)


def restore_version(ctx: RunContext, version: int | None) -> None:
    """Put the learner and the rollout engine back on a published version (None: the base weights), published
    again under a fresh version number (rollout engines key loaded weights by path)."""
    tensors = ctx.store.load_weights(version) if version else ctx.learner.base_trainable_state()
    ctx.learner.load_trainable_state(tensors)
    restored = ctx.total_steps + 1
    if ctx.world.is_main:
        ctx.store.publish_weights(restored, tensors, kind=weights_kind(ctx.spec), base_model=ctx.spec.model.path,
                                  dtype=dtype_name(ctx.learner.dtype), extra_files=ctx.learner.weight_files())
    ctx.collectives.barrier()
    ctx.engine.load_version(restored)


def weights_kind(spec: RunSpec) -> str:
    return "lora" if spec.model.lora is not None else "full"


def weights_prefix(step: int) -> str:
    from ttrv.store import weights_prefix as prefix

    return prefix(step)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------- helpers
def _round(values: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


def _append_event(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(strict_json(record, where=str(path)) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def rewrite_events(path: Path, events: list[dict]) -> None:
    from ttrv.fsutil import atomic_write

    atomic_write(path, "".join(strict_json(e, where=str(path)) + "\n" for e in events).encode())


def _progress_bar(total: int, initial: int, world: World):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="adapt", unit="step", disable=not world.is_main,
                file=sys.stderr, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------- evaluation
def eval_shards(ctx: RunContext) -> Shards:
    """Evaluation over the trainer's ranks: each rank's engine evaluates a slice of each pass (the in-process
    engine holds the served weights on every rank; the service's client sends this rank's prompts)."""
    return Shards(ctx.world.rank, ctx.world.size, ctx.collectives.all_gather_object)


def evaluate_all(ctx: RunContext, state: RunState, stage: str, test: list[Example], prompts: list[Prompt],
                 heldout: list[Example], subset_accuracy: float | None = None) -> dict:
    """Greedy pass@1 on the adaptation subset, the test set and the held-out split; maj@N on the test set. Every
    rank calls it and evaluates its shard of each pass (`eval_shards`); all get the whole results.
    `subset_accuracy`, when the engine's weights were just probed on the subset, stands in for that pass.
    The progress goes to stderr (a bar per pass), the log (an event per pass) and progress.json (`stage`, prompts
    done of `evalPromptsTotal`; while evaluating after, the time left)."""
    spec = ctx.spec
    passes = evaluation_passes(spec, subset_examples(test, prompts), test, heldout)
    if subset_accuracy is not None:
        passes = [p for p in passes if p.split != "subset"]
    written = [-math.inf]

    def report(where: EvalProgress) -> None:
        if not ctx.world.is_main:
            return
        now = time.monotonic()
        if not where.milestone and now - written[0] < EVAL_PROGRESS_SECONDS:
            return
        written[0] = now
        remaining = where.remaining_seconds if stage == EVALUATING_AFTER else None  # before: adapting is to come
        write_progress(ctx, state, stage, evalPromptsDone=where.done, evalPromptsTotal=where.total,
                       estimatedRemainingSeconds=None if remaining is None else round(remaining))

    results = evaluate(ctx.engine, spec, stage, passes, show=ctx.world.is_main, report=report,
                       shards=eval_shards(ctx))
    if subset_accuracy is not None:
        results["subset_accuracy"] = subset_accuracy
    return results
