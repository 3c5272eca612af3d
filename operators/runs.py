"""What to do about one AdaptationRun, decided from what the API shows; no I/O here.

`decide_run(Observed) -> Plan`: the children to create, patch or delete, the run's whole status, and the Events
to post. The reconcile loop (reconcile.py) reads the world, calls this, and applies the plan; everything the
next decision needs is in the API (the run's status included), so an operator restart loses nothing.

The rules, in the order they apply:

0. The trainer's API (run_trainer_api): the one the run's status names once chosen, else scheduling.trainerApi,
   `auto` read from what the API server serves (TrainJob first). A run whose API is not served waits in Queued,
   reason TrainerAPIMissing, with the fix in its message; nothing is created for it. TrainJob and PyTorchJob are
   read alike below (a TrainJob's Complete is a PyTorchJob's Succeeded, its spec.suspend runPolicy.suspend); the
   differences are noted where they matter.
1. A finished run stays finished: its PyTorchJob may be garbage-collected (ttlSecondsAfterFinished) and must not
   come back. Its rollout service stays at zero replicas, and a trainer the operator gave up on is deleted.
2. The trainer's end decides: PyTorchJob Succeeded → Succeeded; Failed with a permanent exit code (1-127, see
   ttrv/exitcodes.py) → Failed, with the trainer's exit code and termination message.
3. `spec.suspend` (set by the Experiment): rollout scaled to zero; the PyTorchJob suspended
   (runPolicy.suspend) or, when Kueue manages it, deleted, because Kueue unsuspends any suspended job whose
   Workload is admitted. Either way the pods get SIGTERM, the trainer checkpoints, and it resumes from its newest
   checkpoint later.
4. Retryable failures. A TrainJob's runtime fails its Job on the first non-zero exit (ttrv.manifests.training_runtime),
   so a TrainJob only ever fails whole and takes the path of a failed PyTorchJob below: a new one after a backoff. With `restartPolicy: ExitCode` the training operator restarts a replica that exits
   128-255 in place, but (v1.9) it never counts those restarts against runPolicy.backoffLimit
   (kubeflow/trainer#2045), so the operator keeps the budget: each restart it sees (a new Restarting condition)
   counts, and past `scheduling.backoffLimit` the run fails and its PyTorchJob is deleted. A PyTorchJob that
   failed for a retryable reason (a retryable exit code, or the training operator's own backoff or deadline)
   is deleted and created again after 30 s x 2^restarts (at most 10 min), within the same budget.
5. The trainer waits for the rollout service: the PyTorchJob is created only once the rollout Deployment reports
   a ready replica. (Creating it suspended and unsuspending it later would make the operator a third writer of
   runPolicy.suspend, next to Kueue and the user's `suspend`; creating it late leaves suspend to them.)
   Gang admission under Kueue (docs/operator.md): the rollout and the trainer are admitted and preempted as one.
   A TrainJob's JobSet runs the rollout pod itself (ttrv.manifests.run_training_runtime: one Workload, `node`
   started once `rollout` is Ready). A PyTorchJob is created at once, suspended, and its rollout Deployment, which
   Kueue does not manage, runs only while Kueue has the PyTorchJob admitted (unsuspended and unfinished): scaled to
   one on admission, to zero when Kueue suspends or preempts it or it ends; the run shows WaitingForRollout until
   the rollout is ready. The rollout's GPUs are then outside Kueue's quota: the ClusterQueue must leave room for
   them (docs/kubernetes.md).
6. A suspended PyTorchJob under Kueue is Queued (never ran: waiting for quota) or Preempted (ran, then Kueue took
   the quota back); the reason comes from the Kueue Workload's conditions when the operator may read them.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from operators.conditions import (
    Action,
    Event,
    Plan,
    Want,
    condition,
    human_duration,
    is_true,
    parse_time,
    rfc3339,
    set_conditions,
)
from operators.progress import Progress
from operators.trainers import (
    finished,
    kueue_pending,
    kueue_preemption,
    ran,
    ready_replicas,
    rollout_ready,
    running,
    succeeded_condition,
    suspended,
    trainer_exit,
    trainer_failure,
)
from ttrv.manifests import (
    PYTORCHJOB,
    TRAINER_KINDS,
    TRAINJOB,
    RuntimeRef,
    resolve_trainer_api,
    run_children,
    shared_rollout_name,
)
from ttrv.spec import RUN_FINISHED, AdaptationRunSpec, SpecError, parse_spec

RETRY_BASE_SECONDS = 30
RETRY_MAX_SECONDS = 600
TRAINER = "PyTorchJob"  # the v1 kind; TRAINER_KINDS names both
ROLLOUT = "Deployment"
# What the training operator writes into a Failed condition when it gave up for a reason other than an exit code
# (pkg/controller.v1/common/job.go): those failures are worth another PyTorchJob.


@dataclass(frozen=True)
class Observed:
    """What the handler read for one decision."""

    run: Mapping
    now: datetime
    children: Mapping[str, Mapping] = field(default_factory=dict)
    """The run's children that exist, by kind (ConfigMap, Deployment, Service, NetworkPolicy, PyTorchJob)."""
    workload: Mapping | None = None
    """The Kueue Workload of the PyTorchJob, when Kueue is enabled and the job is suspended."""
    pods: Sequence[Mapping] = ()
    """The trainer's pods, when the PyTorchJob failed or is restarting (for exit codes and messages)."""
    progress: Progress | None = None
    """The trainer's progress.json, while it runs and when it ends."""
    kueue_enabled: bool = False
    desired: Sequence[Mapping] | None = None
    """`desired_children(run, kueue_enabled, api)`, when the handler has built them already (None: built here)."""
    trainer_apis: frozenset[str] = frozenset({PYTORCHJOB})
    """The training APIs the API server serves (the operator's discovery at start)."""
    runtime: RuntimeRef = RuntimeRef()
    """The training runtime TrainJobs reference."""
    pinned_api: str | None = None
    """An API every run uses whatever it asks (the local stand-in runs either as local processes)."""
    auto_api: str | None = None
    """What runs that ask `auto` get (the operator's TTRV_TRAINER_API); None: TrainJob if served, else PyTorchJob."""
    shared_rollout: Mapping | None = None
    """The experiment's shared rollout Deployment (rollout.shared), read while the run has no trainer yet."""


