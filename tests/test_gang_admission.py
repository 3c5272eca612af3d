"""Gang admission of a run's rollout and trainer (issue 14, docs/operator.md "Gang admission"), end to end: the real
operator under kopf, against the API stand-in with a Kueue simulation (kueue_sim.py) whose ClusterQueue has GPUs
for exactly one run, and four runs queued at once, with each training API.

With a TrainJob the run's JobSet carries the rollout (one Workload, both pod sets); with a PyTorchJob the rollout
Deployment runs only while Kueue has the trainer admitted. Either way: every run finishes, a preempted run gives all
its GPUs back, and at no moment does anything hold GPUs while it cannot train, beyond the rollout's start-up and the
operator's reaction (the deadlock of issue 14, rollouts holding GPUs for trainers that are never admitted, holds
them for ever).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from kopf_util import DEPLOYMENTS, EXPERIMENTS, RUNS, cluster, operator
from kueue_sim import (
    QUEUE_LABEL,
    ROLLOUT_START,
    TICK,
    TRAINING_RUNTIMES,
    GangCluster,
    Snapshot,
    declare_kueue,
)
from operator_fixtures import NS

pytestmark = [pytest.mark.timeout(240)]

RUNS_ = ["exp-a", "exp-b", "exp-c", "exp-d"]
TRAINER_GPUS, ROLLOUT_GPUS = 2, 1
# What the operator may take to react to a change it watches (a child's event, or at worst the 0.5 s poll that
# kopf_util sets), with the stand-in and the simulation sharing one event loop on a busy machine.
REACTION = 5.0


def idle_holding(timeline: list[Snapshot], allowance: float) -> list[str]:
    """Where a run held GPUs without training for longer than `allowance` seconds, or while its Workload was not
    admitted for longer than REACTION seconds: what a deadlock looks like on the timeline."""
    problems = []
    idle_since: dict[str, float] = {}
    unadmitted_since: dict[str, float] = {}
    for snap in timeline:
        for run, gpus in snap.held.items():
            if gpus and run not in snap.training:
                idle_since.setdefault(run, snap.at)
                if snap.at - idle_since[run] > allowance:
                    problems.append(f"{run} held {gpus} GPUs without training for {snap.at - idle_since[run]:.2f} s")
            else:
                idle_since.pop(run, None)
            if gpus and run not in snap.admitted:
                unadmitted_since.setdefault(run, snap.at)
                if snap.at - unadmitted_since[run] > REACTION:
                    problems.append(f"{run} held {gpus} GPUs without an admitted Workload for "
                                    f"{snap.at - unadmitted_since[run]:.2f} s")
            else:
                unadmitted_since.pop(run, None)
        for run in set(idle_since) - {r for r, g in snap.held.items() if g}:
            idle_since.pop(run)
        for run in set(unadmitted_since) - {r for r, g in snap.held.items() if g}:
            unadmitted_since.pop(run)
    return problems


def test_the_timeline_check_sees_a_deadlock():
    """The check the gang test relies on fails on issue 14's deadlock: rollouts hold GPUs, no trainer admitted."""
    start = time.monotonic()
    deadlock = [Snapshot(start + i * TICK, {"exp-a": 1, "exp-b": 1}, 2, 0, set(), set()) for i in range(400)]
    problems = idle_holding(deadlock, ROLLOUT_START + REACTION)
    assert any("exp-a held 1 GPUs without training" in p for p in problems)
    assert any("without an admitted Workload" in p for p in problems)
    healthy = [Snapshot(start + i * TICK, {"exp-a": 3}, 3, 0, {"exp-a"} if i > 5 else set(), {"exp-a"})
               for i in range(400)]
    assert idle_holding(healthy, ROLLOUT_START + REACTION) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("trainer_api", ["trainjob", "pytorchjob"])
async def test_four_runs_on_quota_for_one_all_finish_and_no_gpu_waits_on_another_admission(
        monkeypatch, tmp_path, trainer_api):
    async with cluster(monkeypatch, tmp_path, kueue=True, trainer_api=trainer_api) as c, operator(c):
        declare_kueue(c.api)
        if trainer_api == "trainjob":  # the Workload holds both pod sets: quota for one run's rollout and trainer
            sim = GangCluster(c.api, trainer_api, quota=TRAINER_GPUS + ROLLOUT_GPUS, preempt_first=True)
        else:  # the quota covers the trainer; the rollout runs outside it, only while its trainer is admitted
            sim = GangCluster(c.api, trainer_api, quota=TRAINER_GPUS, headroom=ROLLOUT_GPUS, preempt_first=True)
        await c.create_experiment(
            maxParallelRuns=4, rollout={"backend": "service"}, scheduling={"queueName": "gpu"},
            resources={"gpusPerNode": TRAINER_GPUS, "rolloutGpus": ROLLOUT_GPUS},
            datasets=[{"name": run.removeprefix("exp-"), "path": f"/data/{run}.json"} for run in RUNS_])

        deadline = time.monotonic() + 180
        while not all(c.phase(run) == "Succeeded" for run in RUNS_):
            assert time.monotonic() < deadline, (
                f"runs stuck: {[(run, c.phase(run), c.status(RUNS, run).get('message')) for run in RUNS_]}; "
                f"Kueue: {sim.log}")
            await sim.step()
            await asyncio.sleep(TICK)
        await c.wait_phase("exp", "Succeeded", EXPERIMENTS)

        # Never over quota; no GPU ever waited on another admission.
        assert max(s.in_quota for s in sim.timeline) <= sim.quota
        assert max(s.outside_quota for s in sim.timeline) <= sim.headroom
        assert idle_holding(sim.timeline, ROLLOUT_START + REACTION) == []
        # One run at a time: quota for one, and the whole gang admitted or nothing.
        assert max(len([r for r, g in s.held.items() if g]) for s in sim.timeline) <= 1 + (trainer_api == "pytorchjob")
        assert max(len(s.training) for s in sim.timeline) == 1

        # The preempted run gave its GPUs back while the preemptor ran (idle_holding above: never without an
        # admitted Workload beyond the operator's reaction), then, first in the queue by creation, came back first.
        [preempted] = sim.preempted
        assert sim.log[:3] == [f"admit {preempted}", f"preempt {preempted}", f"admit {preempted}"]
        assert sorted(sim.log[3:]) == [f"admit {run}" for run in RUNS_ if run != preempted]
        foreign = [s for s in sim.timeline if s.foreign]
        assert foreign and not foreign[-1].held.get(preempted) and not foreign[-1].training
        assert "Kueue preempted the trainer" in await c.wait_event(preempted, "Warning", "Preempted")

        if trainer_api == "trainjob":
            # The rollout ran in the TrainJob's JobSet, from the run's own runtime: no Deployment at all.
            assert c.api.items(DEPLOYMENTS, NS) == []
            assert {rt["metadata"]["name"] for rt in c.api.items(TRAINING_RUNTIMES, NS)} == \
                {f"{run}-runtime" for run in RUNS_}
        else:
            for deployment in c.api.items(DEPLOYMENTS, NS):
                assert QUEUE_LABEL not in deployment["metadata"]["labels"]
                assert deployment["spec"]["replicas"] == 0  # finished runs give their rollout GPUs back
