"""Produces the kubectl output shown in docs/operator.md: the real operator (kopf, operators.ttrv_operator) runs
against the tests' API stand-in (tests/kube_standin.py), the 16-dataset Kueue example is installed, the cluster's
other controllers are played by this script (Kueue, the training operator, the kubelet, the trainers' progress),
and the real kubectl reads the result: its tables are the stand-in's server-side rendering of the CRDs'
additionalPrinterColumns, as a real API server renders them.

    PYTHONPATH=. python docs/operator_demo.py      # needs kubectl on PATH

Ages are seconds: the whole demo takes a few.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("TTRV_POLL_SECONDS", "0.5")
os.environ["TTRV_KUEUE_ENABLED"] = "true"
os.environ["TTRV_METRICS_PORT"] = "0"

import kmock  # noqa: E402
import kopf  # noqa: E402
import yaml  # noqa: E402
from kube_standin import KubeStandIn, kubeconfig  # noqa: E402

import operators.ttrv_operator  # noqa: E402, F401 - kopf.operator runs the handlers this module registers

NS = "team-a"
JOBS, RUNS, DEPLOYMENTS = "kubeflow.org/v1/pytorchjobs", "ttrv.io/v1alpha1/adaptationruns", "apps/v1/deployments"
WORKLOADS = "kueue.x-k8s.io/v1beta1/workloads"
QUOTA = ("couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu in flavor h100, "
         "8 more needed")
PREEMPTED = "Preempted to accommodate a workload (UID: 5c1d6e0a) due to prioritization in the ClusterQueue"
PROGRESS = {
    "imagenet-a": {"stage": "finished", "progressPercentage": 100.0, "step": 10, "totalSteps": 10,
                   "weightVersion": 10, "checkpointStep": 10, "baseAccuracy": 0.412, "accuracy": 0.468},
    "imagenet-r": {"stage": "adapting", "progressPercentage": 60.0, "estimatedRemainingSeconds": 1920, "step": 6,
                   "totalSteps": 10, "weightVersion": 6, "checkpointStep": 6, "baseAccuracy": 0.538, "accuracy": 0.571},
    "imagenet-sketch": {"stage": "adapting", "progressPercentage": 30.0, "estimatedRemainingSeconds": 4480, "step": 3,
                        "totalSteps": 10, "weightVersion": 3, "checkpointStep": 2, "baseAccuracy": 0.297,
                        "accuracy": 0.305},
    "imagenet-v2": {"stage": "adapting", "progressPercentage": 40.0, "estimatedRemainingSeconds": 3900, "step": 4,
                    "totalSteps": 10, "weightVersion": 4, "checkpointStep": 4, "baseAccuracy": 0.602,
                    "accuracy": 0.611},
}


@kopf.on.login()
def login_to_the_standin(**kwargs):
    return kopf.login_with_kubeconfig(**kwargs)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(kind: str, status: bool = True, reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": now(), "lastUpdateTime": now()}


async def until(check, what: str, timeout: float = 30.0):
    for _ in range(int(timeout / 0.05)):
        value = check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError(what)


class Demo:
    def __init__(self, api: KubeStandIn):
        self.api = api

    def run_status(self, dataset: str) -> dict:
        return (self.api.get(RUNS, NS, f"sixteen-{dataset}") or {}).get("status") or {}

    async def job_status(self, dataset: str, *conditions: dict) -> None:
        await self.api.patch_object(JOBS, NS, f"sixteen-{dataset}-trainer", {"status": {
            "conditions": [condition("Created", reason="PyTorchJobCreated"), *conditions]}}, subresource="status")

    async def admit(self, dataset: str) -> None:
        """Kueue creates the trainer's Workload and admits it; the operator scales the rollout service up with it
        (gang admission) and the kubelet readies it."""
        await self.workload(dataset, condition("QuotaReserved", True, "QuotaReserved"),
                            condition("Admitted", True, "Admitted"))
        await self.api.patch_object(JOBS, NS, f"sixteen-{dataset}-trainer", {"spec": {"runPolicy": {"suspend": False}}})
        await self.job_status(dataset, condition("Running", reason="PyTorchJobRunning"))
        rollout = f"sixteen-{dataset}-rollout"
        await until(lambda: (self.api.get(DEPLOYMENTS, NS, rollout) or {}).get("spec", {}).get("replicas") == 1,
                    f"{dataset} rollout scaled up with its admitted trainer")
        await self.api.patch_object(DEPLOYMENTS, NS, rollout, {"status": {"readyReplicas": 1}}, subresource="status")
        # The trainer reports its progress into its run's status (ttrv/status_report.py's merge patch).
        await self.api.patch_object(RUNS, NS, f"sixteen-{dataset}", {"status": {
            "trainerProgress": json.dumps(PROGRESS[dataset])}}, subresource="status")

    async def workload(self, dataset: str, *conditions: dict) -> None:
        job = await until(lambda: self.api.get(JOBS, NS, f"sixteen-{dataset}-trainer"), f"{dataset} trainer")
        name = f"pytorchjob-sixteen-{dataset}-trainer-{job['metadata']['uid'][:5]}"
        if self.api.get(WORKLOADS, NS, name) is None:
            await self.api.put_object(WORKLOADS, {
                "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload", "metadata": {
                    "name": name, "namespace": NS, "labels": {"kueue.x-k8s.io/job-uid": job["metadata"]["uid"]},
                    "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                                         "name": job["metadata"]["name"], "uid": job["metadata"]["uid"],
                                         "controller": True}]},
                "spec": {"queueName": "gpu-a"}})
        await self.api.patch_object(WORKLOADS, NS, name, {"status": {"conditions": list(conditions)}},
                                    subresource="status")


def kubectl(server: str, *args: str) -> str:
    command = ["kubectl", "--server", server, "--cache-dir", tempfile.gettempdir() + "/ttrv-demo-kubectl", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr}")
    return result.stdout


async def main() -> None:
    experiment = yaml.safe_load((ROOT / "examples/experiment-sixteen-kueue.yaml").read_text())
    async with KubeStandIn() as api, kmock.Server(api) as server:
        api.declare_cluster()
        url = str(server.url).rstrip("/")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            handle.write(kubeconfig(url))
        os.environ["KUBECONFIG"] = handle.name
        stop, ready = asyncio.Event(), asyncio.Event()
        memo = kopf.Memo()
        task = asyncio.create_task(kopf.operator(clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready,
                                                 memo=memo))
        await asyncio.wait_for(ready.wait(), 10)
        demo = Demo(api)
        await api.put_object("ttrv.io/v1alpha1/experiments", experiment)
        for dataset in ("imagenet-a", "imagenet-r", "imagenet-sketch", "imagenet-v2"):
            await demo.admit(dataset)
        await until(lambda: demo.run_status("imagenet-v2").get("step") == 4, "progress")

        await demo.job_status("imagenet-a", condition("Running", False), condition("Succeeded",
                                                                                   reason="PyTorchJobSucceeded"))
        await until(lambda: api.get(DEPLOYMENTS, NS, "sixteen-caltech101-rollout"), "the fifth run")
        await demo.workload("caltech101", condition("QuotaReserved", False, "Pending", QUOTA))

        await demo.job_status("imagenet-sketch", condition("Restarting", reason="PyTorchJobRestarting",
                                                           message="PyTorchJob sixteen-imagenet-sketch-trainer is "
                                                                   "restarting because 1 Master replica(s) failed."))
        await until(lambda: demo.run_status("imagenet-sketch").get("restarts") == 1, "restart")
        await demo.job_status("imagenet-sketch", condition("Running", reason="PyTorchJobRunning"))

        await demo.workload("imagenet-v2", condition("QuotaReserved", False, "Pending", PREEMPTED),
                            condition("Evicted", True, "Preempted", PREEMPTED),
                            condition("Preempted", True, "InClusterQueue", PREEMPTED))
        await api.patch_object(JOBS, NS, "sixteen-imagenet-v2-trainer", {"spec": {"runPolicy": {"suspend": True}}})
        await demo.job_status("imagenet-v2", condition("Running", False, "PyTorchJobSuspended"),
                              condition("Suspended", True, "PyTorchJobSuspended"))

        await until(lambda: (demo.run_status("imagenet-v2").get("phase"),
                             demo.run_status("caltech101").get("reason"),
                             demo.run_status("imagenet-sketch").get("phase")) ==
                    ("Preempted", "QuotaPending", "Running"), "the final picture")
        await until(lambda: (api.get("ttrv.io/v1alpha1/experiments", NS, "sixteen")["status"]["datasets"][3]
                             ["phase"] == "Preempted"), "the experiment's table")
        await asyncio.sleep(1.5)  # kopf posts Events in the background

        for args in (["get", "experiments.ttrv.io", "-n", NS],
                     ["get", "adaptationruns", "-n", NS],
                     ["get", "adaptationruns", "-n", NS, "-o", "wide"],
                     ["describe", "experiments.ttrv.io", "sixteen", "-n", NS],
                     ["describe", "adaptationrun", "sixteen-imagenet-v2", "-n", NS]):
            output = await asyncio.to_thread(kubectl, url, *args)
            print(f"$ kubectl {' '.join(args)}\n{output}")
        stop.set()
        await asyncio.wait_for(task, 30)


if __name__ == "__main__":
    asyncio.run(main())
