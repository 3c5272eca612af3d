"""The ttrv operator's kopf handlers: read the world, call a decision (experiments.py, runs.py), apply its plan.

Run as `kopf run --standalone --all-namespaces -m operators.ttrv_operator` (the ttrv-operator chart does).
Configuration, from the environment:

    TTRV_KUEUE_ENABLED  true: runs with scheduling.queueName are Kueue's (queue label, created suspended, the
                        Workload's conditions read for Queued/Preempted); false: queueName is ignored
    TTRV_METRICS_PORT   Prometheus metrics port (default 9400)
    TTRV_POLL_SECONDS   how often each unfinished Experiment and AdaptationRun is reconciled and its trainer's
                        progress.json read (default 30)
    TTRV_LOG_LEVEL      structlog level (default info)
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL   read access to the runs' object store

Every reconcile reads the object and its children fresh from the API, so all entry points (create, update,
resume, the poll timer, a child's event) run the same level-triggered code, and nothing in this process's
memory matters: a restarted operator carries on from what the API shows. kopf keeps its own bookkeeping in
annotations (prefix ttrv.io), because the CRDs' structural schemas have no room for kopf's default `status.kopf`.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import get_args

import kopf
import prometheus_client

from operators import metrics
from operators.experiments import ACCEPTED_ANNOTATION, decide_experiment, resolve_spec, unstarted_run_names
from operators.experiments import Observed as ExperimentObserved
from operators.kube import Kube, KubeError
from operators.progress import parse_progress, read_progress
from operators.runs import Observed as RunObserved
from operators.runs import decide_run, desired_children, wants_pods, wants_progress, wants_workload
from ttrv import log
from ttrv.crds import GROUP, VERSION
from ttrv.labels import COMPONENT_LABEL, EXPERIMENT_LABEL, JOB_UID_LABEL, MANAGED_BY, RUN_LABEL, TRAINER
from ttrv.spec import EXPERIMENT_FINISHED, RUN_FINISHED, ExperimentPhase, RunPhase, SpecError

POLL_SECONDS = float(os.environ.get("TTRV_POLL_SECONDS", "30"))
# The phases the metrics count: a run is Pending only in the model's default, before it exists (an AdaptationRun
# without a status counts as Queued), so that phase gets no gauge.
RUN_PHASES = tuple(phase for phase in get_args(RunPhase) if phase != "Pending")
EXPERIMENT_PHASES = get_args(ExperimentPhase)

logger = log.get_logger("ttrv.operator")


@dataclass
class Runtime:
    """What the handlers share: configuration and connections, nothing the reconciles depend on remembering."""

    kube: Kube
    kueue_enabled: bool
    read_progress: Callable[[str, str | None], dict | None]
    metrics_server: object | None = None


RUNTIME: Runtime | None = None


class _Lock:
    """A threading.Lock that a WeakValueDictionary can hold (the builtin lock takes no weak references)."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self):
        self.lock = threading.Lock()

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *_):
        self.lock.release()


# Timers, changes and child events of one object may run at once in kopf's thread pool: one lock per object
# keeps two reconciles of the same object from interleaving their writes. Weak values: a lock lives only while
# someone holds or waits for it, so the table does not grow with every object the operator has ever seen.
_LOCKS: weakref.WeakValueDictionary[tuple[str, str, str], _Lock] = weakref.WeakValueDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(kind: str, namespace: str, name: str) -> _Lock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get((kind, namespace, name))
        if lock is None:
            lock = _LOCKS[(kind, namespace, name)] = _Lock()
        return lock


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _runtime() -> Runtime:
    if RUNTIME is None:  # kopf runs the startup handler before any other, so only a bug gets here
        raise kopf.TemporaryError("the operator is not configured yet", delay=1)
    return RUNTIME


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    global RUNTIME
    log.configure()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration",
        # The operator writes it itself; seeing it as a change of the Experiment would only cost a reconcile.
        ignored_fields=[("metadata", "annotations", ACCEPTED_ANNOTATION)])
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.posting.reporting_component = "ttrv-operator"
    # A timer caught mid-reconcile when the operator stops gets this long to finish it (a reconcile takes tens
    # of milliseconds); kopf's default, ten event-loop cycles, orphans it, and the exit waits 5 s for it.
    settings.background.instant_exit_timeout = 1.0
    selector = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())
    # Only the operator's own PyTorchJobs and Deployments stream in, not every one in the cluster.
    settings.watching.label_selectors["kubeflow.org", "v1", "pytorchjobs"] = selector
    settings.watching.label_selectors["apps", "v1", "deployments"] = selector
    kueue = os.environ.get("TTRV_KUEUE_ENABLED", "false").strip().lower() in ("1", "true", "yes")
    port = int(os.environ.get("TTRV_METRICS_PORT", "9400"))
    server, _thread = prometheus_client.start_http_server(port)
    RUNTIME = Runtime(Kube.from_environment(), kueue, read_progress, server)
    logger.info("operator_configured", kueue_enabled=kueue, metrics_port=server.server_port,
                poll_seconds=POLL_SECONDS)


