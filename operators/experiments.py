"""What to do about one Experiment, decided from what the API shows; no I/O here.

`decide_experiment(Observed) -> Plan`: the actions (record the spec to keep applying in the Experiment's
annotation, create or patch AdaptationRuns, in that order), the Experiment's whole status and the Events to post.

- Scheduling: one AdaptationRun per dataset, created in the order of `spec.datasets` while fewer than
  `maxParallelRuns` runs are active (not Succeeded or Failed); the others wait Pending, with no object yet. A
  failed dataset frees its slot like a finished one, so one failure never stops the others.
- Spec changes: the spec the operator applies is the last one it accepted, kept in the annotation
  `ttrv.io/accepted-spec` (so a restart of the operator knows it). A change of `maxParallelRuns` or `suspend`
  only is accepted; any other change is rejected as a whole (condition SpecChangeRejected names the fields) and
  the accepted spec stays in force until the spec matches it again: never half-applied.
- `suspend` reaches the runs through their `spec.suspend` (runs.py suspends their children).
- Names: a run is named `<experiment>-<dataset>`, which two experiments of one namespace can share (`a-b` with
  dataset `c`, `a` with dataset `b-c`). A dataset whose run name belongs to another experiment's run fails at
  once with reason RunNameConflict and the fix, instead of waiting forever on a create the API refuses; a run
  left by a deleted experiment of the same name is only waited for (garbage collection removes it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from operators.conditions import Action, Event, Plan, Want, set_conditions
from ttrv.crds import API_VERSION
from ttrv.labels import EXPERIMENT_LABEL
from ttrv.manifests import adaptation_run, resource_dump, run_name, shared_rollout
from ttrv.spec import EXPERIMENT_FINISHED, RUN_FINISHED, ExperimentSpec, SpecError, format_validation_error

ACCEPTED_ANNOTATION = "ttrv.io/accepted-spec"
MUTABLE_FIELDS = ("maxParallelRuns", "suspend")


@dataclass(frozen=True)
class Observed:
    experiment: Mapping
    runs: Sequence[Mapping]
    """AdaptationRuns of the experiment's namespace: those it owns (by uid) are its runs; any other holds a name
    (the handler lists its own runs and those named `unstarted_run_names`)."""
    now: datetime
    resolved: tuple | None = None
    """`resolve_spec(experiment)`, when the caller has it already; None: resolved here."""
    shared_rollout: Mapping[str, Mapping] = field(default_factory=dict)
    """The experiment's shared rollout objects that exist (rollout.shared), by kind."""
    kueue_enabled: bool = False
    """Kueue in the operator's configuration (TTRV_KUEUE_ENABLED): off, scheduling.queueName is ignored."""


def decide_experiment(observed: Observed) -> Plan:
    experiment = observed.experiment
    meta = experiment["metadata"]
    previous = dict(experiment.get("status") or {})
    generation = meta.get("generation")
    accepted, annotation, rejection, invalid = observed.resolved or resolve_spec(experiment)
    events: list[Event] = []
    if invalid is not None:
        status = _status_of_invalid(previous, invalid, observed.now, generation)
        if previous.get("message") != status["message"]:
            events.append(Event("Warning", "SpecInvalid", invalid))
        return Plan([], status, events)
    assert accepted is not None

    runs = {run["spec"]["dataset"]: run for run in observed.runs
            if _owned_by(run, meta.get("uid")) and "dataset" in (run.get("spec") or {})}
    taken = {run["metadata"]["name"]: run for run in observed.runs if not _owned_by(run, meta.get("uid"))}
    blocked = {d.name: _name_clash(meta["name"], d.name, taken) for d in accepted.datasets if d.name not in runs}
    blocked = {dataset: clash for dataset, clash in blocked.items() if clash is not None}
    active = [d.name for d in accepted.datasets if d.name in runs and _phase(runs[d.name]) not in RUN_FINISHED]
    slots = 0 if accepted.suspend else max(0, accepted.max_parallel_runs - len(active))

    create, patch = [], []
    for index, dataset in enumerate(accepted.datasets, start=1):
        run = runs.get(dataset.name)
        if dataset.name in blocked:
            continue
        if run is None and slots > 0:
            runs[dataset.name] = run = adaptation_run(meta, accepted, dataset.name)
            create.append(run)
            slots -= 1
            events.append(Event("Normal", "RunCreated", f"dataset {dataset.name} ({index} of "
                                f"{len(accepted.datasets)}): created AdaptationRun {run['metadata']['name']}"))
        elif run is not None and _phase(run) not in RUN_FINISHED and \
                bool(run["spec"].get("suspend")) != accepted.suspend:
            patch.append((run["metadata"]["name"], {"spec": {"suspend": accepted.suspend}}))
    rows = [blocked[d.name] if d.name in blocked else _row(d.name, runs.get(d.name), accepted,
                                                           len(active) + len(create)) for d in accepted.datasets]

    status = _status(previous, rows, accepted, rejection, observed.now, generation)
    events += _events(previous, status, rejection, annotation, experiment)
    actions = [] if annotation is None else [Action("patch", "Experiment", meta["name"], {
        "metadata": {"annotations": {ACCEPTED_ANNOTATION: annotation}}})]
    if accepted.rollout.shared:  # before the runs: their trainers wait for it
        wanted = effective_shared_rollout(meta, accepted, observed.kueue_enabled)
        actions += _shared_rollout_actions(wanted, accepted, runs, set(blocked), observed.shared_rollout)
    actions += [Action("create", "AdaptationRun", run["metadata"]["name"], run) for run in create]
    actions += [Action("patch", "AdaptationRun", name, body) for name, body in patch]
    return Plan(actions, status, events)


