"""The reconcile loop: read an object and its children, call its decision (experiments.py, runs.py), apply the plan.

One loop, three callers, each with a `Context` of its own: the kopf handlers (ttrv_operator.py: the cluster's API,
the object store, Events posted through kopf), `ttrv experiment run --local` (operators/local/: the local cluster's
in-memory API, the embedded object store, Events as log lines) and the scale bench (bench/operator_scale.py: an
in-memory API, simulated progress, Events counted). Nothing here keeps state between reconciles: every reconcile
reads the object and its children fresh, so every entry point (create, update, resume, the poll timer, a child's
event) runs the same level-triggered code, and a restarted operator carries on from what the API shows.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from operators import metrics
from operators.conditions import Event, Plan
from operators.experiments import Observed as ExperimentObserved
from operators.experiments import (
    decide_experiment,
    effective_shared_rollout,
    resolve_spec,
    unstarted_run_names,
)
from operators.progress import STATUS_FIELD, Progress, parse_progress, progress_from_status
from operators.runs import Observed as RunObserved
from operators.runs import (
    decide_run,
    desired_children,
    run_trainer_api,
    wants_pods,
    wants_progress,
    wants_workload,
)
from operators.trainers import finished
from ttrv.labels import COMPONENT_LABEL, EXPERIMENT_LABEL, JOB_UID_LABEL, RUN_LABEL, TRAINER
from ttrv.log import get_logger
from ttrv.manifests import PYTORCHJOB, TRAINER_KINDS, RuntimeRef, shared_rollout_name
from ttrv.spec import SpecError

logger = get_logger("ttrv.operator")


class Api(Protocol):
    """The few API calls a reconcile makes, on plain dicts: operators.kube.Kube against a cluster,
    operators.local.api.MemoryKube in memory."""

    def get(self, kind: str, namespace: str, name: str) -> dict | None: ...

    def list(self, kind: str, namespace: str, labels: Mapping[str, str | tuple[str, ...]]) -> list[dict]: ...

    def create(self, obj: Mapping) -> dict | None: ...

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping, status: bool = False) -> dict | None: ...

    def delete(self, kind: str, namespace: str, name: str) -> None: ...


def log_event(body: Mapping, event: Event) -> None:
    """An Event as one log line, wherever the reconcile runs (the operator also posts it to the API)."""
    (logger.warning if event.type == "Warning" else logger.info)(
        "event_posted", kind=body["kind"], name=body["metadata"]["name"], reason=event.reason, message=event.message)


class _Lock:
    """A threading.Lock that a WeakValueDictionary can hold (the builtin lock takes no weak references)."""

    __slots__ = ("lock", "__weakref__")

    def __init__(self):
        self.lock = threading.Lock()

    def __enter__(self):
        self.lock.acquire()

    def __exit__(self, *_):
        self.lock.release()


class Locks:
    """One lock per object: kopf runs timers, changes and child events of one object at once in its thread pool,
    and two reconciles of the same object must not interleave their writes. Weak values: a lock lives only while
    someone holds or waits for it, so the table does not grow with every object the operator has ever seen."""

    def __init__(self):
        self._locks: weakref.WeakValueDictionary[tuple[str, str, str], _Lock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()

    def __call__(self, kind: str, namespace: str, name: str) -> _Lock:
        with self._guard:
            lock = self._locks.get((kind, namespace, name))
            if lock is None:
                lock = self._locks[(kind, namespace, name)] = _Lock()
            return lock


@dataclass
class Context:
    """What a reconcile is given: its API client, its configuration, and its seams to the object store and to
    wherever Events go. Configuration and connections only, nothing a reconcile depends on remembering."""

    api: Api
    read_progress: Callable[[str, str | None], dict | None] | None
    """progress.json of the run stored at (storage uri, endpoint), or None (operators/progress.py). None (the
    cluster's operator): the progress the trainer reported into the run's status, and no store is touched."""
    kueue_enabled: bool = False
    post_event: Callable[[Mapping, Event], None] = log_event
    locks: Locks = field(default_factory=Locks)
    trainer_apis: frozenset[str] = frozenset({PYTORCHJOB})
    """The training APIs the API server serves (the operator asks at start: ttrv_operator.discover_trainer_apis)."""
    runtime: RuntimeRef = field(default_factory=RuntimeRef)
    """The training runtime every TrainJob references."""
    pinned_api: str | None = None
    """A trainer API every run uses, whatever it asks: the local stand-in, which runs either as local processes."""
    auto_api: str | None = None
    """The operator's choice for runs that ask `auto` (None: TrainJob when served, else PyTorchJob)."""


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- Experiments -------------------------------------------------------------------------------------------------

def reconcile_experiment(ctx: Context, namespace: str, name: str) -> None:
    api = ctx.api
    with ctx.locks("Experiment", namespace, name), metrics.reconciling("Experiment"):
        body = api.get("Experiment", namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return  # owner references take the runs and their children with it
        runs = api.list("AdaptationRun", namespace, {EXPERIMENT_LABEL: name})
        resolved = resolve_spec(body)
        wanted = unstarted_run_names(body, resolved[0], runs)
        if wanted:  # another experiment's run may hold one of those names (`a-b` + `c` and `a` + `b-c`)
            listed = {run["metadata"]["name"] for run in runs}
            runs += [run for run in api.list("AdaptationRun", namespace, {RUN_LABEL: wanted})
                     if run["metadata"]["name"] not in listed]
        shared = {}
        if resolved[0] is not None and resolved[0].rollout.shared:  # the experiment's one rollout service
            for obj in effective_shared_rollout(body["metadata"], resolved[0], ctx.kueue_enabled):
                found = api.get(obj["kind"], namespace, obj["metadata"]["name"])
                if found is not None:
                    shared[obj["kind"]] = found
        apply(ctx, body, decide_experiment(ExperimentObserved(body, runs, now(), resolved, shared,
                                                              ctx.kueue_enabled)))


# --- AdaptationRuns ----------------------------------------------------------------------------------------------

def reconcile_run(ctx: Context, namespace: str, name: str) -> None:
    api = ctx.api
    with ctx.locks("AdaptationRun", namespace, name), metrics.reconciling("AdaptationRun"):
        run = api.get("AdaptationRun", namespace, name)
        if run is None or run["metadata"].get("deletionTimestamp"):
            return
        trainer_api = run_trainer_api(run, ctx.trainer_apis, ctx.pinned_api, ctx.auto_api)
        try:
            wanted = desired_children(run, ctx.kueue_enabled, trainer_api, ctx.runtime)
        except SpecError:
            wanted = []  # decide_run reports the spec's problem in the run's status
        children = {}
        for obj in wanted:
            found = api.get(obj["kind"], namespace, obj["metadata"]["name"])
            if found is not None:
                children[obj["kind"]] = found
        job = children.get(TRAINER_KINDS[trainer_api]) if trainer_api else None
        pods = api.list("Pod", namespace, {RUN_LABEL: name, COMPONENT_LABEL: TRAINER}) if wants_pods(job) else ()
        workload = _workload(api, namespace, job) if wants_workload(job, ctx.kueue_enabled) else None
        progress = _progress(ctx, run, job) if wants_progress(run, job) else None
        rollout = ((run.get("spec") or {}).get("run") or {}).get("rollout") or {}
        shared = api.get("Deployment", namespace, shared_rollout_name(run["spec"]["experiment"])) \
            if rollout.get("shared") and job is None else None  # the trainer waits for the experiment's service
        before = (run.get("status") or {}).get("phase")
        plan = decide_run(RunObserved(run, now(), children, workload, pods, progress, ctx.kueue_enabled, wanted,
                                      ctx.trainer_apis, ctx.runtime, ctx.pinned_api, ctx.auto_api, shared))
        apply(ctx, run, plan)
    # The experiment's table and scheduling follow a run's phase at once; progress waits for its poll.
    if plan.status["phase"] != before:
        reconcile_experiment(ctx, namespace, run["spec"]["experiment"])


def _workload(api: Api, namespace: str, job: dict) -> dict | None:
    """The Kueue Workload of a PyTorchJob or TrainJob: Kueue labels it with the job's uid and makes the job its
    owner (the same for every integration: pkg/controller/jobframework)."""
    uid = job["metadata"].get("uid")
    for workload in api.list("Workload", namespace, {JOB_UID_LABEL: uid}):
        if any(ref.get("uid") == uid for ref in workload["metadata"].get("ownerReferences") or []):
            return workload
    return None


def _progress(ctx: Context, run: Mapping, job: Mapping) -> Progress | None:
    if ctx.read_progress is None:
        if finished(job):
            # The run was read before its trainer: the trainer's last report (sent before it exited) may have
            # come in between, and a finished run's progress is never read again. Read the run once more.
            meta = run["metadata"]
            run = ctx.api.get("AdaptationRun", meta["namespace"], meta["name"]) or run
        document = progress_from_status(run)
        uri = f"status.{STATUS_FIELD}"
    else:
        storage = run["spec"]["run"].get("storage") or {}
        uri = storage.get("uri") or (run.get("status") or {}).get("storeUri")
        try:
            document = ctx.read_progress(uri, storage.get("endpoint"))
        except Exception as error:  # noqa: BLE001 - an unreadable store must not stop the reconcile
            logger.warning("progress_unreadable", run=run["metadata"]["name"], store=uri, error=str(error))
            return None
    if document is None:
        return None
    progress = parse_progress(document)
    if progress.problems:
        logger.warning("progress_breaks_contract", run=run["metadata"]["name"], store=uri,
                       problems=list(progress.problems))
    return progress


# --- applying ----------------------------------------------------------------------------------------------------

def apply(ctx: Context, body: Mapping, plan: Plan) -> None:
    """A decision's plan, in this order: the object's status, the actions, the Events.

    The status first: it records what the actions are about to do (a restart counted, the failed trainer whose
    deletion starts the next one), so an operator killed between the two finds the record and redoes the
    actions; the other way round, the deleted trainer's restart would be forgotten. The actions go in the order
    the decision gave (an Experiment's accepted spec is recorded before any run is built from it)."""
    meta = body["metadata"]
    _write_status(ctx.api, body, plan.status)
    for action in plan.actions:
        if action.verb == "create":
            ctx.api.create(action.body)
        elif action.verb == "patch":
            ctx.api.patch(action.kind, meta["namespace"], action.name, action.body)
        else:
            ctx.api.delete(action.kind, meta["namespace"], action.name)
    for event in plan.events:
        ctx.post_event(body, event)


def _write_status(api: Api, body: Mapping, status: dict) -> None:
    """One merge patch of the whole status, only when it changed (a no-op reconcile writes nothing)."""
    current = body.get("status") or {}
    if {key: value for key, value in status.items() if value is not None} == \
            {key: value for key, value in current.items() if key in status}:
        return
    meta = body["metadata"]
    api.patch(body["kind"], meta["namespace"], meta["name"], {"status": status}, status=True)
