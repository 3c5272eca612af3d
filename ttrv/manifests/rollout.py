"""The rollout service's objects: its Deployment, Service and NetworkPolicy."""


from __future__ import annotations

from ttrv.labels import (
    DATASET_LABEL,
    EXPERIMENT_LABEL,
    ROLLOUT,
    TRAINER,
)
from ttrv.manifests.common import (
    ROLLOUT_PORT,
    SPEC_PATH,
    _container,
    _Context,
    _pod_spec,
    _resources,
    _store_env,
)


def _rollout_pod_template(ctx: _Context) -> dict:
    """The rollout pod (`ttrv serve`), as the Deployment or the TrainJob's JobSet runs it."""
    run = ctx.spec.run
    gpus = run.resources.rollout_gpus
    image = ctx.spec.image
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    container = _container(
        ctx, "rollout", image.rollout,
        # `ttrv serve` builds vLLM's flags from the spec file, the pod's GPUs and memory share included
        # (ttrv.rollout.vllm_process.vllm_flags): none are passed here.
        ["ttrv", "serve", "--spec", SPEC_PATH, "--host", "0.0.0.0", "--port", str(ROLLOUT_PORT)], _store_env(ctx),
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


def _rollout_deployment(ctx: _Context) -> dict:
    """The rollout service of a run whose trainer is a PyTorchJob (a TrainJob's runs in its JobSet:
    trainjob.run_training_runtime).

    Gang admission (docs/operator.md): under Kueue the Deployment carries no queue label, so Kueue's deployment
    integration never admits it apart from its trainer, and it starts at zero replicas: the operator scales it to one
    only while Kueue has the PyTorchJob admitted (unsuspended) and back to zero whenever Kueue suspends or preempts
    it (operators/runs.py). A PyTorchJob's Workload cannot hold the rollout's GPUs: Kueue builds a job's pod sets
    from its own replica templates (Master, Worker), and a prebuilt Workload with another pod set is finished as
    out of sync (kueue pkg/controller/jobframework/reconciler.go ensurePrebuiltWorkloadInSync)."""
    selector = ctx.selector(ROLLOUT)
    managed = bool(ctx.spec.scheduling.queue_name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": ctx.metadata(ctx.rollout_name, ROLLOUT),
        "spec": {
            "replicas": 0 if ctx.spec.suspend or managed else 1,
            "selector": {"matchLabels": selector},
            # A rolling update would hold a second set of GPUs; the trainer waits out the restart instead.
            "strategy": {"type": "Recreate"},
            "template": _rollout_pod_template(ctx),
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


