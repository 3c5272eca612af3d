"""The rollout service's objects: its Deployment, Service and NetworkPolicy."""


from __future__ import annotations

from collections.abc import Mapping

import yaml

from ttrv.crds import API_VERSION
from ttrv.labels import (
    APP,
    COMPONENT_LABEL,
    DATASET_LABEL,
    EXPERIMENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    NAME_LABEL,
    ROLLOUT,
    RUN_LABEL,
    TRAINER,
)
from ttrv.manifests.common import (
    _YAML_DUMPER,
    ROLLOUT_PORT,
    SPEC_DIR,
    SPEC_KEY,
    SPEC_PATH,
    _container,
    _Context,
    _pod_spec,
    _require_cluster_store,
    _resources,
    _store_env,
    run_store_uri,
    shared_rollout_name,
)
from ttrv.spec import AdaptationRunSpec, ExperimentSpec

SHARED_RUNS_KEY = "runs.yaml"
SHARED_RUNS_PATH = f"{SPEC_DIR}/{SHARED_RUNS_KEY}"


def _rollout_pod_template(ctx: _Context, shared: bool = False) -> dict:
    """The rollout pod (`ttrv serve`), as the Deployment or the TrainJob's JobSet runs it; `shared`: the
    Experiment's one service for all its runs' adapters (shared_rollout)."""
    run = ctx.spec.run
    gpus = run.resources.rollout_gpus
    image = ctx.spec.image
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    container = _container(
        ctx, "rollout", image.rollout,
        # `ttrv serve` builds vLLM's flags from the spec file, the pod's GPUs and memory share included
        # (ttrv.rollout.vllm_process.vllm_flags): none are passed here.
        ["ttrv", "serve", "--spec", SPEC_PATH, *(["--shared", SHARED_RUNS_PATH] if shared else []),
         "--host", "0.0.0.0", "--port", str(ROLLOUT_PORT)], _store_env(ctx),
        [{"name": "http", "containerPort": ROLLOUT_PORT, "protocol": "TCP"}],
        _resources(run.resources.rollout_cpu or run.resources.cpu,
                   run.resources.rollout_memory or run.resources.memory, gpus,
                   ctx.spec.pod.rollout_extra_resources, ctx.spec.pod.ephemeral_storage),
        # Loading a checkpoint and compiling CUDA graphs takes minutes: up to 30 before liveness applies.
        startupProbe=probe | {"failureThreshold": 180},
        readinessProbe=probe | {"failureThreshold": 3},
        livenessProbe=probe | {"failureThreshold": 6},
    )
    return {"metadata": ctx.pod_metadata(ROLLOUT), "spec": _pod_spec(ctx, container, gpus)}


def _rollout_deployment(ctx: _Context, shared: bool = False) -> dict:
    """The rollout service of a run whose trainer is a PyTorchJob (a TrainJob's runs in its JobSet:
    trainjob.run_training_runtime), or with `shared` the Experiment's shared service (shared_rollout).

    Gang admission (docs/operator.md): under Kueue the Deployment carries no queue label, so Kueue's deployment
    integration never admits it apart from its trainer, and it starts at zero replicas: the operator scales it to one
    only while Kueue has the PyTorchJob admitted (unsuspended) and back to zero whenever Kueue suspends or preempts
    it (operators/runs.py). A PyTorchJob's Workload cannot hold the rollout's GPUs: Kueue builds a job's pod sets
    from its own replica templates (Master, Worker), and a prebuilt Workload with another pod set is finished as
    out of sync (kueue pkg/controller/jobframework/reconciler.go ensurePrebuiltWorkloadInSync).

    Out of it: the shared service is admitted as a unit of its own, ahead of the runs (docs/operator.md), so it
    carries the queue label (Kueue's deployment integration copies it to the pods) and runs from the start."""
    selector = ctx.selector(ROLLOUT)
    managed = bool(ctx.spec.scheduling.queue_name) and not shared
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.metadata(ctx.rollout_name, ROLLOUT, ctx.queue_labels if shared else None),
        "spec": {
            "replicas": 0 if ctx.spec.suspend or managed else 1,
            "selector": {"matchLabels": selector},
            # A rolling update would hold a second set of GPUs; the trainer waits out the restart instead.
            "strategy": {"type": "Recreate"},
            "template": _rollout_pod_template(ctx, shared),
        },
    }


