"""An experiment with a shared rollout service (rollout.shared), end to end through the operator's kopf handlers
against the API stand-in (see test_operator_kopf.py for what the stand-in and the tests play): the service is
created before any trainer, every run's trainer waits for it and then points at it, it outlives the first finished
run and is removed after the last; the experiment Succeeds."""

from __future__ import annotations

import pytest
from kopf_util import DEPLOYMENTS, EXPERIMENTS, RUNS, cluster, operator
from operator_fixtures import NS

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SHARED = "exp-shared-rollout"
KINDS = {"v1/configmaps": f"{SHARED}-spec", DEPLOYMENTS: SHARED, "v1/services": SHARED,
         "networking.k8s.io/v1/networkpolicies": SHARED}


def env_of(job: dict) -> dict:
    template = next(iter(job["spec"]["pytorchReplicaSpecs"].values()))["template"]
    return {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}


async def test_a_shared_rollout_serves_every_run_and_goes_after_the_last(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        await c.create_experiment(model={"lora": {"rank": 8}}, rollout={"backend": "service", "shared": True},
                                  maxParallelRuns=2)
        await c.wait(lambda: all(c.get(kind, name) for kind, name in KINDS.items()), "the shared rollout's objects")
        await c.wait_phase("exp-mmmu", "Queued")
        await c.wait_phase("exp-shapes", "Queued")
        await c.wait(lambda: "shared rollout service exp-shared-rollout has 0 of 1" in
                     c.status(RUNS, "exp-shapes").get("message", ""), "the run to wait for the shared service")
        assert c.get(c.jobs, "exp-mmmu-trainer") is None and c.get(c.jobs, "exp-shapes-trainer") is None
        assert c.get(DEPLOYMENTS, "exp-mmmu-rollout") is None  # no service of its own
        owner = c.get(DEPLOYMENTS, SHARED)["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("Experiment", "exp")
        runs_yaml = c.get("v1/configmaps", f"{SHARED}-spec")["data"]["runs.yaml"]
        assert "s3://ttrv/experiments/team-a/exp/mmmu" in runs_yaml and "maxLoras: 2" in runs_yaml
        policy = c.get("networking.k8s.io/v1/networkpolicies", SHARED)["spec"]
        assert policy["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "ttrv", "app.kubernetes.io/component": "trainer", "ttrv.io/experiment": "exp"}}}]

        await c.api.patch_object(DEPLOYMENTS, NS, SHARED, {"status": {"readyReplicas": 1}}, subresource="status")
        for run in ("exp-mmmu", "exp-shapes"):
            job = await c.wait(lambda r=run: c.get(c.jobs, f"{r}-trainer"), f"{run}'s trainer")
            assert env_of(job)["TTRV_ROLLOUT_URL"] == f"http://{SHARED}.{NS}.svc:8000"
        await c.trainer_running("exp-mmmu-trainer")
        await c.trainer_running("exp-shapes-trainer")
        await c.trainer_succeeded("exp-mmmu-trainer")
        await c.wait_phase("exp-mmmu", "Succeeded")
        assert c.get(DEPLOYMENTS, SHARED)["spec"]["replicas"] == 1  # exp-shapes still samples from it

        await c.trainer_succeeded("exp-shapes-trainer")
        await c.wait_phase("exp", "Succeeded", EXPERIMENTS)
        await c.wait(lambda: not any(c.get(kind, name) for kind, name in KINDS.items()),
                     "the shared rollout's removal after the last run")