# --- what the handler needs to read ------------------------------------------------------------------------------

def effective_run(run: Mapping, kueue_enabled: bool) -> dict:
    """The run as its children are built: with Kueue off in the operator, `scheduling.queueName` is ignored
    (no queue label, nothing created suspended for an admission that would never come)."""
    result = copy.deepcopy(dict(run))
    if not kueue_enabled:
        result.get("spec", {}).get("scheduling", {}).pop("queueName", None)
    return result


def desired_children(run: Mapping, kueue_enabled: bool, trainer_api: str | None = PYTORCHJOB,
                     runtime: RuntimeRef | None = None) -> list[dict]:
    """The run's children as the builders make them (names and kinds are what the handler reads); with no trainer
    API (none served), every child but the trainer."""
    children = run_children(effective_run(run, kueue_enabled), trainer_api or PYTORCHJOB, runtime)
    return children if trainer_api else [child for child in children if child["kind"] not in TRAINER_KINDS.values()]


def run_trainer_api(run: Mapping, served: frozenset[str], pinned: str | None = None,
                    auto: str | None = None) -> str | None:
    """The trainer API of a run: pinned, else the one its status records (a run never changes API midway), else
    scheduling.trainerApi, `auto` being the operator's choice `auto` when it made one. None when that API is not
    served."""
    if pinned:
        return pinned
    recorded = (run.get("status") or {}).get("trainerApi")
    if recorded in TRAINER_KINDS:
        return recorded if recorded in served else None
    requested = ((run.get("spec") or {}).get("scheduling") or {}).get("trainerApi") or "auto"
    return resolve_trainer_api(auto if requested == "auto" and auto else requested, served)


def _missing_api_message(run: Mapping, served: frozenset[str]) -> str:
    recorded = (run.get("status") or {}).get("trainerApi")
    requested = recorded or ((run.get("spec") or {}).get("scheduling") or {}).get("trainerApi") or "auto"
    served_text = " and ".join(TRAINER_KINDS[api] for api in sorted(served)) or "neither"
    if requested == "auto":
        return ("the API server serves no training API: install Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 "
                "TrainJob, with the operator chart's ClusterTrainingRuntime) or the v1 training operator "
                "(kubeflow.org/v1 PyTorchJob), then restart the ttrv operator, which looks when it starts")
    group = "trainer.kubeflow.org/v1alpha1 TrainJobs (Kubeflow Trainer v2)" if requested == TRAINJOB else \
        "kubeflow.org/v1 PyTorchJobs (the v1 training operator)"
    other = PYTORCHJOB if requested == TRAINJOB else TRAINJOB
    where = "the run's status records trainerApi" if recorded else "scheduling.trainerApi is"
    return (f"{where} {requested}, but the API server does not serve {group} (it serves {served_text}): install "
            f"it and restart the ttrv operator, or set scheduling.trainerApi: {other} or auto in the Experiment")