def _rollout_service(ctx: _Context) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": ctx.metadata(ctx.rollout_name, ROLLOUT),
        "spec": {
            "type": "ClusterIP",
            "selector": ctx.selector(ROLLOUT),
            "ports": [{"name": "http", "port": ROLLOUT_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def _rollout_network_policy(ctx: _Context) -> dict:
    """Only this run's trainer pods reach the rollout pods, on the HTTP port; nothing else gets in. Both selectors
    name the run's whole identity: run names alone can coincide (experiment a-b with dataset c, a with b-c)."""
    identity = {EXPERIMENT_LABEL: ctx.spec.experiment, DATASET_LABEL: ctx.spec.dataset}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": ctx.metadata(ctx.rollout_name, ROLLOUT),
        "spec": {
            "podSelector": {"matchLabels": ctx.selector(ROLLOUT) | identity},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": ctx.selector(TRAINER) | identity}}],
                "ports": [{"protocol": "TCP", "port": ROLLOUT_PORT}],
            }],
        },
    }




# ----------------------------------------------------------------------------------------------- shared rollout
class _SharedContext(_Context):
    """The context of an experiment's shared rollout service (rollout.shared): named and labelled for the
    experiment (its RUN_LABEL is the service's own name, which no AdaptationRun has), owned by the Experiment."""

    def __init__(self, experiment_meta: Mapping, spec: ExperimentSpec):
        experiment = experiment_meta.get("name", "")
        namespace = experiment_meta.get("namespace") or "default"
        first = spec.datasets[0].name
        # what every run shares, as a run spec (`ttrv serve` reads model, rollout and the store's endpoint of it;
        # its storage.uri is the experiment's prefix, its runs' are in runs.yaml)
        prefix = run_store_uri(spec.storage.uri, namespace, experiment, first).rsplit("/", 1)[0]
        run = spec.run_spec(first, storage_uri=prefix).model_copy(update={"name": experiment})
        body = AdaptationRunSpec(experiment=experiment, dataset=first, run=run,
                                 image=spec.image, scheduling=spec.scheduling, s3_secret=spec.s3_secret,
                                 volumes=spec.volumes, suspend=spec.suspend)
        owner = {"apiVersion": API_VERSION, "kind": "Experiment", "metadata": experiment_meta}
        super().__init__({"metadata": {"name": shared_rollout_name(experiment), "namespace": namespace}}, body)
        self.run = owner

    def labels(self, component: str | None = None) -> dict[str, str]:
        experiment = self.spec.experiment
        result = {NAME_LABEL: APP, INSTANCE_LABEL: experiment, MANAGED_BY_LABEL: MANAGER,
                  EXPERIMENT_LABEL: experiment, RUN_LABEL: self.name}
        return result | ({COMPONENT_LABEL: component} if component else {})


def shared_max_loras(spec: ExperimentSpec) -> int:
    """Adapters the shared service batches at once: one per run that can be active (maxParallelRuns)."""
    return min(spec.max_parallel_runs, len(spec.datasets))


def shared_rollout(experiment_meta: Mapping, spec: ExperimentSpec) -> list[dict]:
    """The experiment's shared rollout service: its ConfigMap (run.yaml: the settings every run shares; runs.yaml:
    each run's name and store prefix, and maxLoras), Deployment (`ttrv serve --shared`), Service, and a
    NetworkPolicy that admits the trainer pods of this experiment, every run's and no other."""
    _require_cluster_store(spec)
    ctx = _SharedContext(experiment_meta, spec)
    experiment, namespace = ctx.spec.experiment, ctx.namespace
    runs = {"runs": [{"name": d.name, "storage": run_store_uri(spec.storage.uri, namespace, experiment, d.name)}
                     for d in spec.datasets], "maxLoras": shared_max_loras(spec)}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.metadata(f"{ctx.name}-spec"),
        "data": {SPEC_KEY: yaml.dump(ctx.spec.run.model_dump(mode="json"), Dumper=_YAML_DUMPER, sort_keys=False),
                 SHARED_RUNS_KEY: yaml.dump(runs, Dumper=_YAML_DUMPER, sort_keys=False)},
    }
    policy = _rollout_network_policy(ctx)
    identity = {EXPERIMENT_LABEL: experiment}
    policy["spec"]["podSelector"] = {"matchLabels": ctx.selector(ROLLOUT) | identity}
    policy["spec"]["ingress"][0]["from"] = [
        {"podSelector": {"matchLabels": {NAME_LABEL: APP, COMPONENT_LABEL: TRAINER} | identity}}]
    return [config_map, _rollout_deployment(ctx, shared=True), _rollout_service(ctx), policy]