def effective_shared_rollout(meta: Mapping, accepted: ExperimentSpec, kueue_enabled: bool) -> list[dict]:
    """The experiment's shared rollout objects as they are built (`shared_rollout`): with Kueue off in the operator,
    scheduling.queueName is ignored, as for the runs' children (`runs.effective_run`): no queue label for a
    Kueue that would hold the service's pods back."""
    if not kueue_enabled and accepted.scheduling.queue_name:
        scheduling = accepted.scheduling.model_copy(update={"queue_name": None})
        accepted = accepted.model_copy(update={"scheduling": scheduling})
    return shared_rollout(meta, accepted)


def _shared_rollout_actions(wanted: list[dict], accepted: ExperimentSpec, runs: Mapping[str, Mapping],
                            blocked: set[str], existing: Mapping[str, Mapping]) -> list[Action]:
    """The experiment's one rollout service (rollout.shared): created before its first run, scaled to zero while
    the experiment is suspended, and deleted once no dataset is left unfinished (every run Succeeded or Failed)."""
    unfinished = [d.name for d in accepted.datasets
                  if d.name not in blocked and (d.name not in runs or _phase(runs[d.name]) not in RUN_FINISHED)]
    if not unfinished:
        return [Action("delete", obj["kind"], obj["metadata"]["name"]) for obj in wanted if obj["kind"] in existing]
    actions = [Action("create", obj["kind"], obj["metadata"]["name"], obj) for obj in wanted
               if obj["kind"] not in existing]
    deployment = existing.get("Deployment")
    replicas = 0 if accepted.suspend else 1
    if deployment is not None and deployment.get("spec", {}).get("replicas") != replicas:
        actions.append(Action("patch", "Deployment", deployment["metadata"]["name"], {"spec": {"replicas": replicas}}))
    return actions


def unstarted_run_names(experiment: Mapping, accepted: ExperimentSpec | None,
                        runs: Sequence[Mapping]) -> tuple[str, ...]:
    """Run names of the datasets of the spec in force (`resolve_spec`'s first value) with no run of this
    experiment among `runs` yet: what the handler must look up to learn which of those names another AdaptationRun
    holds already."""
    if accepted is None:
        return ()
    meta = experiment["metadata"]
    started = {run["spec"].get("dataset") for run in runs if _owned_by(run, meta.get("uid"))}
    return tuple(run_name(meta["name"], d.name) for d in accepted.datasets if d.name not in started)


# --- the spec in force ---------------------------------------------------------------------------------------

def resolve_spec(experiment: Mapping) -> tuple[ExperimentSpec | None, str | None, str | None, str | None]:
    """(spec in force, annotation to write or None, why the current spec was rejected, why no spec can run)."""
    meta = experiment["metadata"]
    stored = (meta.get("annotations") or {}).get(ACCEPTED_ANNOTATION)
    current, error = _validate(meta, experiment.get("spec"))
    if stored is None:
        if current is None:
            return None, None, None, error
        return current, canonical_json(current), None, None
    accepted, stored_error = _validate(meta, json.loads(stored))
    if accepted is None:  # written by this operator from a valid spec, so only a hand edit gets here
        return None, None, None, f"annotation {ACCEPTED_ANNOTATION} is not a valid spec: {stored_error}"
    if current is None:
        return accepted, None, f"the new spec is invalid ({error}); still applying the last accepted spec", None
    changed = spec_changes(resource_dump(accepted), resource_dump(current))
    if not changed:
        return accepted, None, None, None
    frozen = [path for path in changed if path.split(".")[0].split("[")[0] not in MUTABLE_FIELDS]
    if frozen:
        return accepted, None, (
            f"{', '.join(frozen)} cannot change while the experiment exists (only {', '.join(MUTABLE_FIELDS)} "
            "can); revert them, or delete and recreate the experiment. Still applying the last accepted spec"
        ), None
    return current, canonical_json(current), None, None


