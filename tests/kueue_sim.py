"""A Kueue simulation for the API stand-in (kube_standin.py), and the controllers behind it, for the gang-admission
test (tests/test_gang_admission.py).

In the test's event loop, next to the real operator under kopf, `GangCluster.step` plays, every TICK seconds:

- Kueue, with one ClusterQueue of `quota` GPUs: a Workload for each queued trainer (owned by it, labelled with its
  uid, one pod set per replicated job of its JobSet or per replica type of its PyTorchJob, as Kueue's trainjob,
  jobset and pytorchjob integrations make them: kueue pkg/controller/jobs/trainjob/trainjob_controller.go PodSets,
  jobs/jobset/jobset_controller.go PodSets), validated against Kueue's Workload CRD (../shared/k8s-crds). Pending
  Workloads are admitted in StrictFIFO order of creation (a Workload preempted in its ClusterQueue keeps its
  creation time: kueue pkg/workload/workload.go GetQueueOrderTimestamp) while the whole Workload fits the quota;
  admission writes QuotaReserved and Admitted with the pod sets' assignments and unsuspends the trainer. With
  `preempt_first`, a higher-priority Workload of another team arrives as the first run shows Running, takes the
  whole quota for FOREIGN seconds and so preempts that run (Evicted/Preempted conditions, the trainer suspended).
- Kubeflow Trainer with JobSet: an unsuspended TrainJob's JobSet creates its `rollout` Job's pod at once, the `node`
  Job's pods only once the rollout pod is ready (dependsOn Ready), and deletes every pod when suspended or complete;
  the TrainJob's jobsStatus and conditions as Trainer copies them.
- The v1 training operator: an unsuspended PyTorchJob's pods at once, deleted when it is suspended or has
  succeeded (cleanPodPolicy Running).
- The Deployment controller and the scheduler for the rollout Deployment: a pod while spec.replicas is 1, placed
  only where the GPUs outside the quota (`headroom`) allow; ready ROLLOUT_START seconds after it was placed.
- The trainer: it trains only while its pods run and its rollout pod is ready (`ttrv train` samples from it), and
  succeeds after TRAIN seconds of training.

What each object holds is recorded at every tick (`timeline`), for the test's invariants. What the simulation leaves
out: other flavors, cohorts, borrowing and priorities (one queue, one flavor); Kueue's own admission latency.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import yaml
from k8s_util import ROOT, trainjob_pod_template
from kopf_util import DEPLOYMENTS, JOBS, RUNS, TRAINJOBS, WORKLOADS, condition, metav1_condition
from kube_standin import KubeStandIn
from operator_fixtures import NS

TRAINING_RUNTIMES = "trainer.kubeflow.org/v1alpha1/trainingruntimes"
GPU = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TICK = 0.05
ROLLOUT_START = 0.3
TRAIN = 0.6
FOREIGN = 0.8
WORKLOAD_CRD = ROOT.parent / "shared" / "k8s-crds" / "kueue.x-k8s.io_workloads.yaml"


def declare_kueue(api: KubeStandIn) -> None:
    """Workloads validated against Kueue's own CRD (kube_standin declares the kind without a schema)."""
    api.declare_crd(yaml.safe_load(WORKLOAD_CRD.read_text()))


def _gpus(template: dict) -> int:
    return sum(int((c.get("resources") or {}).get("requests", {}).get(GPU, 0)) for c in template["spec"]["containers"])


@dataclass
class Pod:
    gpus: int
    since: float
    ready: bool = False


@dataclass
class Snapshot:
    at: float
    held: dict[str, int]
    """GPUs held by each run's pods (rollout and trainer together)."""
    in_quota: int
    """GPUs held by pods that Kueue counts (admitted Workloads' pods)."""
    outside_quota: int
    """GPUs held by pods Kueue does not count (a PyTorchJob run's rollout)."""
    training: set[str]
    admitted: set[str]
    foreign: int = 0
    """GPUs held by the preemptor, another team's Workload."""