def wants_pods(job: Mapping | None) -> bool:
    conditions = (job or {}).get("status", {}).get("conditions")
    return is_true(conditions, "Failed") or is_true(conditions, "Restarting")


def wants_workload(job: Mapping | None, kueue_enabled: bool) -> bool:
    return kueue_enabled and job is not None and suspended(job)


def wants_progress(run: Mapping, job: Mapping | None) -> bool:
    """Progress is read while the trainer runs and once more as it ends (for the final accuracy)."""
    if (run.get("status") or {}).get("phase") in RUN_FINISHED or job is None:
        return False
    conditions = job.get("status", {}).get("conditions")
    return running(job) or finished(job) or is_true(conditions, "Restarting")


# --- the decision ------------------------------------------------------------------------------------------------

def decide_run(observed: Observed) -> Plan:
    run = observed.run
    previous = dict(run.get("status") or {})
    name = run["metadata"]["name"]
    try:
        spec = parse_spec(dict(run.get("spec") or {}), AdaptationRunSpec, f"AdaptationRun {name}: spec")
    except SpecError as error:
        # Only a hand edit gets here (the Experiment's schema and models vet what the operator creates).
        outcome = _Outcome("Failed", "SpecInvalid", str(error))
        return Plan([], _status(observed, None, previous, outcome), _events(previous, outcome))
    outcome = _decide(observed, spec, previous)
    return Plan(outcome.actions, _status(observed, spec, previous, outcome),
                outcome.events + _events(previous, outcome))


@dataclass
class _Outcome:
    phase: str
    reason: str
    message: str
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    updates: dict = field(default_factory=dict)  # status fields besides phase, reason and message