def _validate(meta: Mapping, document: Any) -> tuple[ExperimentSpec | None, str]:
    """The spec if it can run in the cluster: the models' rules and the builders' (an s3:// store, DNS names)."""
    try:
        spec = ExperimentSpec.model_validate(dict(document or {}))
        adaptation_run(meta, spec, spec.datasets[0].name)
    except ValidationError as error:
        return None, format_validation_error(error, "spec").replace("\n", "; ")
    except SpecError as error:
        return None, str(error)
    return spec, ""


def canonical_json(spec: ExperimentSpec) -> str:
    return json.dumps(resource_dump(spec), sort_keys=True, separators=(",", ":"))


def spec_changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two spec documents differ, e.g. ['datasets[1].path', 'grpo.lr']."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new)):
            changes += spec_changes(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return changes
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        changes = []
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            changes += spec_changes(a, b, f"{path}[{index}]")
        return changes
    return [] if old == new else [path or "(spec)"]


# --- status --------------------------------------------------------------------------------------------------

def _owned_by(run: Mapping, uid: str | None) -> bool:
    return any(ref.get("uid") == uid and ref.get("kind") == "Experiment" and ref.get("apiVersion") == API_VERSION
               for ref in run["metadata"].get("ownerReferences") or [])


def _name_clash(experiment: str, dataset: str, taken: Mapping[str, Mapping]) -> dict | None:
    """The status row of a dataset whose run name is held by an AdaptationRun this experiment does not own, or
    None when the name is free."""
    name = run_name(experiment, dataset)
    holder = taken.get(name)
    if holder is None:
        return None
    owner = (holder["metadata"].get("labels") or {}).get(EXPERIMENT_LABEL)
    if owner == experiment:
        return {"name": dataset, "phase": "Pending", "progress": 0.0, "step": 0, "restarts": 0,
                "message": f"waiting for AdaptationRun {name}, left by a deleted experiment of this name, to be "
                           "garbage-collected"}
    held_by = f"experiment {owner}" if owner else "an AdaptationRun this operator did not create"
    return {"name": dataset, "phase": "Failed", "progress": 0.0, "step": 0, "restarts": 0,
            "message": f"RunNameConflict: the run name {name} is taken by {held_by}; rename this experiment or "
                       f"dataset {dataset}, or install it in another namespace"}


def _phase(run: Mapping) -> str:
    return (run.get("status") or {}).get("phase") or "Queued"


def _row(dataset: str, run: Mapping | None, spec: ExperimentSpec, active: int) -> dict:
    if run is None:
        why = "the experiment is suspended" if spec.suspend else \
            f"waiting for a slot: {active} of {spec.max_parallel_runs} runs active (maxParallelRuns)"
        return {"name": dataset, "phase": "Pending", "progress": 0.0, "step": 0, "restarts": 0, "message": why}
    status = run.get("status") or {}
    phase = _phase(run)
    row = {
        "name": dataset,
        "run": run["metadata"]["name"],
        "phase": phase,
        "progress": status.get("progress") or 0.0,
        "step": status.get("step") or 0,
        "restarts": status.get("restarts") or 0,
    }
    # Why a run waits or failed; a plainly running or finished run needs no words in the table.
    if status.get("message") and status.get("reason") not in ("TrainerRunning", "TrainerSucceeded"):
        row["message"] = status["message"]
    for key in ("totalSteps", "eta", "weightVersion", "baseAccuracy", "accuracy"):
        if status.get(key) is not None:
            row[key] = status[key]
    return row


def _status(previous: Mapping, rows: list[dict], spec: ExperimentSpec, rejection: str | None, now: datetime,
            generation: int | None) -> dict:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["phase"]] = counts.get(row["phase"], 0) + 1
    total, done, failed = len(rows), counts.get("Succeeded", 0) + counts.get("Failed", 0), counts.get("Failed", 0)
    running = counts.get("Running", 0)
    if done == total:
        phase = "Succeeded" if not failed else "Failed" if failed == total else "PartiallySucceeded"
    elif spec.suspend:
        phase = "Suspended"
    elif running or done or counts.get("Preempted"):
        phase = "Running"
    else:
        phase = "Pending"
    summary = ", ".join(f"{counts[p]} {p.lower()}" for p in
                        ("Running", "Queued", "Preempted", "Suspended", "Pending", "Succeeded", "Failed") if counts.get(p))
    message = f"{summary} (at most {spec.max_parallel_runs} at once)"
    scored = [row for row in rows if row.get("baseAccuracy") is not None and row.get("accuracy") is not None]
    failures = [f"{row['name']}: {row.get('message', '')}" for row in rows if row["phase"] == "Failed"]
    wanted = [
        Want("Ready", not spec.suspend, "Suspended" if spec.suspend else "RunsScheduled", message),
        Want("Running", running > 0, "RunsRunning" if running else "NoRunRunning", message),
        Want("Succeeded", phase == "Succeeded", phase if done == total else "InProgress",
             message if phase == "Succeeded" else ""),
        Want("Failed", failed > 0, "DatasetsFailed" if failed else "NoFailure", "; ".join(failures)),
        Want("SpecChangeRejected", rejection is not None, "SpecChangeRejected" if rejection else "SpecAccepted",
             rejection or ""),
    ]
    status = {
        "phase": phase,
        "observedGeneration": generation,
        "datasetsTotal": total,
        "datasetsRunning": running,
        "datasetsDone": done,
        "datasetsFailed": failed,
        "progress": round(sum(100.0 if r["phase"] in RUN_FINISHED else r["progress"] for r in rows) / total, 2),
        "baseAccuracy": _mean([r["baseAccuracy"] for r in scored]),
        "accuracy": _mean([r["accuracy"] for r in scored]),
        "datasets": rows,
        "message": message,
        "conditions": set_conditions(previous.get("conditions") or [], wanted, now, generation),
    }
    return status


