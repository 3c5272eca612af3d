"""Reading a run's trainer (a PyTorchJob or a TrainJob), its pods and Kueue's Workload: whether it succeeded, runs,
is suspended or ran before, why it failed (the exit code of its pods, classed by ttrv.exitcodes) and why Kueue holds
it. Pure functions of the observed objects; operators/runs.py decides from what they say."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from operators.conditions import (
    condition,
    human_duration,
    is_true,
    parse_time,
)
from ttrv import exitcodes
from ttrv.labels import REPLICA_TYPE_LABEL
from ttrv.manifests import (
    TRAINER_CONTAINER,
    TRAINJOB_CONTAINER,
    TRAINJOB_REPLICATED_JOB,
)
from ttrv.manifests.trainjob import ROLLOUT_BACKOFF_LIMIT, ROLLOUT_REPLICATED_JOB

TRAINER = "PyTorchJob"  # the v1 kind; TRAINER_KINDS names both
# A PyTorchJob Failed condition without an exit code: the operator's own limits, which a retry may clear
_RETRYABLE_FAILURE_MARKERS = ("backoff limit", "deadline")


@dataclass(frozen=True)
class Exit:
    code: int
    message: str

    def describe(self) -> str:
        meaning = exitcodes.meaning(self.code)
        text = f"exit code {self.code}" + (f" ({meaning})" if meaning else "")
        return text + (f": {self.message.strip()}" if self.message.strip() else "")



def trainer_kind(job: Mapping | None) -> str:
    return (job or {}).get("kind") or TRAINER


def succeeded_condition(job: Mapping) -> dict | None:
    """The trainer's success condition: PyTorchJob Succeeded, TrainJob Complete (kubeflow/trainer
    pkg/apis/trainer/v1alpha1/trainjob_types.go TrainJobComplete, copied from the JobSet's Completed condition by
    pkg/runtime/framework/plugins/jobset/jobset.go Status)."""
    conditions = job.get("status", {}).get("conditions")
    kind = "Complete" if trainer_kind(job) == "TrainJob" else "Succeeded"
    return condition(conditions, kind) if is_true(conditions, kind) else None


def running(job: Mapping) -> bool:
    """PyTorchJob: its Running condition. A TrainJob has none (Suspended, Complete, Failed only): it runs while
    unsuspended with a ready child Job (status.jobsStatus[].ready counts Jobs whose pods are all ready or done)."""
    if trainer_kind(job) != "TrainJob":
        return is_true(job.get("status", {}).get("conditions"), "Running")
    # Only `node` counts: a run's JobSet may run its rollout job too (gang admission), ready before `node` starts.
    return not suspended(job) and not finished(job) and any(
        (entry.get("ready") or 0) > 0 for entry in job.get("status", {}).get("jobsStatus") or []
        if entry.get("name", TRAINJOB_REPLICATED_JOB) == TRAINJOB_REPLICATED_JOB)




def finished(job: Mapping) -> bool:
    return succeeded_condition(job) is not None or is_true(job.get("status", {}).get("conditions"), "Failed")


def suspended(job: Mapping) -> bool:
    if trainer_kind(job) == "TrainJob":
        return bool(job.get("spec", {}).get("suspend"))
    return bool(job.get("spec", {}).get("runPolicy", {}).get("suspend"))


def ran(job: Mapping, previous: Mapping) -> bool:
    """Whether a suspended trainer had started: a PyTorchJob keeps its Running condition (False) once it ran. A
    TrainJob's conditions do not tell (Suspended flips True/Resumed/True again, trainjob_controller.go
    setSuspendedCondition), so the run's own status does: it was Running, or Preempted already."""
    if trainer_kind(job) == "TrainJob":
        return previous.get("phase") in ("Running", "Preempted")
    return condition(job.get("status", {}).get("conditions"), "Running") is not None


def ready_replicas(deployment: Mapping | None) -> int:
    return (deployment or {}).get("status", {}).get("readyReplicas") or 0


def rollout_ready(deployment: Mapping | None) -> bool:
    return ready_replicas(deployment) >= 1


@dataclass(frozen=True)
class Failure:
    permanent: bool
    exit_code: int | None
    detail: str
    at: str | None

    def describe(self) -> str:
        return self.detail