@dataclass
class GangCluster:
    api: KubeStandIn
    trainer_api: str
    quota: int
    headroom: int = 0
    preempt_first: bool = False
    """Evict the Workload of the first run that trains, once, as a higher-priority arrival would."""
    timeline: list[Snapshot] = field(default_factory=list)
    rollout_pods: dict[str, Pod] = field(default_factory=dict)
    trainer_pods: dict[str, Pod] = field(default_factory=dict)
    trained: dict[str, float] = field(default_factory=dict)
    queued_at: dict[str, int] = field(default_factory=dict)
    """Each run's place in the queue: when its Workload was made."""
    foreign_until: float = 0.0
    foreign_done: bool = False
    """Until when the preemptor, another team's Workload, holds the whole quota."""
    preempted: set[str] = field(default_factory=set)
    log: list[str] = field(default_factory=list)

    @property
    def jobs(self) -> str:
        return TRAINJOBS if self.trainer_api == "trainjob" else JOBS

    # --- reading -------------------------------------------------------------------------------------------------

    def _run(self, job: dict) -> str:
        return job["metadata"]["name"].removesuffix("-trainer")

    def _suspended(self, job: dict) -> bool:
        spec = job["spec"]
        return bool(spec.get("suspend") if self.trainer_api == "trainjob" else spec["runPolicy"].get("suspend"))

    def _finished(self, job: dict) -> bool:
        done = ("Complete", "Failed") if self.trainer_api == "trainjob" else ("Succeeded", "Failed")
        return any(c["type"] in done and c["status"] == "True" for c in (job.get("status") or {}).get("conditions") or [])

    def _workload(self, job: dict) -> dict | None:
        uid = job["metadata"]["uid"]
        return next((w for w in self.api.items(WORKLOADS, NS)
                     if w["metadata"]["labels"].get("kueue.x-k8s.io/job-uid") == uid), None)

    def _phase(self, run: str) -> str | None:
        return ((self.api.get(RUNS, NS, run) or {}).get("status") or {}).get("phase")

    def _foreign(self) -> bool:
        """The preemptor runs FOREIGN seconds, and on until the operator has shown the preempted run Preempted (a
        real preemptor runs far longer than the operator takes to look)."""
        if not self.preempted or self.foreign_done:
            return False
        [run] = self.preempted
        self.foreign_done = time.monotonic() >= self.foreign_until and self._phase(run) == "Preempted"
        return not self.foreign_done

    @staticmethod
    def _reserved(workload: dict) -> bool:
        return any(c["type"] == "QuotaReserved" and c["status"] == "True"
                   for c in (workload.get("status") or {}).get("conditions") or [])

    def _pod_sets(self, job: dict) -> list[dict]:
        """The Workload's pod sets, one per replicated job of the TrainJob's JobSet (its runtime's jobs, `node` as the
        TrainJob makes it) or per replica type of the PyTorchJob."""
        if self.trainer_api == "pytorchjob":
            return [{"name": replica.lower(), "count": spec["replicas"], "template": spec["template"]}
                    for replica, spec in job["spec"]["pytorchReplicaSpecs"].items()]
        ref = job["spec"]["runtimeRef"]
        assert ref["kind"] == "TrainingRuntime", "a gang run references its own runtime"
        runtime = self.api.get(TRAINING_RUNTIMES, NS, ref["name"])
        sets = []
        for replicated in runtime["spec"]["template"]["spec"]["replicatedJobs"]:
            if replicated["name"] == "node":
                template = trainjob_pod_template(job, runtime)
                count = job["spec"]["trainer"]["numNodes"]
            else:
                template = replicated["template"]["spec"]["template"]
                count = replicated.get("replicas", 1) * replicated["template"]["spec"].get("parallelism", 1)
            sets.append({"name": replicated["name"], "count": count, "template": copy.deepcopy(template)})
        return sets

    @staticmethod
    def _workload_gpus(workload: dict) -> int:
        return sum(ps["count"] * _gpus(ps["template"]) for ps in workload["spec"]["podSets"])

    # --- one tick ------------------------------------------------------------------------------------------------

    async def step(self) -> None:
        jobs = {self._run(job): job for job in self.api.items(self.jobs, NS)}
        await self._kueue(jobs)
        jobs = {self._run(job): job for job in self.api.items(self.jobs, NS)}
        await self._controllers(jobs)
        self._record(jobs)

    async def _kueue(self, jobs: dict[str, dict]) -> None:
        pending = []
        used = 0
        for run, job in jobs.items():
            if QUEUE_LABEL not in job["metadata"].get("labels", {}):
                continue
            workload = self._workload(job)
            if workload is None:
                workload = await self.api.put_object(WORKLOADS, {
                    "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
                    "metadata": {"name": f"{job['kind'].lower()}-{job['metadata']['name']}", "namespace": NS,
                                 "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]},
                                 "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": job["kind"],
                                                      "name": job["metadata"]["name"], "uid": job["metadata"]["uid"],
                                                      "controller": True}]},
                    "spec": {"queueName": job["metadata"]["labels"][QUEUE_LABEL], "podSets": self._pod_sets(job)}})
            if self._finished(job):
                continue  # a finished job's Workload holds no quota
            if self._reserved(workload):
                if self.preempt_first and not self.preempted and self._phase(run) == "Running":
                    await self._evict(run, job, workload)
                else:
                    used += self._workload_gpus(workload)
            elif self._suspended(job):
                pending.append((self.queued_at.setdefault(run, len(self.log) + len(self.queued_at)), run, job,
                                workload))
        if self._foreign():  # the preemptor, admitted as it evicted a run above
            used += self.quota
        for _, run, job, workload in sorted(pending, key=lambda item: item[0]):
            need = self._workload_gpus(workload)
            if used + need > self.quota:
                break  # StrictFIFO: the head waits, and everything behind it
            used += need
            await self._admit(run, job, workload)

    async def _admit(self, run: str, job: dict, workload: dict) -> None:
        name = workload["metadata"]["name"]
        assignments = [{"name": ps["name"], "count": ps["count"], "flavors": {GPU: "default"},
                        "resourceUsage": {GPU: str(ps["count"] * _gpus(ps["template"]))}}
                       for ps in workload["spec"]["podSets"]]
        await self.api.patch_object(WORKLOADS, NS, name, {"status": {
            "admission": {"clusterQueue": "gpu", "podSetAssignments": assignments},
            "conditions": [metav1_condition("QuotaReserved", "QuotaReserved", "Quota reserved in ClusterQueue gpu"),
                           metav1_condition("Admitted", "Admitted", "The workload is admitted")]}},
            subresource="status")
        await self._suspend(job, False)
        self.log.append(f"admit {run}")

    async def _evict(self, run: str, job: dict, workload: dict) -> None:
        message = "Preempted to accommodate a workload (UID: 1234) due to prioritization in the ClusterQueue"
        await self.api.patch_object(WORKLOADS, NS, workload["metadata"]["name"], {"status": {
            "admission": None,
            "conditions": [metav1_condition("QuotaReserved", "Pending", message, status=False),
                           metav1_condition("Evicted", "Preempted", message),
                           metav1_condition("Preempted", "InClusterQueue", message)]}}, subresource="status")
        self.foreign_until = time.monotonic() + FOREIGN
        self.preempted.add(run)
        await self._suspend(job, True)
        self.log.append(f"preempt {run}")

    async def _suspend(self, job: dict, suspend: bool) -> None:
        name = job["metadata"]["name"]
        if self.trainer_api == "trainjob":
            await self.api.patch_object(TRAINJOBS, NS, name, {"spec": {"suspend": suspend}})
        else:
            await self.api.patch_object(JOBS, NS, name, {"spec": {"runPolicy": {"suspend": suspend}}})

    async def _controllers(self, jobs: dict[str, dict]) -> None:
        clock = time.monotonic()
        # The rollout Deployments of PyTorchJob runs (a TrainJob run has none): a pod while replicas is 1.
        for deployment in self.api.items(DEPLOYMENTS, NS):
            run = deployment["metadata"]["name"].removesuffix("-rollout")
            gpus = _gpus(deployment["spec"]["template"])
            if deployment["spec"]["replicas"] and run not in self.rollout_pods:
                outside = sum(p.gpus for r, p in self.rollout_pods.items())
                if outside + gpus <= self.headroom:  # else Pending: the scheduler finds no free GPU
                    self.rollout_pods[run] = Pod(gpus, clock)
            elif not deployment["spec"]["replicas"]:
                self.rollout_pods.pop(run, None)
            pod = self.rollout_pods.get(run)
            if pod is not None and not pod.ready and clock - pod.since >= ROLLOUT_START:
                pod.ready = True
            ready = int(pod is not None and pod.ready)
            if (deployment.get("status") or {}).get("readyReplicas", 0) != ready:
                await self.api.patch_object(DEPLOYMENTS, NS, deployment["metadata"]["name"],
                                            {"status": {"replicas": int(pod is not None), "readyReplicas": ready}},
                                            subresource="status")
        for run, job in jobs.items():
            if self.trainer_api == "trainjob":
                await self._jobset(run, job, clock)
            else:
                await self._pytorchjob(run, job, clock)

    async def _jobset(self, run: str, job: dict, clock: float) -> None:
        runtime = self.api.get(TRAINING_RUNTIMES, NS, job["spec"]["runtimeRef"]["name"])
        jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
        if self._suspended(job) or self._finished(job):
            self.rollout_pods.pop(run, None)
            self.trainer_pods.pop(run, None)
        else:
            if run not in self.rollout_pods:
                self.rollout_pods[run] = Pod(_gpus(jobs["rollout"]["template"]["spec"]["template"]), clock)
            rollout = self.rollout_pods[run]
            if not rollout.ready and clock - rollout.since >= ROLLOUT_START:
                rollout.ready = True
            # dependsOn [rollout Ready]: the node Job is created once the rollout Job is ready
            if rollout.ready and run not in self.trainer_pods:
                self.trainer_pods[run] = Pod(job["spec"]["trainer"]["numNodes"] *
                                             int(job["spec"]["trainer"]["resourcesPerNode"]["requests"][GPU]), clock,
                                             ready=True)
            await self._train(run, clock)
        status = job.get("status") or {}
        if self._finished(job):
            return
        entries = [{"name": name, "ready": int(bool(pod and pod.ready)), "succeeded": 0, "failed": 0,
                    "active": int(pod is not None), "suspended": int(self._suspended(job))}
                   for name, pod in (("rollout", self.rollout_pods.get(run)), ("node", self.trainer_pods.get(run)))]
        conditions = []
        if self.trained.get(run, 0) >= TRAIN:
            conditions = [metav1_condition("Complete", "AllJobsCompleted", "jobset completed")]
            entries[1].update(ready=0, active=0, succeeded=1)
            entries[0].update(ready=0, active=0)
            self.rollout_pods.pop(run, None)
            self.trainer_pods.pop(run, None)
        elif self._suspended(job):
            conditions = [metav1_condition("Suspended", "Suspended", "TrainJob is suspended")]
        if status.get("jobsStatus") != entries or \
                [c["type"] for c in status.get("conditions") or []] != [c["type"] for c in conditions]:
            await self.api.patch_object(TRAINJOBS, NS, job["metadata"]["name"],
                                        {"status": {"jobsStatus": entries, "conditions": conditions}},
                                        subresource="status")

    async def _pytorchjob(self, run: str, job: dict, clock: float) -> None:
        if self._finished(job):
            self.trainer_pods.pop(run, None)
            return
        name = job["metadata"]["name"]
        if self._suspended(job):
            if self.trainer_pods.pop(run, None) is not None:
                await self.api.patch_object(JOBS, NS, name, {"status": {"conditions": [
                    condition("Created", reason="PyTorchJobCreated"), condition("Running", False, "PyTorchJobSuspended"),
                    condition("Suspended", True, "PyTorchJobSuspended")]}}, subresource="status")
            return
        if run not in self.trainer_pods:
            replicas = job["spec"]["pytorchReplicaSpecs"].values()
            self.trainer_pods[run] = Pod(sum(r["replicas"] * _gpus(r["template"]) for r in replicas), clock,
                                         ready=True)
            await self.api.patch_object(JOBS, NS, name, {"status": {"conditions": [
                condition("Created", reason="PyTorchJobCreated"), condition("Running", reason="PyTorchJobRunning")]}},
                subresource="status")
        await self._train(run, clock)
        if self.trained.get(run, 0) >= TRAIN:
            self.trainer_pods.pop(run, None)
            await self.api.patch_object(JOBS, NS, name, {"status": {"conditions": [
                condition("Created", reason="PyTorchJobCreated"), condition("Running", False),
                condition("Succeeded", reason="PyTorchJobSucceeded")]}}, subresource="status")

    async def _train(self, run: str, clock: float) -> None:
        """The trainer advances one tick while its pods run and its rollout answers."""
        rollout = self.rollout_pods.get(run)
        if run in self.trainer_pods and rollout is not None and rollout.ready:
            self.trained[run] = self.trained.get(run, 0) + TICK

    def _record(self, jobs: dict[str, dict]) -> None:
        held: dict[str, int] = {}
        for pods in (self.rollout_pods, self.trainer_pods):
            for run, pod in pods.items():
                held[run] = held.get(run, 0) + pod.gpus
        outside = sum(p.gpus for p in self.rollout_pods.values()) if self.trainer_api == "pytorchjob" else 0
        foreign = self.quota if self._foreign() else 0
        admitted = {run for run, job in jobs.items()
                    if (w := self._workload(job)) is not None and self._reserved(w) and not self._finished(job)}
        training = {run for run in self.trainer_pods
                    if (r := self.rollout_pods.get(run)) is not None and r.ready}
        self.timeline.append(Snapshot(time.monotonic(), held, sum(held.values()) - outside + foreign, outside,
                                      training, admitted, foreign))