def _decide(o: Observed, spec: AdaptationRunSpec, previous: Mapping) -> _Outcome:
    api = run_trainer_api(o.run, o.trainer_apis, o.pinned_api, o.auto_api)
    built = o.desired if o.desired is not None else desired_children(o.run, o.kueue_enabled, api, o.runtime)
    desired = {obj["kind"]: obj for obj in built}
    kind = TRAINER_KINDS[api] if api else TRAINER
    job = o.children.get(kind)
    deployment = o.children.get(ROLLOUT)
    job_name = f"{o.run['metadata']['name']}-trainer"
    actions: list[Action] = []
    events: list[Event] = []

    def scale_rollout(replicas: int) -> None:
        if deployment is not None and deployment.get("spec", {}).get("replicas") != replicas:
            actions.append(Action("patch", ROLLOUT, deployment["metadata"]["name"], {"spec": {"replicas": replicas}}))

    def delete_job() -> None:
        actions.append(Action("delete", kind, job_name))

    def suspend_job(suspend: bool) -> None:
        body = {"spec": {"suspend": suspend}} if kind == "TrainJob" else {"spec": {"runPolicy": {"suspend": suspend}}}
        actions.append(Action("patch", kind, job_name, body))

    def done(phase: str, reason: str, message: str, **updates) -> _Outcome:
        return _Outcome(phase, reason, message, actions, events, ({"trainerApi": api} if api else {}) | updates)

    # 1. Finished runs stay finished.
    if previous.get("phase") in RUN_FINISHED:
        scale_rollout(0)
        if job is not None and not finished(job):
            delete_job()
        return done(previous["phase"], previous.get("reason", ""), previous.get("message", ""))

    # 0. No training API to run the trainer with: the fix, and nothing created (a rollout
    # service would hold GPUs for a trainer that cannot exist).
    if api is None:
        scale_rollout(0)
        return done("Queued", "TrainerAPIMissing", _missing_api_message(o.run, o.trainer_apis))

    # Children other than the trainer exist whatever happens next (the rollout Deployment starts at zero
    # replicas when the run is suspended: the builder reads spec.suspend).
    missing = [obj for child, obj in desired.items() if child != kind and child not in o.children]
    if missing:
        actions += [Action("create", obj["kind"], obj["metadata"]["name"], obj) for obj in missing]
        events.append(Event("Normal", "Created", "created " + ", ".join(
            f"{obj['kind']} {obj['metadata']['name']}" for obj in missing)))

    conditions = (job or {}).get("status", {}).get("conditions") or []
    resume_from = _resume_note(o, previous)

    # 2. The trainer's end decides.
    succeeded = succeeded_condition(job) if job is not None else None
    if succeeded is not None:
        scale_rollout(0)
        finished_at = succeeded.get("lastTransitionTime") or rfc3339(o.now)
        stopped = o.progress.stop_reason if o.progress is not None else None
        if stopped:  # the trainer stopped before its last epoch: the reason says why (ttrv/guard.py)
            return done("Succeeded", stopped, f"{kind} {job_name} succeeded; {_stop_note(o.progress)}",
                        completionTime=finished_at)
        return done("Succeeded", "TrainerSucceeded", f"{kind} {job_name} succeeded", completionTime=finished_at)
    failure = trainer_failure(job, o.pods) if job is not None and is_true(conditions, "Failed") else None
    if failure is not None and failure.permanent:
        scale_rollout(0)
        return done("Failed", "TrainerFailed", f"trainer failed with {failure.describe()}",
                    completionTime=failure.at or rfc3339(o.now), exitCode=failure.exit_code)

    managed = o.kueue_enabled and bool(spec.scheduling.queue_name)

    # 3. Suspended by the experiment.
    if spec.suspend:
        scale_rollout(0)
        if job is not None:
            if managed or failure is not None:
                delete_job()
            elif not suspended(job):
                suspend_job(True)
        return done("Suspended", "Suspended", f"the experiment is suspended; {resume_from} when it resumes")

    # Gang admission of a PyTorchJob and its rollout Deployment (a TrainJob's JobSet carries its rollout itself):
    # under Kueue the rollout runs only while Kueue has the trainer admitted, and gives its GPUs back whenever Kueue
    # suspends or preempts the trainer, or the trainer ends.
    gang = managed and kind == "PyTorchJob" and "Deployment" in desired
    admitted = job is not None and not suspended(job) and not finished(job)
    if "Deployment" in desired:
        scale_rollout(1 if admitted or not gang else 0)
    restarts = int(previous.get("restarts") or 0)
    limit = spec.scheduling.backoff_limit

    # 4a. A PyTorchJob that failed for a retryable reason: a new one after a backoff, within the budget.
    if failure is not None:
        uid = job["metadata"].get("uid")
        if previous.get("lastRestart") == uid:  # counted already; its deletion is under way
            delete_job()
            return done("Queued", "Retrying", f"deleting the failed {kind} {job_name} to start a new one")
        if restarts >= limit:
            scale_rollout(0)
            delete_job()
            return done("Failed", "RetriesExhausted",
                        f"trainer failed with {failure.describe()} after {restarts} restarts "
                        f"(scheduling.backoffLimit {limit})", completionTime=rfc3339(o.now),
                        exitCode=failure.exit_code)
        failed_at = parse_time(failure.at) or o.now
        due = failed_at + timedelta(seconds=retry_delay(restarts))
        if o.now < due:
            return done("Queued", "RetryBackoff",
                        f"trainer failed with {failure.describe()}; a new trainer starts in "
                        f"{human_duration((due - o.now).total_seconds())} (restart {restarts + 1} of {limit}) "
                        f"and {resume_from}", exitCode=failure.exit_code)
        delete_job()
        events.append(Event("Warning", "TrainerRetry",
                            f"trainer failed with {failure.describe()}; starting a new {kind} "
                            f"(restart {restarts + 1} of {limit})"))
        return done("Queued", "Retrying", f"starting a new trainer (restart {restarts + 1} of {limit}); "
                    f"{resume_from}", restarts=restarts + 1, lastRestart=uid, exitCode=failure.exit_code)

    # 4b. In-place restarts by the training operator: counted here, since it does not count them itself.
    restarting = condition(conditions, "Restarting") if is_true(conditions, "Restarting") else None
    if restarting is not None:
        stamp = restarting.get("lastTransitionTime") or restarting.get("lastUpdateTime") or ""
        updates: dict = {}
        if stamp != previous.get("lastRestart"):
            restarts += 1
            exit_ = trainer_exit(o.pods, kind)
            updates = {"restarts": restarts, "lastRestart": stamp}
            if exit_ is not None:
                updates["exitCode"] = exit_.code
            events.append(Event("Warning", "TrainerRestarted",
                                f"the training operator restarted the trainer"
                                f"{' after ' + exit_.describe() if exit_ else ''} (restart {restarts} of {limit})"))
        if restarts > limit:
            scale_rollout(0)
            delete_job()
            return done("Failed", "RetriesExhausted",
                        f"trainer restarted {restarts} times, more than scheduling.backoffLimit {limit}: "
                        f"{restarting.get('message', '')}".rstrip(": "), completionTime=rfc3339(o.now), **updates)
        return done("Running", "TrainerRestarting",
                    f"the training operator is restarting the trainer (restart {restarts} of {limit}); "
                    f"{resume_from}", **updates)

    # 5. No trainer yet: it waits for the rollout service (under Kueue a PyTorchJob does not: its rollout waits for
    # its admission instead).
    if job is None:
        shared = spec.run.rollout.shared  # (a shared rollout is a service: AdaptationSettings refuses it otherwise)
        rollout = o.shared_rollout if shared else deployment  # shared: the Experiment's, never scaled from here
        if (("Deployment" in desired and not gang) or shared) and not rollout_ready(rollout):
            ready = ready_replicas(rollout)
            name = shared_rollout_name(spec.experiment) if shared else desired["Deployment"]["metadata"]["name"]
            return done("Queued", "WaitingForRollout",
                        f"{'shared ' if shared else ''}rollout service {name} has {ready} of 1 replicas "
                        "ready; the trainer starts once it is ready")
        actions.append(Action("create", kind, job_name, desired[kind]))
        queued = f"; waiting for Kueue to admit it from LocalQueue {spec.scheduling.queue_name}" if managed else ""
        return done("Queued", "TrainerCreated", f"created {kind} {job_name}{queued}")

    # 6. A suspended trainer: resumed by the operator, or held by Kueue.
    if suspended(job):
        if not managed:
            suspend_job(False)
            return done("Queued", "Resuming", f"unsuspending {kind} {job_name}; {resume_from}")
        if ran(job, previous):  # it ran, and Kueue suspended it again
            reason, message = kueue_preemption(o.workload)
            return done("Preempted", reason, f"{message}; {resume_from} when Kueue admits it again")
        reason, message = kueue_pending(o.workload, spec.scheduling.queue_name, kind, job, o.now)
        return done("Queued", reason, message)

    # (A rollout restarting under a running trainer leaves the run Running: the trainer rides it out.)
    if gang and not rollout_ready(deployment) and previous.get("phase") != "Running":
        ready = ready_replicas(deployment)
        return done("Queued", "WaitingForRollout",
                    f"{kind} {job_name} is admitted; rollout service {desired['Deployment']['metadata']['name']} "
                    f"has {ready} of 1 replicas ready (the trainer waits for it)")
    if running(job):
        started = previous.get("startTime") or job.get("status", {}).get("startTime") or rfc3339(o.now)
        return done("Running", "TrainerRunning", f"{kind} {job_name} is running", startTime=started)
    if "TrainingRuntime" in desired:  # the JobSet starts `node` once its `rollout` job is Ready (dependsOn)
        return done("Queued", "WaitingForRollout", f"{kind} {job_name} is admitted; its JobSet starts the trainer "
                    "once its rollout job is ready")
    return done("Queued", "WaitingForPods", f"{kind} {job_name} is admitted; waiting for its pods to start")