@kopf.on.cleanup()
def shut_down(**_) -> None:
    if RUNTIME is not None:
        RUNTIME.kube.close()
        if RUNTIME.metrics_server is not None:
            RUNTIME.metrics_server.shutdown()
            RUNTIME.metrics_server.server_close()


# --- indexes: what the metrics count -----------------------------------------------------------------------------

@kopf.index(GROUP, VERSION, "adaptationruns")
def run_phases(status: kopf.Status, **_) -> dict:
    return {status.get("phase") or "Queued": None}


@kopf.index(GROUP, VERSION, "experiments")
def experiment_phases(status: kopf.Status, **_) -> dict:
    return {status.get("phase") or "Pending": None}


# kopf updates its indexes before it calls the handlers of the same watch event, so these see every change.
@kopf.on.event(GROUP, VERSION, "adaptationruns")
async def count_runs(run_phases: kopf.Index, **_) -> None:
    metrics.set_phases("AdaptationRun", run_phases, RUN_PHASES)


@kopf.on.event(GROUP, VERSION, "experiments")
async def count_experiments(experiment_phases: kopf.Index, **_) -> None:
    metrics.set_phases("Experiment", experiment_phases, EXPERIMENT_PHASES)


# --- Experiments -------------------------------------------------------------------------------------------------

def _experiment_unfinished(status: kopf.Status, **_) -> bool:
    return status.get("phase") not in EXPERIMENT_FINISHED


@kopf.on.resume(GROUP, VERSION, "experiments")
@kopf.on.create(GROUP, VERSION, "experiments")
@kopf.on.update(GROUP, VERSION, "experiments")
@kopf.timer(GROUP, VERSION, "experiments", interval=POLL_SECONDS, when=_experiment_unfinished)
def experiment(namespace: str, name: str, **_) -> None:
    _handle(reconcile_experiment, namespace, name)


def reconcile_experiment(namespace: str, name: str) -> None:
    kube = _runtime().kube
    with _lock("Experiment", namespace, name), metrics.reconciling("Experiment"):
        body = kube.get("Experiment", namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # owner references take the runs and their children with it
        runs = kube.list("AdaptationRun", namespace, {EXPERIMENT_LABEL: name})
        resolved = resolve_spec(body)
        wanted = unstarted_run_names(body, resolved[0], runs)
        if wanted:  # another experiment's run may hold one of those names (`a-b` + `c` and `a` + `b-c`)
            listed = {run["metadata"]["name"] for run in runs}
            runs += [run for run in kube.list("AdaptationRun", namespace, {RUN_LABEL: wanted})
                     if run["metadata"]["name"] not in listed]
        plan = decide_experiment(ExperimentObserved(body, runs, _now(), resolved))
        # The accepted spec is recorded before anything is built from it.
        if plan.accepted_annotation is not None:
            kube.patch("Experiment", namespace, name,
                       {"metadata": {"annotations": {ACCEPTED_ANNOTATION: plan.accepted_annotation}}})
        for run in plan.create:
            kube.create(run)
        for run_name, patch in plan.patch:
            kube.patch("AdaptationRun", namespace, run_name, patch)
        _write_status("Experiment", body, plan.status)
        _post(body, plan.events)


# --- AdaptationRuns ----------------------------------------------------------------------------------------------

def _run_unfinished(status: kopf.Status, **_) -> bool:
    return status.get("phase") not in RUN_FINISHED


@kopf.on.resume(GROUP, VERSION, "adaptationruns")
@kopf.on.create(GROUP, VERSION, "adaptationruns")
@kopf.on.update(GROUP, VERSION, "adaptationruns")
@kopf.timer(GROUP, VERSION, "adaptationruns", interval=POLL_SECONDS, when=_run_unfinished)
def adaptation_run(namespace: str, name: str, **_) -> None:
    _handle(reconcile_run, namespace, name)


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=MANAGED_BY)
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
def child_changed(namespace: str, labels: kopf.Labels, **_) -> None:
    """The training operator, Kueue or the kubelet changed a trainer or a rollout service: decide again now
    rather than at the next poll. (Event handlers are not retried; the poll timer is the safety net.)"""
    run = labels.get(RUN_LABEL)
    if run:
        _handle(reconcile_run, namespace, run)


