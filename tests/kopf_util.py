"""The machinery of the kopf tests (tests/test_operator_kopf.py, tests/faults/test_operator_restart.py): the API
stand-in (kube_standin.py) served over HTTP with a kubeconfig for it, the controllers the tests play, and the real
operator module under kopf in the test's event loop.

The operator reads a run's progress only from the run's status, where the trainer reports it; the tests play the
trainer there (`Cluster.report_progress`: the merge patch of ttrv/status_report.py). The operator has no object
store at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from datetime import datetime, timezone

os.environ["TTRV_POLL_SECONDS"] = "0.5"  # read once, when the operator module registers its timers

import kmock  # noqa: E402
import kopf  # noqa: E402
from kube_standin import KubeStandIn, kubeconfig  # noqa: E402
from operator_fixtures import NS  # noqa: E402

import operators.ttrv_operator  # noqa: E402, F401 - kopf.operator runs the handlers this module registers

EXPERIMENTS = "ttrv.io/v1alpha1/experiments"
RUNS = "ttrv.io/v1alpha1/adaptationruns"
JOBS = "kubeflow.org/v1/pytorchjobs"
TRAINJOBS = "trainer.kubeflow.org/v1alpha1/trainjobs"
JOBS_OF = {"pytorchjob": JOBS, "trainjob": TRAINJOBS}
DEPLOYMENTS = "apps/v1/deployments"
PODS = "v1/pods"
WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"
EVENTS = "v1/events"
CHILDREN = ("v1/configmaps", DEPLOYMENTS, "v1/services", "networking.k8s.io/v1/networkpolicies", JOBS)


@kopf.on.login()
def login_to_the_standin(**kwargs):
    """In a cluster kopf logs in with the pod's service account; here, with the stand-in's kubeconfig."""
    return kopf.login_with_kubeconfig(**kwargs)


def metav1_condition(kind: str, reason: str, message: str = "", at: str | None = None, status: bool = True) -> dict:
    """A condition as metav1.Condition has it (TrainJob's): no lastUpdateTime, a reason required."""
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": at or now()}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: bool = True, reason: str = "", message: str = "", at: str | None = None) -> dict:
    stamp = at or now()
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": stamp, "lastUpdateTime": stamp}


class Cluster:
    """The stand-in, and the controllers (and trainers) the tests play. `trainer_api` is the one training API the
    stand-in serves (trainjob: Kubeflow Trainer v2's CRDs only; pytorchjob: the v1 training operator's only)."""

    def __init__(self, api: KubeStandIn, trainer_api: str = "pytorchjob"):
        self.api = api
        self.trainer_api = trainer_api
        self.jobs = JOBS_OF[trainer_api]
        self.progress: dict[str, dict] = {}
        self.api_url = ""  # the stand-in's HTTP address (cluster() sets it)

    async def report_progress(self, run: str, document: dict) -> None:
        """The run's trainer reports its progress document, as ttrv/status_report.py sends it: a merge patch of
        `trainerProgress` alone, to the run's status subresource. Later reports of the same run merge into the
        last document here, as the tests' updates read (the trainer itself sends whole documents)."""
        self.progress[run] = self.progress.get(run, {}) | document
        await self.api.patch_object(RUNS, NS, run, {"status": {"trainerProgress": json.dumps(self.progress[run])}},
                                    subresource="status")

    # reading
    def get(self, resource: str, name: str) -> dict | None:
        return self.api.get(resource, NS, name)

    def status(self, resource: str, name: str) -> dict:
        return (self.get(resource, name) or {}).get("status") or {}

    def phase(self, name: str, resource: str = RUNS) -> str | None:
        return self.status(resource, name).get("phase")

    def events(self, name: str) -> list[tuple[str, str, str]]:
        return [(e["type"], e["reason"], e["message"]) for e in self.api.items(EVENTS, NS)
                if e["involvedObject"]["name"] == name]

    def children(self) -> dict[str, str]:
        """Every child object by kind/name → uid."""
        return {f"{resource}/{obj['metadata']['name']}": obj["metadata"]["uid"]
                for resource in CHILDREN[:-1] + (self.jobs, RUNS) for obj in self.api.items(resource, NS)}

    async def wait_event(self, name: str, kind: str, reason: str) -> str:
        """kopf posts Events in the background: wait for one, return its message."""
        found = await self.wait(lambda: [m for t, r, m in self.events(name) if (t, r) == (kind, reason)],
                                f"a {kind} {reason} Event on {name}")
        return found[0]

    async def wait(self, check, what: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_phase(self, name: str, phase: str, resource: str = RUNS):
        await self.wait(lambda: self.phase(name, resource) == phase,
                        f"{name} to be {phase} (is {self.phase(name, resource)}: "
                        f"{self.status(resource, name).get('message')})")

    # writing, as users and controllers do
    async def create_experiment(self, name: str = "exp", **spec) -> dict:
        body = {"apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name, "namespace": NS},
                "spec": {"storage": {"uri": "s3://ttrv/experiments"},
                         "datasets": [{"name": "mmmu", "path": "/data/mmmu.json"},
                                      {"name": "shapes", "path": "/data/shapes.json"}]} | spec}
        return await self.api.put_object(EXPERIMENTS, body)

    async def edit_experiment(self, patch: dict) -> None:
        await self.api.patch_object(EXPERIMENTS, NS, "exp", {"spec": patch})

    async def job_conditions(self, job: str, *conditions: dict) -> None:
        """The training operator's view of its job (conditions as it sets them)."""
        await self.wait(lambda: self.get(JOBS, job), f"the job {job}")  # status is written before the actions
        await self.api.patch_object(JOBS, NS, job, {"status": {"conditions": [
            condition("Created", reason="PyTorchJobCreated"), *conditions]}}, subresource="status")

    # The training operator of either API, as the tests play it (trainer_* below work with the API served).
    async def trainer_running(self, job: str) -> None:
        """PyTorchJob: its Running condition. TrainJob: its JobSet's node Job ready (jobsStatus, as Kubeflow
        Trainer copies it from the JobSet: plugins/jobset/jobset.go Status); a TrainJob has no Running condition."""
        if self.trainer_api == "pytorchjob":
            await self.job_conditions(job, condition("Running", reason="PyTorchJobRunning"))
        else:
            await self._trainjob_status(job, [], ready=1)

    async def trainer_succeeded(self, job: str) -> None:
        if self.trainer_api == "pytorchjob":
            await self.job_conditions(job, condition("Running", False), condition("Succeeded"))
        else:  # the JobSet's Completed condition, copied as Complete
            await self._trainjob_status(job, [metav1_condition("Complete", "AllJobsCompleted", "jobset completed")],
                                        succeeded=1)

    async def trainer_failed(self, job: str, message: str, at: str | None = None) -> None:
        if self.trainer_api == "pytorchjob":
            await self.job_conditions(job, condition("Running", False), condition(
                "Failed", reason="PyTorchJobFailed", message=message, at=at))
        else:  # JobSet's FailedJobs condition, copied as Failed
            await self._trainjob_status(job, [metav1_condition("Failed", "FailedJobs", message, at)], failed=1)

    def suspended(self, job: str) -> bool:
        spec = self.get(self.jobs, job)["spec"]
        return spec["suspend"] if self.trainer_api == "trainjob" else spec["runPolicy"]["suspend"]

    async def kueue_suspend(self, job: str, suspend: bool) -> None:
        """Kueue admits a job by unsuspending it and preempts it by suspending it (its jobframework's
        Suspend/Unsuspend: spec.suspend of a TrainJob, runPolicy.suspend of a PyTorchJob); the training operator
        then stops or starts the pods."""
        if self.trainer_api == "pytorchjob":
            await self.api.patch_object(JOBS, NS, job, {"spec": {"runPolicy": {"suspend": suspend}}})
            if suspend:
                await self.job_conditions(job, condition("Running", False, "PyTorchJobSuspended"),
                                          condition("Suspended", True, "PyTorchJobSuspended"))
        else:
            await self.api.patch_object(TRAINJOBS, NS, job, {"spec": {"suspend": suspend}})
            if suspend:  # trainjob_controller.go setSuspendedCondition; the JobSet's Jobs suspended
                await self._trainjob_status(job, [metav1_condition("Suspended", "Suspended", "TrainJob is suspended")],
                                            suspended=1)

    async def _trainjob_status(self, job: str, conditions: list[dict], **counts) -> None:
        await self.wait(lambda: self.get(TRAINJOBS, job), f"the TrainJob {job}")
        jobs = {"name": "node", "ready": 0, "succeeded": 0, "failed": 0, "active": 0, "suspended": 0} | counts
        if counts.get("ready"):
            jobs["active"] = 1
        await self.api.patch_object(TRAINJOBS, NS, job, {"status": {"conditions": conditions, "jobsStatus": [jobs]}},
                                    subresource="status")

    async def trainer_pod(self, run: str, exit_code: int, message: str = "") -> None:
        """A trainer pod whose container exited (the kubelet's report)."""
        if self.trainer_api == "pytorchjob":
            name, container = f"{run}-trainer-master-0", "pytorch"
            labels = {"training.kubeflow.org/replica-type": "master"}
        else:  # JobSet's pod of node job 0, index 0; the container Kubeflow Trainer's torch plugin configures
            name, container = f"{run}-trainer-node-0-0-x7k2p", "node"
            labels = {"batch.kubernetes.io/job-completion-index": "0", "jobset.sigs.k8s.io/jobset-name": f"{run}-trainer"}
        await self.api.put_object(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": NS, "labels": {
                "ttrv.io/run": run, "app.kubernetes.io/component": "trainer"} | labels}, "spec": {"containers": []}})
        await self.api.patch_object(PODS, NS, name, {"status": {"phase": "Failed", "containerStatuses": [{
            "name": container, "state": {"terminated": {"exitCode": exit_code, "message": message}}}]}},
            subresource="status")

    async def rollout_ready(self, run: str, ready: int = 1) -> None:
        """The Deployment controller's view; a reconcile writes the run's status before it creates the
        Deployment, so a test that saw the phase waits for the object too."""
        await self.wait(lambda: self.get(DEPLOYMENTS, f"{run}-rollout"), f"the Deployment {run}-rollout")
        await self.api.patch_object(DEPLOYMENTS, NS, f"{run}-rollout", {"status": {"readyReplicas": ready}},
                                    subresource="status")


