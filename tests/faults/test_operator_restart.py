"""The operator killed (SIGKILL, as when its node dies) and started again, five times, at seeded random moments of
an experiment's life. The operator is the real one in a process of its own, run as its image runs it (`kopf run
--standalone --all-namespaces -m operators.ttrv_operator`), against the API stand-in of the kopf tests (kopf_util),
and it reads the runs' progress from their status, where the trainers report it.

The test plays the rest of the cluster whether the operator is up or not: the kubelet (rollout replicas become
ready), the training operator (trainers run, one restarts in place, they succeed) and the trainers (their progress
reports into the runs' status).
Trainers succeed only between kills, so the operator dies with runs in every phase, and once after the last one.

Nothing may be lost or made twice: each object the operator creates is created once (its uid never changes), no run
or child goes missing, the in-place restart is counted once, and the experiment's status converges to what the
trainers' progress and the jobs' conditions say."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from kopf_util import DEPLOYMENTS, EXPERIMENTS, JOBS, RUNS, cluster, condition
from kube_standin import KubeStandIn

pytestmark = [pytest.mark.fault, pytest.mark.asyncio, pytest.mark.timeout(300)]

DATASETS = ("mmmu", "shapes", "charts")
RESTARTED = "mmmu"  # its trainer is restarted in place by the training operator, once
_draw = random.Random(20261126)
SCHEDULE = [(round(_draw.uniform(0.2, 2.0), 2), round(_draw.uniform(0.0, 1.0), 2)) for _ in range(5)]
"""(seconds up once configured, seconds down) of the operator around each kill."""
SUCCEEDS_AFTER_KILLS = {dataset: kills for kills, dataset in enumerate(DATASETS, start=2)}


class OperatorProcess:
    def __init__(self, log):
        self.log = log
        self.process: asyncio.subprocess.Process | None = None

    def _configured(self) -> int:
        return self.log.read_text(errors="replace").count('"event": "operator_configured"') if self.log.exists() else 0

    async def start(self) -> None:
        """Starts it and waits until it has configured itself: a kill before that would find nothing to break."""
        before = self._configured()
        with open(self.log, "ab") as handle:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "-m",
                "operators.ttrv_operator", stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                env=os.environ | {"TTRV_POLL_SECONDS": "0.5"})
        deadline = asyncio.get_running_loop().time() + 60
        while self._configured() == before:
            assert self.process.returncode is None, self.log.read_text()[-3000:]
            assert asyncio.get_running_loop().time() < deadline, "the operator did not start within 60 s"
            await asyncio.sleep(0.05)

    async def kill(self) -> int:
        os.killpg(self.process.pid, signal.SIGKILL)
        return await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            await asyncio.wait_for(self.process.wait(), 30)


async def chaos(operator: OperatorProcess, kills: list[int]) -> None:
    for up, down in SCHEDULE:
        await asyncio.sleep(up)
        kills.append(await operator.kill())
        await asyncio.sleep(down)
        await operator.start()


async def play_the_cluster(c, kills: list[int]) -> None:
    """What the kubelet, the training operator and the trainers do about what the operator made, until every
    trainer has succeeded."""
    done: dict[str, set[str]] = {dataset: set() for dataset in DATASETS}
    while not all("succeeded" in steps for steps in done.values()):
        for dataset, steps in done.items():
            run, job = f"exp-{dataset}", f"exp-{dataset}-trainer"
            if "ready" not in steps and c.get(DEPLOYMENTS, f"{run}-rollout"):
                await c.rollout_ready(run)
                steps.add("ready")
            if c.get(JOBS, job) is None or "succeeded" in steps:
                continue
            if "running" not in steps:
                await c.report_progress(run, {"step": 5, "totalSteps": 10, "progressPercentage": 50.0,
                                                     "baseAccuracy": 0.25, "accuracy": 0.3})
                await c.job_conditions(job, condition("Running"))
                steps.add("running")
            elif dataset == RESTARTED and "restarting" not in steps:
                await c.job_conditions(job, condition("Restarting", reason="PyTorchJobRestarting"))
                steps.add("restarting")
            elif dataset == RESTARTED and "restarted" not in steps:
                # the training operator keeps the condition until the pod runs again; the operator counts it then
                if c.status(RUNS, run).get("restarts") == 1:
                    await c.job_conditions(job, condition("Running"))
                    steps.add("restarted")
            elif len(kills) >= SUCCEEDS_AFTER_KILLS[dataset]:
                await c.report_progress(run, {"step": 10, "totalSteps": 10, "progressPercentage": 100.0,
                                                     "baseAccuracy": 0.25, "accuracy": 0.5})
                await c.job_conditions(job, condition("Running"), condition("Succeeded"))
                steps.add("succeeded")
        await asyncio.sleep(0.05)


async def watch_uids(c, seen: dict[str, set[str]]) -> None:
    while True:
        for name, uid in c.children().items():
            seen.setdefault(name, set()).add(uid)
        await asyncio.sleep(0.02)


async def test_an_operator_killed_five_times_loses_nothing_and_duplicates_nothing(monkeypatch, tmp_path, s3_uri):
    async with cluster(monkeypatch, tmp_path) as c:
        operator = OperatorProcess(tmp_path / "operator.log")
        await operator.start()
        kills: list[int] = []
        seen: dict[str, set[str]] = {}
        watcher = asyncio.create_task(watch_uids(c, seen))
        try:
            await c.create_experiment(storage={"uri": s3_uri}, rollout={"backend": "service"}, maxParallelRuns=2,
                                      datasets=[{"name": name, "path": f"/data/{name}.json"} for name in DATASETS])
            await asyncio.wait_for(asyncio.gather(chaos(operator, kills), play_the_cluster(c, kills)), 180)
            await c.wait(lambda: c.phase("exp", EXPERIMENTS) == "Succeeded", "the experiment to succeed", timeout=60)
            await c.wait(lambda: c.status(EXPERIMENTS, "exp").get("accuracy") == 0.5, "the accuracies", timeout=30)
        finally:
            watcher.cancel()
            await operator.stop()
        assert kills == [-signal.SIGKILL] * len(SCHEDULE), "a kill found the operator already dead"

        expected = {f"{RUNS}/exp-{d}" for d in DATASETS} | {
            f"{kind}/exp-{d}-{suffix}" for d in DATASETS for kind, suffix in (
                ("v1/configmaps", "spec"), (DEPLOYMENTS, "rollout"), ("v1/services", "rollout"),
                ("networking.k8s.io/v1/networkpolicies", "rollout"), (JOBS, "trainer"))}
        assert set(c.children()) == expected, "a child is missing or unexpected"
        assert set(seen) == expected
        assert {name: uids for name, uids in seen.items() if len(uids) > 1} == {}, "an object was made again"
        status = c.status(EXPERIMENTS, "exp")
        assert [(d["name"], d["phase"], d["restarts"], d["accuracy"]) for d in status["datasets"]] == \
            [(d, "Succeeded", int(d == RESTARTED), 0.5) for d in DATASETS]
        assert (status["datasetsDone"], status["datasetsFailed"], status["progress"]) == (3, 0, 100.0)


async def test_an_operator_killed_between_deleting_a_failed_trainer_and_counting_it_still_counts_it(
        monkeypatch, tmp_path, s3_uri):
    """The narrowest window of the retry path: a trainer failed retryably, the operator deletes it to start a new
    one and records the restart. Killed the moment its DELETE reaches the API, the operator must still know after
    its restart that the run restarted once: scheduling.backoffLimit counts it, and the new trainer waits out the
    backoff like any other retry."""
    operator = OperatorProcess(tmp_path / "operator.log")
    delete, killed = KubeStandIn._delete, []

    def delete_and_kill_the_operator(self, resource, namespace, name):
        removed = delete(self, resource, namespace, name)
        if name == "exp-mmmu-trainer" and not killed:
            os.killpg(operator.process.pid, signal.SIGKILL)  # before the API answers it
            killed.append(name)
        return removed

    monkeypatch.setattr(KubeStandIn, "_delete", delete_and_kill_the_operator)
    async with cluster(monkeypatch, tmp_path) as c:
        await operator.start()
        try:
            await c.create_experiment(storage={"uri": s3_uri}, datasets=[{"name": "mmmu", "path": "/data/m.json"}])
            job = await c.wait(lambda: c.get(JOBS, "exp-mmmu-trainer"), "the trainer", timeout=30)
            await c.trainer_pod("exp-mmmu", 170, "s3 endpoint unreachable")
            failed_at = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
            await c.job_conditions("exp-mmmu-trainer", condition(
                "Failed", reason="PyTorchJobFailed", message="Job exp-mmmu-trainer has failed because it has reached "
                "the specified backoff limit", at=failed_at))
            await c.wait(lambda: killed, "the operator to delete the failed trainer", timeout=30)
            assert await operator.process.wait() == -signal.SIGKILL
            await operator.start()
            await c.wait(lambda: (c.get(JOBS, "exp-mmmu-trainer") or job)["metadata"]["uid"] != job["metadata"]["uid"],
                         "a new trainer", timeout=30)
            await asyncio.sleep(2)  # a few polls of the operator: what it has not counted by then, it never will
        finally:
            await operator.stop()
        status = c.status(RUNS, "exp-mmmu")
        assert {key: status.get(key) for key in ("restarts", "exitCode", "lastRestart")} == \
            {"restarts": 1, "exitCode": 170, "lastRestart": job["metadata"]["uid"]}, status