def _status_of_invalid(previous: Mapping, error: str, now: datetime, generation: int | None) -> dict:
    message = f"the spec cannot run: {error}"
    wanted = [Want("Ready", False, "SpecInvalid", message), Want("Running", False, "SpecInvalid", message),
              Want("Succeeded", False, "SpecInvalid", message), Want("Failed", True, "SpecInvalid", message)]
    return {"phase": "Failed", "observedGeneration": generation, "message": message,
            "conditions": set_conditions(previous.get("conditions") or [], wanted, now, generation)}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _events(previous: Mapping, status: Mapping, rejection: str | None, annotation: str | None,
            experiment: Mapping) -> list[Event]:
    events = []
    before = {row.get("name"): row for row in previous.get("datasets") or []}
    for row in status["datasets"]:
        old = before.get(row["name"], {}).get("phase")
        if row["phase"] == old:
            continue
        if row["phase"] == "Succeeded":
            scores = f": accuracy {row['baseAccuracy']:.3f} -> {row['accuracy']:.3f}" \
                if row.get("baseAccuracy") is not None and row.get("accuracy") is not None else ""
            events.append(Event("Normal", "DatasetSucceeded", f"dataset {row['name']} succeeded{scores}"))
        elif row["phase"] == "Failed":
            events.append(Event("Warning", "DatasetFailed", f"dataset {row['name']} failed: {row.get('message', '')}"))
    if status["phase"] != previous.get("phase") and status["phase"] in EXPERIMENT_FINISHED:
        events.append(Event("Normal" if status["phase"] == "Succeeded" else "Warning", f"Experiment{status['phase']}",
                            f"{status['datasetsDone'] - status['datasetsFailed']} of {status['datasetsTotal']} "
                            f"datasets succeeded"))
    was_rejected = any(c.get("type") == "SpecChangeRejected" and c.get("status") == "True"
                       for c in previous.get("conditions") or [])
    if rejection is not None and not was_rejected:
        events.append(Event("Warning", "SpecChangeRejected", rejection))
    stored = (experiment["metadata"].get("annotations") or {}).get(ACCEPTED_ANNOTATION)
    if annotation is not None and stored is not None:
        changed = spec_changes(json.loads(stored), json.loads(annotation))
        events.append(Event("Normal", "SpecChangeAccepted", f"applying the changed {', '.join(changed)}"))
    return events