def reconcile_run(namespace: str, name: str) -> None:
    runtime = _runtime()
    kube = runtime.kube
    with _lock("AdaptationRun", namespace, name), metrics.reconciling("AdaptationRun"):
        run = kube.get("AdaptationRun", namespace, name)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return
        try:
            wanted = desired_children(run, runtime.kueue_enabled)
        except SpecError:
            wanted = []  # decide_run reports the spec's problem in the run's status
        children = {}
        for obj in wanted:
            found = kube.get(obj["kind"], namespace, obj["metadata"]["name"])
            if found is not None:
                children[obj["kind"]] = found
        job = children.get("PyTorchJob")
        pods = kube.list("Pod", namespace, {RUN_LABEL: name, COMPONENT_LABEL: TRAINER}) \
            if wants_pods(job) else ()
        workload = _workload(kube, namespace, job) if wants_workload(job, runtime.kueue_enabled) else None
        progress = _progress(runtime, run) if wants_progress(run, job) else None
        before = (run.get("status") or {}).get("phase")
        plan = decide_run(RunObserved(run, _now(), children, workload, pods, progress, runtime.kueue_enabled,
                                      wanted))
        # The status first: it records what the actions are about to do (a restart counted, the failed trainer
        # whose deletion starts the next one), so an operator killed between the two finds the record and redoes
        # the actions; the other way round, the deleted trainer's restart would be forgotten.
        _write_status("AdaptationRun", run, plan.status)
        for action in plan.actions:
            if action.verb == "create":
                kube.create(action.body)
            elif action.verb == "patch":
                kube.patch(action.kind, namespace, action.name, action.body)
            else:
                kube.delete(action.kind, namespace, action.name)
        _post(run, plan.events)
    # The experiment's table and scheduling follow a run's phase at once; progress waits for its poll.
    if plan.status["phase"] != before:
        reconcile_experiment(namespace, run["spec"]["experiment"])


def _workload(kube: Kube, namespace: str, job: dict) -> dict | None:
    """The Kueue Workload of a PyTorchJob: Kueue labels it with the job's uid and makes the job its owner."""
    uid = job["metadata"].get("uid")
    for workload in kube.list("Workload", namespace, {JOB_UID_LABEL: uid}):
        if any(ref.get("uid") == uid for ref in workload["metadata"].get("ownerReferences") or []):
            return workload
    return None


def _progress(runtime: Runtime, run: dict):
    storage = run["spec"]["run"].get("storage") or {}
    uri = storage.get("uri") or (run.get("status") or {}).get("storeUri")
    try:
        document = runtime.read_progress(uri, storage.get("endpoint"))
    except Exception as error:  # noqa: BLE001 - an unreadable store must not stop the reconcile
        logger.warning("progress_unreadable", run=run["metadata"]["name"], store=uri, error=str(error))
        return None
    if document is None:
        return None
    progress = parse_progress(document)
    if progress.problems:
        logger.warning("progress.json breaks the contract", run=run["metadata"]["name"], store=uri,
                       problems=list(progress.problems))
    return progress


# --- applying ----------------------------------------------------------------------------------------------------

def _handle(reconcile: Callable[[str, str], None], namespace: str, name: str) -> None:
    """API failures become kopf retries: soon for conflicts and overload, later for the rest; a write the API
    server rejects as invalid is permanent for this attempt (the next change or poll tries afresh)."""
    try:
        reconcile(namespace, name)
    except KubeError as error:
        if error.status == 422:
            raise kopf.PermanentError(str(error)) from None
        raise kopf.TemporaryError(str(error), delay=5 if error.status in (409, 429) or error.status >= 500
                                  else 60) from None


def _write_status(kind: str, body: dict, status: dict) -> None:
    """One merge patch of the whole status, only when it changed (a no-op reconcile writes nothing)."""
    current = body.get("status") or {}
    if {key: value for key, value in status.items() if value is not None} == \
            {key: value for key, value in current.items() if key in status}:
        return
    meta = body["metadata"]
    _runtime().kube.patch(kind, meta["namespace"], meta["name"], {"status": status}, status=True)


def _post(body: dict, events) -> None:
    for event in events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
        logger.log(logging.WARNING if event.type == "Warning" else logging.INFO, event.message,
                   kind=body["kind"], name=body["metadata"]["name"], reason=event.reason)