def trainer_failure(job: Mapping, pods: Sequence[Mapping]) -> Failure:
    """Why a PyTorchJob failed: by the trainer's exit code when a pod still shows it; otherwise by the training
    operator's message (under ExitCode, a replica failure fails the job only for a permanent exit code)."""
    failed = condition(job.get("status", {}).get("conditions"), "Failed") or {}
    message = failed.get("message", "")
    exit_ = trainer_exit(pods, trainer_kind(job))
    if exit_ is not None:
        return Failure(not exitcodes.is_retryable(exit_.code), exit_.code, exit_.describe(),
                        failed.get("lastTransitionTime"))
    if trainer_kind(job) == "TrainJob" and any(
            entry.get("name") == ROLLOUT_REPLICATED_JOB and (entry.get("failed") or 0) > 0
            for entry in job.get("status", {}).get("jobsStatus") or []):
        # The run's rollout job (gang admission: ttrv.manifests.run_training_runtime) failed its pod's restarts,
        # and any failed Job fails the JobSet ("jobset failed due to one or more job failures", jobset
        # pkg/constants/constants.go FailedJobsMessage): the rollout service kept dying, retryable as the trainer's
        # ROLLOUT_UNAVAILABLE exit is.
        return Failure(False, None, f"the rollout service's pod kept failing (its Job's backoffLimit, "
                       f"{ROLLOUT_BACKOFF_LIMIT} restarts; its pod's log says why): {message}".rstrip(": "),
                       failed.get("lastTransitionTime"))
    retryable = any(marker in message for marker in _RETRYABLE_FAILURE_MARKERS)
    return Failure(not retryable, None, f"an unknown exit code ({message})" if message else "an unknown exit code",
                    failed.get("lastTransitionTime"))


# The Job controller labels each pod of an Indexed Job with its completion index (Kubernetes 1.28+); JobSet's
# node job is Indexed, and Trainer's torch plugin makes index 0 the master (PET_NODE_RANK from it).
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


def trainer_exit(pods: Sequence[Mapping], kind: str = TRAINER) -> Exit | None:
    """The trainer container's non-zero exit, master first: its code and termination message (the trainer writes
    /dev/termination-log; Kubernetes falls back to the log's tail)."""
    container = TRAINJOB_CONTAINER if kind == "TrainJob" else TRAINER_CONTAINER

    def master_first(pod: Mapping) -> int:
        labels = pod.get("metadata", {}).get("labels", {})
        master = labels.get(COMPLETION_INDEX_LABEL) == "0" if kind == "TrainJob" else \
            labels.get(REPLICA_TYPE_LABEL) == "master"
        return 0 if master else 1

    for pod in sorted(pods, key=master_first):
        for status in pod.get("status", {}).get("containerStatuses") or []:
            if status.get("name") != container:
                continue
            for state in (status.get("state"), status.get("lastState")):
                terminated = (state or {}).get("terminated")
                if terminated and terminated.get("exitCode"):
                    return Exit(int(terminated["exitCode"]), terminated.get("message") or "")
    return None


# Kueue makes a job's Workload within moments of its creation; none after this long means Kueue does not manage it.
NO_WORKLOAD_SECONDS = 120
KUEUE_FRAMEWORKS = {
    "TrainJob": "trainer.kubeflow.org/trainjob",
    # On by default in Kueue's shipped configuration up to v0.18; off from v0.19 (kubernetes-sigs/kueue#12606).
    "PyTorchJob": "kubeflow.org/pytorchjob",
}


def kueue_pending(workload: Mapping | None, queue: str | None, kind: str = TRAINER, job: Mapping | None = None,
                   now: datetime | None = None) -> tuple[str, str]:
    """Kueue says why a Workload waits in its QuotaReserved condition (reason Pending, or Inadmissible when the
    queue is missing or stopped), e.g. "couldn't assign flavors to pod set master: insufficient quota ..."."""
    reserved = condition((workload or {}).get("status", {}).get("conditions"), "QuotaReserved")
    if reserved is not None and reserved.get("status") == "False" and reserved.get("message"):
        reason = "Inadmissible" if reserved.get("reason") == "Inadmissible" else "QuotaPending"
        return reason, f"waiting for Kueue (LocalQueue {queue}): {reserved['message']}"
    created = parse_time((job or {}).get("metadata", {}).get("creationTimestamp"))
    if workload is None and created is not None and now is not None and \
            (now - created).total_seconds() >= NO_WORKLOAD_SECONDS:
        framework = KUEUE_FRAMEWORKS.get(kind, kind)
        since = " (off by default since Kueue v0.19: use scheduling.trainerApi trainjob)" if kind == "PyTorchJob" else ""
        return "NoKueueWorkload", (
            f"Kueue has made no Workload for {kind} {job['metadata']['name']} in "
            f"{human_duration((now - created).total_seconds())}: enable the {framework} integration in Kueue's "
            f"configuration (integrations.frameworks){since}, and check that LocalQueue {queue} exists")
    return "QuotaPending", f"the {kind} is suspended until Kueue admits it from LocalQueue {queue}"


def kueue_preemption(workload: Mapping | None) -> tuple[str, str]:
    """An evicted Workload carries Evicted (reason Preempted) and, with details, Preempted (reason InClusterQueue,
    InCohortReclamation, ...)."""
    conditions = (workload or {}).get("status", {}).get("conditions")
    for kind in ("Preempted", "Evicted"):
        found = condition(conditions, kind)
        if found is not None and found.get("status") == "True" and found.get("message"):
            return "Preempted", f"Kueue preempted the trainer: {found['message']}"
    return "Preempted", "Kueue suspended the trainer after it had started"


