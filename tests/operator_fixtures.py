"""Objects as the API shows them to the operator, for the decision tests and the kopf tests: Experiments and
AdaptationRuns built by the real builders, and the children's statuses as the training operator (v1.9),
Kueue and the kubelet write them."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timedelta, timezone

from operators.conditions import rfc3339
from ttrv.manifests import adaptation_run
from ttrv.spec import ExperimentSpec

NS = "team-a"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
EXPERIMENT_UID = "0d6c4a0e-4a7b-4c39-9f0e-6a4b8f3c2d11"


def spec_document(**overrides) -> dict:
    document = {
        "storage": {"uri": "s3://ttrv/experiments"},
        "datasets": [{"name": "mmmu", "path": "/data/mmmu.json"}, {"name": "shapes", "path": "/data/shapes.json"}],
    }
    for key, value in overrides.items():
        document[key] = value
    return document


def experiment(spec: dict | None = None, *, name: str = "exp", status: dict | None = None,
               annotations: dict | None = None, generation: int = 1) -> dict:
    return {
        "apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment",
        "metadata": {"name": name, "namespace": NS, "uid": EXPERIMENT_UID, "generation": generation,
                     "annotations": dict(annotations or {})},
        "spec": copy.deepcopy(spec if spec is not None else spec_document()),
        **({"status": status} if status is not None else {}),
    }


def run_of(exp: dict, dataset: str, *, phase: str | None = None, status: dict | None = None,
           suspend: bool | None = None) -> dict:
    spec = ExperimentSpec.model_validate(exp["spec"])
    run = adaptation_run(exp["metadata"], spec, dataset)
    run["metadata"].update(uid=str(uuid.uuid5(uuid.NAMESPACE_DNS, run["metadata"]["name"])), generation=1)
    if suspend is not None:
        run["spec"]["suspend"] = suspend
    if phase is not None or status is not None:
        run["status"] = {"phase": phase} | (status or {}) if phase else dict(status or {})
    return run


def ago(seconds: float, now: datetime = NOW) -> str:
    return rfc3339(now - timedelta(seconds=seconds))


def cond(kind: str, status: bool = True, reason: str = "", message: str = "", at: str | None = None) -> dict:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "lastTransitionTime": at or ago(60), "lastUpdateTime": at or ago(60)}


def job(run: dict, *conditions: dict, suspend: bool = False, uid: str = "job-uid-1") -> dict:
    name = f"{run['metadata']['name']}-trainer"
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": NS, "uid": uid, "labels": {"ttrv.io/run": run["metadata"]["name"]}},
        "spec": {"runPolicy": {"suspend": suspend}},
        "status": {"conditions": [cond("Created", reason="PyTorchJobCreated"), *conditions]},
    }


def running() -> dict:
    return cond("Running", reason="PyTorchJobRunning", message="PyTorchJob is running.")


def succeeded(at: str | None = None) -> dict:
    return cond("Succeeded", reason="PyTorchJobSucceeded", message="PyTorchJob successfully completed.", at=at)


def failed(message: str = 'job "x" is failing because "Master" replica(s) failed.', at: str | None = None) -> dict:
    return cond("Failed", reason="PyTorchJobFailed", message=message, at=at)


def restarting(at: str) -> dict:
    return cond("Restarting", reason="PyTorchJobRestarting", message="job x is restarting because Master replica(s) failed.",
                at=at)


def deployment(run: dict, *, ready: int = 0, replicas: int = 1) -> dict:
    name = f"{run['metadata']['name']}-rollout"
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NS},
            "spec": {"replicas": replicas}, "status": {"readyReplicas": ready} if ready else {}}


def pod(exit_code: int, message: str = "", *, replica: str = "master") -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"trainer-{replica}-0", "namespace": NS,
                     "labels": {"training.kubeflow.org/replica-type": replica}},
        "status": {"phase": "Failed", "containerStatuses": [{
            "name": "pytorch", "state": {"terminated": {"exitCode": exit_code, "reason": "Error",
                                                        "message": message}}}]},
    }


def workload(*conditions: dict) -> dict:
    return {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
            "metadata": {"name": "pytorchjob-x-1a2b3", "namespace": NS}, "status": {"conditions": list(conditions)}}


QUOTA_MESSAGE = ("couldn't assign flavors to pod set master: insufficient unused quota for nvidia.com/gpu in flavor "
                 "h100, 8 more needed")
PREEMPT_MESSAGE = ("Preempted to accommodate a workload (UID: 5c1d) due to prioritization in the ClusterQueue")
