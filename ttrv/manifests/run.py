"""One dataset's AdaptationRun from its Experiment, and the objects the run owns, composed from the builders per
kind."""


from __future__ import annotations

import json
from collections.abc import Mapping

from ttrv.crds import API_VERSION
from ttrv.manifests.access import progress_access
from ttrv.manifests.common import (
    PYTORCHJOB,
    TRAINER_APIS,
    TRAINJOB,
    RuntimeRef,
    _Context,
    _metadata,
    _require_cluster_store,
    _spec_config_map,
    labels,
    resolve_trainer_api,
    resource_dump,
    run_name,
    run_store_uri,
)
from ttrv.manifests.pytorchjob import _trainer_job
from ttrv.manifests.rollout import (
    _rollout_deployment,
    _rollout_network_policy,
    _rollout_service,
    shared_rollout,
)
from ttrv.manifests.trainjob import _train_job, run_training_runtime
from ttrv.spec import (
    AdaptationRunSpec,
    ExperimentSpec,
    SpecError,
    check_dns_label,
    parse_spec,
)
from ttrv.spec.names import check_dns1035_label, check_label_key, check_label_value, check_object_name


def adaptation_run(experiment_meta: Mapping, spec: ExperimentSpec, dataset: str) -> dict:
    """The AdaptationRun of one dataset of an Experiment (`experiment_meta`: its metadata: name, namespace, uid)."""
    experiment = experiment_meta.get("name", "")
    check_dns_label(experiment, "metadata.name")
    namespace = experiment_meta.get("namespace") or "default"
    _require_cluster_store(spec)
    store = run_store_uri(spec.storage.uri, namespace, experiment, dataset)
    body = AdaptationRunSpec(
        experiment=experiment,
        dataset=dataset,
        run=spec.run_spec(dataset, storage_uri=store),
        image=spec.image,
        scheduling=spec.scheduling,
        s3_secret=spec.s3_secret,
        volumes=spec.volumes,
        pod=spec.pod,
        suspend=spec.suspend,
    )
    name = run_name(experiment, dataset)
    # The run's name begins its children's names, among them Services (the rollout's, and the training operator's
    # `<job>-master-0`), whose names must be DNS-1035 labels: a name that starts with a digit is refused here, at
    # admission, rather than by the API server when the run creates its Service.
    check_dns1035_label(experiment, "metadata.name",
                        f"; it begins the names of its runs' Services (here {name}-rollout); rename the experiment "
                        f"to start with a letter, e.g. 'exp-{experiment}'")
    owner = {"apiVersion": API_VERSION, "kind": "Experiment", "metadata": experiment_meta}
    run = {
        "apiVersion": API_VERSION,
        "kind": "AdaptationRun",
        "metadata": _metadata(name, namespace, labels(experiment, name, dataset), owner),
        "spec": resource_dump(body),
    }
    check_names([run])
    return run


def check_names(objects: list[Mapping]) -> list[Mapping]:
    """Each object's name valid for its kind, its labels' keys and values valid (ttrv.spec.names' rules): every
    name here is derived from the experiment's, the datasets' and the scheduling fields, so a failure names the
    object and the fix is to the field it came from."""
    for obj in objects:
        kind, metadata = obj["kind"], obj["metadata"]
        where = f"{kind} {metadata['name']!r}"
        check_object_name(kind, metadata["name"], f"{where}: metadata.name",
                          "; shorten or rename the experiment or dataset it is derived from")
        for key, value in metadata.get("labels", {}).items():
            check_label_key(key, f"{where}: label")
            check_label_value(value, f"{where}: label {key}")
    return list(objects)


def run_children(run: Mapping, trainer_api: str = PYTORCHJOB, runtime: RuntimeRef | None = None) -> list[dict]:
    """Every object an AdaptationRun owns; the rollout service only when the run samples from one (with a TrainJob,
    the rollout pod runs in the TrainJob's JobSet, from the run's own TrainingRuntime, not in a Deployment).

    `run` is the AdaptationRun as a mapping: a dict, or the body kopf hands to a handler. `trainer_api` (trainjob
    or pytorchjob, already resolved: see resolve_trainer_api) picks the trainer's kind; a TrainJob references
    `runtime` (default: the operator chart's ClusterTrainingRuntime).
    """
    name = run["metadata"]["name"]
    document = run.get("spec")
    document = dict(document) if isinstance(document, Mapping) else document
    spec = parse_spec(document, AdaptationRunSpec, f"AdaptationRun {name}: spec")
    ctx = _Context(run, spec)
    children = [_spec_config_map(ctx)]
    # shared: the Experiment owns the one rollout service of all its runs (shared_rollout).
    service = spec.run.rollout.backend == "service" and not spec.run.rollout.shared
    if service:
        # Gang admission: a TrainJob's JobSet runs the rollout pod (run_training_runtime), a PyTorchJob's rollout
        # is a Deployment that runs only while Kueue has the trainer admitted (operators/runs.py).
        children += ([] if trainer_api == TRAINJOB else [_rollout_deployment(ctx)]) + \
            [_rollout_service(ctx), _rollout_network_policy(ctx)]
    children += progress_access(ctx)
    if trainer_api == TRAINJOB:
        if service:
            children.append(run_training_runtime(ctx))
        children.append(_train_job(ctx, runtime or RuntimeRef()))
    elif trainer_api == PYTORCHJOB:
        children.append(_trainer_job(ctx))
    else:
        raise SpecError(f"scheduling.trainerApi: {trainer_api!r} is not a training API; use one of "
                        f"{', '.join(TRAINER_APIS)}")
    # Builders reuse pieces (mounts, probes, the trainer container); the caller gets objects sharing nothing.
    return check_names(json.loads(json.dumps(children)))


def experiment_objects(experiment_meta: Mapping, spec: ExperimentSpec, trainer_api: str | None = None,
                       runtime: RuntimeRef | None = None) -> list[dict]:
    """Every object the controller creates for an experiment: each dataset's AdaptationRun and its children. The
    trainer's API is `trainer_api`, else the spec's scheduling.trainerApi, `auto` read as TrainJob (no cluster is
    asked here; the operator asks its API server)."""
    api = resolve_trainer_api(trainer_api or spec.scheduling.trainer_api)
    objects = shared_rollout(experiment_meta, spec) if spec.rollout.shared else []
    for dataset in spec.datasets:
        run = adaptation_run(experiment_meta, spec, dataset.name)
        objects += [run, *run_children(run, api, runtime)]
    return objects


