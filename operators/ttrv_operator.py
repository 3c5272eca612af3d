"""The ttrv operator's kopf handlers: each calls the reconcile loop (reconcile.py: read the world, call a decision,
apply its plan) with the Context that the startup handler keeps in kopf's memo.

Run as `kopf run --standalone --all-namespaces -m operators.ttrv_operator` (the ttrv-operator chart does), or with
`--namespace=<ns>` per namespace for a namespaced install, and `--peering=<name>` instead of `--standalone` for more
than one replica. Configuration, from the environment:

    TTRV_KUEUE_ENABLED  true: runs with scheduling.queueName are Kueue's (queue label, created suspended, the
                        Workload's conditions read for Queued/Preempted); false: queueName is ignored
    TTRV_METRICS_PORT   Prometheus metrics port (default 9400)
    TTRV_TRAINER_API    the trainer's API for runs whose scheduling.trainerApi is auto: auto (default: TrainJob when
                        the API server serves trainer.kubeflow.org/v1alpha1 trainjobs, else PyTorchJob), trainjob
                        or pytorchjob. Decided once, at start, from API discovery, and logged (trainer_apis_discovered)
    TTRV_TRAINING_RUNTIME_KIND, TTRV_TRAINING_RUNTIME_NAME   the runtime TrainJobs reference (default
                        ClusterTrainingRuntime ttrv-trainer, the operator chart's)
    TTRV_POLL_SECONDS   how often each unfinished Experiment and AdaptationRun is reconciled and the progress
                        its trainer reported copied into the status columns (default 30)
    TTRV_LOG_LEVEL      structlog level (default info)
    TTRV_WATCH_NAMESPACES  the namespaces given with --namespace, comma-separated (empty: all): kopf then scans
                        neither namespaces nor CRDs, which would need cluster-wide rights (see `configure`)
    TTRV_PEERING_LIFETIME  seconds a replica's peering keep-alive counts (default 60; used with --peering)

The operator holds no object-store credentials and opens no connection a spec names: a run's trainer reports its
progress into its own AdaptationRun's status (`status.trainerProgress`, through the per-run ServiceAccount and Role
the operator creates), and the reconcile reads it from there (operators/progress.py).

Every reconcile reads the object and its children fresh from the API, so all entry points (create, update,
resume, the poll timer, a child's event) run the same level-triggered code, and nothing in this process's
memory matters: a restarted operator carries on from what the API shows. kopf keeps its own bookkeeping in
annotations (prefix ttrv.io), because the CRDs' structural schemas have no room for kopf's default `status.kopf`.

The API client and the configuration live in kopf's operator memo, not in module globals: the
startup handler puts them there, and kopf hands every handler a shallow copy of that memo (kopf 1.45.2:
`ResourceMemories.recall` makes each object's memo as `copy.copy(memobase)`, _core/reactor/inventory.py; "The
operator's memo is later used to populate per-resource memos. All keys and values are shallow-copied", docs/
memos.rst), so every handler reaches the same Context.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from typing import get_args

import kopf
import prometheus_client

from operators import metrics
from operators.conditions import Event
from operators.experiments import ACCEPTED_ANNOTATION
from operators.kube import Kube, KubeError
from operators.reconcile import Context, log_event, reconcile_experiment, reconcile_run
from ttrv import log
from ttrv.crds import GROUP, VERSION
from ttrv.labels import MANAGED_BY, RUN_LABEL
from ttrv.manifests import RUNTIME_NAME, TRAINER_APIS, TRAINER_KINDS, RuntimeRef, resolve_trainer_api
from ttrv.spec import EXPERIMENT_FINISHED, RUN_FINISHED, ExperimentPhase, RunPhase

POLL_SECONDS = float(os.environ.get("TTRV_POLL_SECONDS", "30"))
# The phases the metrics count: a run is Pending only in the model's default, before it exists (an AdaptationRun
# without a status counts as Queued), so that phase gets no gauge.
RUN_PHASES = tuple(phase for phase in get_args(RunPhase) if phase != "Pending")
EXPERIMENT_PHASES = get_args(ExperimentPhase)

logger = log.get_logger("ttrv.operator")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
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
    watched = [ns.strip() for ns in os.environ.get("TTRV_WATCH_NAMESPACES", "").split(",") if ns.strip()]
    if watched:
        # A namespaced install has no cluster-wide rights. kopf's scanning lists and watches Namespaces (to match
        # namespace patterns) and CRDs (to notice resources appear); without it kopf serves exactly the namespaces
        # named and the resources API discovery shows at start ("If disabled ... only the specific namespaces will
        # be served", kopf 1.45.2 _cogs/configs/configuration.py ScanningSettings; _core/reactor/observation.py).
        settings.scanning.disabled = True
    configure_peering(settings)
    selector = ",".join(f"{key}={value}" for key, value in MANAGED_BY.items())
    # Only the operator's own PyTorchJobs and Deployments stream in, not every one in the cluster.
    settings.watching.label_selectors["kubeflow.org", "v1", "pytorchjobs"] = selector
    settings.watching.label_selectors["trainer.kubeflow.org", "v1alpha1", "trainjobs"] = selector
    settings.watching.label_selectors["apps", "v1", "deployments"] = selector
    kueue = os.environ.get("TTRV_KUEUE_ENABLED", "false").strip().lower() in ("1", "true", "yes")
    port = int(os.environ.get("TTRV_METRICS_PORT", "9400"))
    server, _thread = prometheus_client.start_http_server(port)
    memo.metrics_server = server
    memo.kube = Kube.from_environment()
    served, auto, runtime = discover_trainer_apis(memo.kube)
    # No store reader: progress comes from each run's status, where its trainer reports it (operators/progress.py).
    memo.context = Context(memo.kube, None, kueue, post_event=_post_event,
                           trainer_apis=served, runtime=runtime, auto_api=auto)
    logger.info("operator_configured", kueue_enabled=kueue, metrics_port=server.server_port,
                poll_seconds=POLL_SECONDS)


def configure_peering(settings: kopf.OperatorSettings) -> None:
    """Replicas that peer (`kopf run --peering=<name>`) must not share a priority: kopf pauses every operator
    that sees a live peer of higher priority, and *all* of them when peers share the highest one ("Pausing all
    operators, including self", kopf 1.45.2 _core/engines/peering.py process_peering_event). So each replica takes
    a random priority here, before kopf starts peering (its watchers and keep-alives start only after the startup
    handlers: _core/reactor/running.py spawn_tasks, gated by started_flag): the highest live one acts, the others
    pause until its keep-alive lapses. A priority given with --priority is kept."""
    lifetime = os.environ.get("TTRV_PEERING_LIFETIME", "").strip()
    if lifetime:
        try:
            settings.peering.lifetime = int(lifetime)
        except ValueError:
            raise kopf.PermanentError(f"TTRV_PEERING_LIFETIME: {lifetime!r} is not a whole number of seconds; "
                                      "set the operator chart's peering.lifetime") from None
    if not settings.peering.standalone and settings.peering.priority == 0:
        settings.peering.priority = random.SystemRandom().randint(1, 2**31 - 1)
    logger.info("peering_configured", standalone=settings.peering.standalone, name=settings.peering.name,
                priority=settings.peering.priority, lifetime=settings.peering.lifetime)


def discover_trainer_apis(kube: Kube) -> tuple[frozenset[str], str | None, RuntimeRef]:
    """The training APIs the API server serves, the one runs asking `auto` get (TTRV_TRAINER_API), and the runtime
    TrainJobs reference. Asked once, at start: installing or removing a training operator needs an operator
    restart, which the missing-API condition of a run says."""
    requested = os.environ.get("TTRV_TRAINER_API", "auto").strip().lower() or "auto"
    if requested not in ("auto", *TRAINER_APIS):
        raise kopf.PermanentError(f"TTRV_TRAINER_API: {requested!r} is not auto, trainjob or pytorchjob; set the "
                                  "operator chart's trainer.api to one of them")
    kind = os.environ.get("TTRV_TRAINING_RUNTIME_KIND", "ClusterTrainingRuntime").strip()
    if kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise kopf.PermanentError(f"TTRV_TRAINING_RUNTIME_KIND: {kind!r} is not ClusterTrainingRuntime or "
                                  "TrainingRuntime; set the operator chart's trainer.runtime.kind")
    runtime = RuntimeRef(kind, os.environ.get("TTRV_TRAINING_RUNTIME_NAME", RUNTIME_NAME).strip() or RUNTIME_NAME)
    served = frozenset(api for api in TRAINER_APIS if kube.serves(TRAINER_KINDS[api]))
    choice = resolve_trainer_api(requested, served)
    (logger.info if choice else logger.warning)(
        "trainer_apis_discovered", served=sorted(served), requested=requested, auto_choice=choice,
        runtime_kind=runtime.kind, runtime_name=runtime.name)
    return served, None if requested == "auto" else requested, runtime


@kopf.on.cleanup()
def shut_down(memo: kopf.Memo, **_) -> None:
    if "kube" in memo:
        memo.kube.close()
    if "metrics_server" in memo:
        memo.metrics_server.shutdown()
        memo.metrics_server.server_close()


def _post_event(body: Mapping, event: Event) -> None:
    kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
    log_event(body, event)


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


# --- the reconciles ----------------------------------------------------------------------------------------------

def _experiment_unfinished(status: kopf.Status, **_) -> bool:
    return status.get("phase") not in EXPERIMENT_FINISHED


@kopf.on.resume(GROUP, VERSION, "experiments")
@kopf.on.create(GROUP, VERSION, "experiments")
@kopf.on.update(GROUP, VERSION, "experiments")
@kopf.timer(GROUP, VERSION, "experiments", interval=POLL_SECONDS, when=_experiment_unfinished)
def experiment(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    _handle(reconcile_experiment, memo, namespace, name)


def _run_unfinished(status: kopf.Status, **_) -> bool:
    return status.get("phase") not in RUN_FINISHED


@kopf.on.resume(GROUP, VERSION, "adaptationruns")
@kopf.on.create(GROUP, VERSION, "adaptationruns")
@kopf.on.update(GROUP, VERSION, "adaptationruns")
@kopf.timer(GROUP, VERSION, "adaptationruns", interval=POLL_SECONDS, when=_run_unfinished)
def adaptation_run(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    _handle(reconcile_run, memo, namespace, name)


@kopf.on.event("kubeflow.org", "v1", "pytorchjobs", labels=MANAGED_BY)
@kopf.on.event("trainer.kubeflow.org", "v1alpha1", "trainjobs", labels=MANAGED_BY)
@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
def child_changed(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_) -> None:
    """The training operator, Kueue or the kubelet changed a trainer or a rollout service: decide again now
    rather than at the next poll. (Event handlers are not retried; the poll timer is the safety net.)"""
    run = labels.get(RUN_LABEL)
    if run:
        _handle(reconcile_run, memo, namespace, run)


def _handle(reconcile: Callable[[Context, str, str], None], memo: kopf.Memo, namespace: str, name: str) -> None:
    """API failures become kopf retries: soon for conflicts and overload, later for the rest; a write the API
    server rejects as invalid is permanent for this attempt (the next change or poll tries afresh)."""
    try:
        reconcile(memo.context, namespace, name)
    except KubeError as error:
        if error.status == 422:
            raise kopf.PermanentError(str(error)) from None
        raise kopf.TemporaryError(str(error), delay=5 if error.status in (409, 429) or error.status >= 500
                                  else 60) from None
