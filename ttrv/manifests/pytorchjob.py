"""The trainer as a Kubeflow training-operator v1 PyTorchJob (kubeflow.org/v1)."""


from __future__ import annotations

from typing import Any

from ttrv.labels import (
    TRAINER,
)
from ttrv.manifests.common import (
    MASTER_PORT,
    MASTER_PORT_NAME,
    METRICS_PORT,
    TRAIN_COMMAND,
    TRAINER_CONTAINER,
    _container,
    _Context,
    _pod_spec,
    _trainer_env,
    _trainer_resources,
)


def _trainer_job(ctx: _Context) -> dict:
    run = ctx.spec.run
    res = run.resources
    scheduling = ctx.spec.scheduling
    container = _container(
        ctx, TRAINER_CONTAINER, ctx.spec.image.trainer,
        # torchrun's launcher (ttrv.launch) takes nnodes, nproc-per-node, node rank and master address from the
        # PET_* variables that the training operator sets in every replica, and exits with the failing worker's
        # own code, which restartPolicy ExitCode needs (plain torchrun exits 1 for any worker failure).
        TRAIN_COMMAND, _trainer_env(ctx),
        [{"name": MASTER_PORT_NAME, "containerPort": MASTER_PORT, "protocol": "TCP"},
         {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        _trainer_resources(ctx),
        ipc_lock=ctx.spec.pod.ipc_lock,
        # A trainer that fails leaves the tail of its log as the pod's termination message, which the operator
        # copies into the run's status: why a run failed, without `kubectl logs` of a pod that may be gone.
        terminationMessagePolicy="FallbackToLogsOnError",
    )

    def replica(count: int) -> dict:
        return {
            "replicas": count,
            # Exit codes 128-255 (signals, the trainer's retryable failures) restart the pod, up to backoffLimit;
            # 1-127 fail the job at once.
            "restartPolicy": "ExitCode",
            "template": {
                "metadata": ctx.pod_metadata(TRAINER),
                "spec": _pod_spec(ctx, container, res.gpus_per_node,
                                  ctx.spec.pod.termination_grace_period_seconds),
            },
        }

    replicas = {"Master": replica(1)}
    if res.nodes > 1:
        replicas["Worker"] = replica(res.nodes - 1)
    run_policy: dict[str, Any] = {
        "backoffLimit": scheduling.backoff_limit,
        "ttlSecondsAfterFinished": scheduling.ttl_seconds_after_finished,
        # Once the master is done, workers still holding GPUs are deleted.
        "cleanPodPolicy": "Running",
        # Kueue admits a job by unsuspending it; created running, it would start before admission.
        "suspend": ctx.spec.suspend or bool(scheduling.queue_name),
    }
    if scheduling.priority_class_name:
        # Read by gang schedulers (Volcano, scheduler-plugins) for the PodGroup; the pods carry it as well.
        run_policy["schedulingPolicy"] = {"priorityClass": scheduling.priority_class_name}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": ctx.metadata(f"{ctx.name}-trainer", TRAINER, ctx.queue_labels),
        "spec": {
            "nprocPerNode": str(res.nproc_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


