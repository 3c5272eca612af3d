"""The publish and sync phases of a step (ttrv.loop.publish_and_sync) against a real file:// store that is slowed
down: with rollout.maxStaleness 1 the publish runs off the critical path, overlapping the next step's sampling,
and the versions stay bit-exact and in order; with maxStaleness 0 it stays on the critical path; a background
publish that fails stops the run at the next wait."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from ttrv.collectives import Collectives
from ttrv.guard import CollapseGuard
from ttrv.learner import World
from ttrv.loop import PublishFailed, RunState, StepTimer, WeightPublisher, publish_and_sync
from ttrv.spec import RunSpec
from ttrv.store import open_store

DELAY = 0.6
"""Seconds the slowed store adds to each publish; the simulated sampling takes longer, so it hides the publish."""


class SlowStore:
    """A real store whose publishes take DELAY seconds longer (a slow bucket), and that can be told to fail one."""

    def __init__(self, store, fail_version: int | None = None):
        self.store, self.fail_version = store, fail_version
        self.started: list[int] = []

    def publish_weights(self, step, tensors, **kwargs):
        self.started.append(step)
        time.sleep(DELAY)
        if step == self.fail_version:
            raise OSError(28, "No space left on device")
        return self.store.publish_weights(step, tensors, **kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


class Learner:
    """The learner's side of publishing: private CPU copies of its trainable weights, as Learner.trainable_state
    returns them; `step()` changes the weights in place, as an optimizer step does."""

    dtype = torch.bfloat16

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.weights = {f"layers.{i}.weight": torch.randn(64, 64, generator=generator).bfloat16() for i in range(3)}

    def trainable_state(self):
        return {name: tensor.clone() for name, tensor in self.weights.items()}

    def weight_files(self):
        return {}

    def step(self):
        for tensor in self.weights.values():
            tensor[0, :4] += 1.0  # a few values change, as at a small learning rate: a delta version


class Engine:
    """An in-process engine: loads each version from the store (verified), as HFEngine.load_version does."""

    def __init__(self, store):
        self.store, self.loaded = store, []

    def load_version(self, step):
        self.store.load_weights(step)
        self.loaded.append(step)


class CountedCollectives(Collectives):
    """One rank's collectives, counted: every rank must call the same collectives in the same order."""

    def __init__(self):
        super().__init__(1, "cpu")
        self.barriers = 0

    def barrier(self) -> None:
        self.barriers += 1
        super().barrier()


def context(tmp_path, staleness: int, fail_version: int | None = None):
    spec = RunSpec(data={"path": "x.json"}, rollout={"maxStaleness": staleness},
                   storage={"fullEvery": 2, "keepVersions": 10})
    store = SlowStore(open_store(f"file://{tmp_path}/store"), fail_version)
    return SimpleNamespace(spec=spec, store=store, learner=Learner(), engine=Engine(store), world=World(0, 1, 0),
                           collectives=Collectives(1, "cpu"))


def run_steps(ctx, steps: int, sampling: float):
    """`steps` steps of: sampling (sleep), an optimizer step, then publish and sync; returns each step's timer and
    the tensors published as each version."""
    publisher, guard, state = WeightPublisher(ctx), CollapseGuard(ctx.spec.guard), RunState()
    timers, published = [], {}
    try:
        for version in range(1, steps + 1):
            time.sleep(sampling)
            ctx.learner.step()
            published[version] = ctx.learner.trainable_state()
            timer = StepTimer()
            publish_and_sync(ctx, publisher, version, state, guard, timer)
            timers.append(timer.seconds)
            state.step = version
    except BaseException:
        publisher.close()
        raise
    publisher.finish()
    return timers, published


def test_publish_overlaps_the_next_steps_sampling_and_versions_stay_exact_and_ordered(tmp_path):
    ctx = context(tmp_path, staleness=1)
    timers, published = run_steps(ctx, steps=3, sampling=DELAY + 0.4)
    for seconds in timers:
        assert seconds["publish"] < DELAY / 2, seconds  # the slow publish itself is not on the critical path
    for seconds in timers[1:]:
        assert seconds["publish_overlapped"] >= DELAY  # ...and is recorded as what it cost off the path
        assert seconds["publish_overlapped"] > seconds["publish"]
    store = ctx.store.store
    assert ctx.store.started == [1, 2, 3]
    assert store.weight_versions() == [1, 2, 3]
    created = [store.read_manifest(f"weights/v{v:06d}").created for v in (1, 2, 3)]
    assert created == sorted(created)
    for version, tensors in published.items():
        loaded = store.load_weights(version)
        assert all(torch.equal(loaded[n].view(torch.int16), t.view(torch.int16)) for n, t in tensors.items())
    assert "delta" in store.read_manifest("weights/v000002").meta  # fullEvery 2: version 2 is a delta on 1
    # in-process engine: one step off while its version is published, then the last version at the end
    assert ctx.engine.loaded == [1, 2, 3]


def test_every_rank_meets_the_same_barriers_and_ends_on_the_last_version(tmp_path):
    """maxStaleness 1 with two ranks, each rank's side run alone: rank 1 publishes nothing, yet it must call as many
    barriers as rank 0 (a barrier only rank 0 enters pairs with the next collective, or hangs) and its in-process
    engine must end on the last version, as rank 0's does."""
    ranks = []
    for rank in (0, 1):
        ctx = context(tmp_path / f"rank{rank}", staleness=1)
        ctx.world, ctx.collectives = World(rank, 2, rank), CountedCollectives()
        if rank == 1:  # the store rank 0 wrote: rank 1 only reads it
            ctx.store = ranks[0].store
            ctx.engine = Engine(ctx.store)
        run_steps(ctx, steps=3, sampling=0.0)
        ranks.append(ctx)
    assert ranks[1].collectives.barriers == ranks[0].collectives.barriers
    assert ranks[1].engine.loaded[-1] == ranks[0].engine.loaded[-1] == 3


def test_without_staleness_the_publish_stays_on_the_critical_path(tmp_path):
    ctx = context(tmp_path, staleness=0)
    timers, _ = run_steps(ctx, steps=2, sampling=0.0)
    for seconds in timers:
        assert seconds["publish"] >= DELAY
        assert "publish_overlapped" not in seconds
    assert ctx.engine.loaded == [1, 2]


def test_a_failed_background_publish_fails_the_run_at_the_next_wait(tmp_path):
    ctx = context(tmp_path, staleness=1, fail_version=2)
    with pytest.raises(PublishFailed, match="weight version 2 .*No space left"):
        run_steps(ctx, steps=4, sampling=0.0)
    assert ctx.store.started == [1, 2]  # version 3 was never started on top of the failed one
    assert ctx.store.store.weight_versions() == [1]  # and version 2 never became visible