_STOP_NOTES = {
    "EarlyStopped": "the votes stopped changing (grpo.earlyStop)",
    "MaxStepsReached": "its step budget is spent (budget.maxSteps)",
    "GpuHoursSpent": "its device-hour budget is spent (budget.gpuHours)",
    "CollapseGuard": "the collapse guard fired and rolled the weights back (guard)",
}


def _stop_note(progress: Progress) -> str:
    where = f" at step {progress.step}" if progress.step is not None else ""
    saved = f", {progress.steps_saved} steps saved" if progress.steps_saved else ""
    return f"adapting stopped{where}{saved}: {_STOP_NOTES[progress.stop_reason]}"


def retry_delay(restarts: int) -> int:
    """Seconds between a retryable failure and the next trainer: 30, 60, 120, ... at most 600."""
    return min(RETRY_BASE_SECONDS * 2 ** restarts, RETRY_MAX_SECONDS)


def _resume_note(o: Observed, previous: Mapping) -> str:
    step = o.progress.checkpoint_step if o.progress and o.progress.checkpoint_step is not None else \
        previous.get("checkpointStep")
    return f"the trainer resumes from its checkpoint at step {step}" if step else \
        "the trainer resumes from its newest checkpoint"


# --- status and events -------------------------------------------------------------------------------------------