@contextlib.asynccontextmanager
async def cluster(monkeypatch, tmp_path, kueue: bool = False, trainer_api: str = "pytorchjob"):
    monkeypatch.setenv("TTRV_KUEUE_ENABLED", "true" if kueue else "false")
    monkeypatch.setenv("TTRV_METRICS_PORT", "0")
    async with KubeStandIn() as api, kmock.Server(api) as server:
        api.declare_cluster(trainer_apis=(trainer_api,))
        path = tmp_path / "kubeconfig.json"
        path.write_text(kubeconfig(str(server.url).rstrip("/")))
        monkeypatch.setenv("KUBECONFIG", str(path))
        world = Cluster(api, trainer_api)
        world.api_url = str(server.url).rstrip("/")
        yield world


@contextlib.asynccontextmanager
async def operator(world: Cluster, namespaces: tuple[str, ...] = (), peering: str | None = None):
    """The real operator module under kopf, in this event loop, until the block ends; yields the operator's memo
    (what its startup handler configured). With `namespaces`, kopf serves only those (`kopf run --namespace`);
    with `peering`, it peers through that peering object (`kopf run --peering`) instead of running standalone."""
    stop, ready = asyncio.Event(), asyncio.Event()
    memo = kopf.Memo()
    task = asyncio.create_task(kopf.operator(clusterwide=not namespaces, namespaces=namespaces,
                                             standalone=None if peering else True, peering_name=peering,
                                             stop_flag=stop, ready_flag=ready, memo=memo))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        yield memo
    finally:
        stop.set()
        if peering is None:
            await asyncio.wait_for(task, 15)
        else:
            # Observed with kopf 1.45.2 here: the acting replica's last peering PATCH (removing its keep-alive)
            # meets a connection the stand-in closed, and its retry waits to re-authenticate, which no longer
            # happens once the operator is stopping; its task then never ends. What the peering test checks is
            # over by then, so the task is cancelled after a grace period rather than awaited.
            done, _ = await asyncio.wait([task], timeout=5)
            if not done:
                task.cancel()  # not awaited: it does not end on cancellation either