_PROGRESS_FIELDS = {
    "percentage": "progress", "remaining_seconds": "estimatedRemainingSeconds", "step": "step",
    "total_steps": "totalSteps", "weight_version": "weightVersion", "checkpoint_step": "checkpointStep",
    "base_accuracy": "baseAccuracy", "accuracy": "accuracy", "stop_reason": "stopReason", "steps_saved": "stepsSaved",
}
_KEPT = ("trainerApi", "storeUri", "step", "totalSteps", "progress", "estimatedRemainingSeconds", "eta", "weightVersion",
         "checkpointStep", "baseAccuracy", "accuracy", "restarts", "lastRestart", "exitCode", "startTime",
         "completionTime", "stage", "evalPromptsDone", "evalPromptsTotal", "evalProgress", "stopReason", "stepsSaved")
# What the trainer is doing now: only meaningful while it runs.
_WHILE_RUNNING = ("estimatedRemainingSeconds", "eta", "stage", "evalPromptsDone", "evalPromptsTotal", "evalProgress")


def _status(o: Observed, spec: AdaptationRunSpec | None, previous: Mapping, outcome: _Outcome) -> dict:
    """The whole status: what the outcome decided, the trainer's progress, and the rest carried over. Keys set
    to None are removed by the merge patch, so stale values never linger."""
    status: dict = {key: previous.get(key) for key in _KEPT}
    status.update(step=status["step"] or 0, progress=status["progress"] or 0.0, restarts=status["restarts"] or 0)
    if spec is not None:
        status["storeUri"] = spec.run.storage.uri
    if o.progress is not None:
        for attribute, key in _PROGRESS_FIELDS.items():
            value = getattr(o.progress, attribute)
            if value is not None:
                status[key] = value
        if o.progress.stage is not None:
            # A trainer that reports its stage writes whole snapshots (operators/progress.py): the time left and
            # the evaluation's prompts it leaves out are unknown now, not unchanged (evaluating before adapting
            # has no time left yet, adapting no evaluation).
            status.update(stage=o.progress.stage, estimatedRemainingSeconds=o.progress.remaining_seconds,
                          evalPromptsDone=o.progress.eval_prompts_done,
                          evalPromptsTotal=o.progress.eval_prompts_total, evalProgress=o.progress.eval_progress)
        status["eta"] = None if status["estimatedRemainingSeconds"] is None else \
            human_duration(status["estimatedRemainingSeconds"])
    status.update(outcome.updates)
    if outcome.phase == "Succeeded":
        status["progress"] = 100.0
    if outcome.phase != "Running":
        status.update(dict.fromkeys(_WHILE_RUNNING))
    generation = o.run["metadata"].get("generation")
    running = outcome.phase == "Running"
    ready = (running and outcome.reason == "TrainerRunning") or outcome.phase == "Succeeded"
    finished = outcome.phase in RUN_FINISHED
    wanted = [
        Want("Ready", ready, outcome.reason, outcome.message),
        Want("Running", running, outcome.reason, outcome.message),
        Want("Succeeded", outcome.phase == "Succeeded", outcome.reason if finished else "InProgress",
             outcome.message if outcome.phase == "Succeeded" else ""),
        Want("Failed", outcome.phase == "Failed", outcome.reason if finished else "InProgress",
             outcome.message if outcome.phase == "Failed" else ""),
    ]
    status.update(
        phase=outcome.phase,
        reason=outcome.reason,
        message=outcome.message,
        observedGeneration=generation,
        conditions=set_conditions(previous.get("conditions") or [], wanted, o.now, generation),
    )
    return status


def _events(previous: Mapping, outcome: _Outcome) -> list[Event]:
    """One Event per change of phase (or of the reason for waiting), so `kubectl describe` tells the story."""
    if (previous.get("phase"), previous.get("reason")) == (outcome.phase, outcome.reason):
        return []
    kind = "Warning" if outcome.phase in ("Failed", "Preempted") else "Normal"
    return [Event(kind, outcome.reason or outcome.phase, outcome.message)]
