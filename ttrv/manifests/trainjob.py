"""The trainer as a Kubeflow Trainer v2 TrainJob (trainer.kubeflow.org/v1alpha1), and the training runtime every
ttrv TrainJob references."""


from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from ttrv.labels import (
    COMPONENT_LABEL,
    ROLLOUT,
    TRAINER,
)
from ttrv.manifests.access import status_env, status_mount, status_volume, trainer_service_account
from ttrv.manifests.common import (
    _WRITABLE_ENV,
    ANCESTOR_LABEL,
    METRICS_PORT,
    RUNTIME_NAME,
    RUNTIME_PATCH_MANAGER,
    TRAIN_COMMAND,
    TRAINER_API_GROUP,
    TRAINER_API_VERSION,
    TRAINJOB_CONTAINER,
    TRAINJOB_REPLICATED_JOB,
    RuntimeRef,
    _Context,
    _extra_env,
    _mounts,
    _placement,
    _trainer_env,
    _trainer_resources,
    _volumes,
    container_security_context,
    pod_security_context,
)
from ttrv.spec import SpecError
from ttrv.spec.experiment import ImageSpec

# --- Kubeflow Trainer v2 ------------------------------------------------------------------------------------------

def _typed(model_name: str, obj: dict) -> dict:
    """`obj` through the typed model `model_name` of kubeflow-trainer-api: the model fixes the shape Kubeflow's own
    SDK writes. The generated models ignore keys they do not know (pydantic's default), so the round trip must give
    `obj` back unchanged: a key the model dropped is a field TrainJob does not have, and fails here by name."""
    from importlib import import_module  # 0.8 s of generated models: only when a TrainJob is built

    module = import_module("kubeflow_trainer_api.models." + _snake(model_name))
    typed = getattr(module, model_name).from_dict(obj).to_dict()
    if typed != obj:
        raise ValueError(f"{model_name}: kubeflow-trainer-api does not round-trip this object; differing keys: "
                         f"{_differences(obj, typed)}")
    return typed


def _snake(name: str) -> str:
    out = ""
    for index, char in enumerate(name):
        if char.isupper() and index and (not name[index - 1].isupper() or
                                         (index + 1 < len(name) and name[index + 1].islower())):
            out += "_"
        out += char.lower()
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [found for key in sorted(set(a) | set(b))
                for found in _differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [found for index, (x, y) in enumerate(zip(a, b, strict=True)) for found in _differences(x, y, f"{path}[{index}]")]
    return [] if a == b else [path]


def _train_job(ctx: _Context, runtime: RuntimeRef) -> dict:
    """The run's trainer as a TrainJob. What differs per run goes into the TrainJob (image, command, env, nodes,
    processes, resources; the pods' labels, the spec ConfigMap, data volumes and GPU placement as ttrv's entry in
    spec.runtimePatches); what every run shares is the runtime's (training_runtime below).

    The torch plugin sets PET_NNODES (numNodes), PET_NPROC_PER_NODE (numProcPerNode), PET_NODE_RANK (the Job's
    completion index), PET_MASTER_ADDR (<trainjob>-node-0-0.<trainjob>) and PET_MASTER_PORT (29500) in the
    container named `node` (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go EnforceMLPolicy), which
    `ttrv train`'s launcher reads as it does under the v1 training operator. A run that samples from a rollout
    service references its own TrainingRuntime (run_training_runtime), whose JobSet runs the rollout beside `node`. Env for the `node` container may only
    come through spec.trainer.env: the webhook refuses it in a runtime patch (plugins/jobset/jobset.go Validate).
    Kubeflow merges ttrv's patch into the runtime's JobSet template with a strategic merge patch (volumes and
    containers by name, volumeMounts by mountPath; pkg/runtime/core/trainingruntime.go mergeRuntimePatches).

    The pod settings (ExperimentSpec.pod, image.pullSecrets, scheduling's placement) go where trainjob_types.go
    lets a TrainJob carry them: env, extra resources and ephemeral storage in spec.trainer (env, resourcesPerNode);
    the pods' labels and annotations in the patch's PodTemplatePatch.metadata ("Only labels and annotations are
    allowed"); serviceAccountName, imagePullSecrets, affinity, tolerations, nodeSelector and
    terminationGracePeriodSeconds in its PodSpecPatch; the /dev/shm sizeLimit as a `shm` volume merged by name
    into the runtime's; IPC_LOCK as the `node` ContainerPatch's securityContext. PodSpecPatch has no
    topologySpreadConstraints: the spec refuses them unless trainerApi is pytorchjob (SchedulingSpec), and this
    builder should a TrainJob be asked for anyway (`ttrv render --trainer-api trainjob`).
    """
    res = ctx.spec.run.resources
    scheduling, pod = ctx.spec.scheduling, ctx.spec.pod
    if scheduling.topology_spread_constraints:
        raise SpecError(
            "scheduling.topologySpreadConstraints: a TrainJob cannot carry them (Kubeflow Trainer's PodSpecPatch "
            "has no such field); spread the trainer pods with scheduling.affinity, with Kueue's topology "
            "annotations in pod.annotations, or in the training runtime (docs/kubernetes.md, \"Pod settings\"), or "
            "set scheduling.trainerApi: pytorchjob")
    node: dict[str, Any] = {"name": TRAINJOB_CONTAINER,
                            "volumeMounts": [mount for mount in _mounts(ctx)
                                             if mount["name"] not in _RUNTIME_VOLUMES] + [status_mount()]}
    if pod.ipc_lock:
        # The whole context, not only `add`: merged field by field into the runtime's, it would be the same.
        node["securityContext"] = container_security_context(ipc_lock=True)
    volumes = [volume for volume in _volumes(ctx) if "emptyDir" not in volume] + [status_volume()]
    if pod.shm_size_limit:
        # Merged by name into the runtime's memory-backed `shm` emptyDir: only its sizeLimit changes.
        volumes += [volume for volume in _volumes(ctx) if volume["name"] == "shm"]
    pod_spec: dict[str, Any] = {"volumes": volumes, "containers": [node]}
    pod_spec |= _placement(ctx, res.gpus_per_node)
    pod_spec["terminationGracePeriodSeconds"] = pod.termination_grace_period_seconds
    # The trainer reports its progress into its run's status as the run's trainer ServiceAccount (access.py).
    pod_spec["serviceAccountName"] = trainer_service_account(ctx)
    patch = {
        "manager": RUNTIME_PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
            "name": TRAINJOB_REPLICATED_JOB,
            "template": {"spec": {"template": {
                "metadata": ctx.pod_metadata(TRAINER),
                "spec": pod_spec,
            }}},
        }]}}},
    }
    if ctx.spec.run.rollout.backend == "service":  # the run's own runtime, with its rollout job (gang admission)
        runtime = RuntimeRef("TrainingRuntime", run_runtime_name(ctx.name))
    job = {
        "apiVersion": TRAINER_API_VERSION,
        "kind": "TrainJob",
        # Kueue's trainjob integration reads the queue label on the TrainJob (pkg/controller/jobs/trainjob).
        "metadata": ctx.metadata(f"{ctx.name}-trainer", TRAINER, ctx.queue_labels),
        "spec": {
            "runtimeRef": {"apiGroup": TRAINER_API_GROUP, "kind": runtime.kind, "name": runtime.name},
            "trainer": {
                "image": ctx.spec.image.trainer,
                "command": TRAIN_COMMAND,
                "env": _trainer_env(ctx) + status_env(ctx) + _extra_env(ctx),
                "numNodes": res.nodes,
                "numProcPerNode": res.nproc_per_node,
                "resourcesPerNode": _trainer_resources(ctx),
            },
            "runtimePatches": [patch],
            # Kueue admits a TrainJob by unsuspending it; created running, it would start before admission.
            "suspend": ctx.spec.suspend or bool(scheduling.queue_name),
        },
    }
    return _typed("TrainerV1alpha1TrainJob", job)


# The runtime's own emptyDirs (every run has them); a run adds its spec ConfigMap and data volumes by patch.
_RUNTIME_VOLUMES = ("tmp", "cache", "shm")


def training_runtime(kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime",
                     name: str = RUNTIME_NAME, namespace: str | None = None, image: str | None = None,
                     pull_policy: str = "IfNotPresent", extra_labels: Mapping[str, str] | None = None) -> dict:
    """The runtime every ttrv TrainJob references: one replicated job `node` of the run's nodes, running `ttrv
    train` under the restricted pod security profile. The operator chart renders the same object (a test compares
    them): a ClusterTrainingRuntime, or a TrainingRuntime per namespace for a namespaced install.

    Shaped like Kubeflow's own torch-distributed runtime (manifests/base/runtimes/torch_distributed.yaml:
    mlPolicy.torch, a replicated job and container named `node` labelled trainjob-ancestor-step=trainer).

    Exit codes: the Job runs its pods with restartPolicy Never and backoffLimit 0, so the trainer's first non-zero
    exit fails its Job, and a failed Job fails the JobSet (no failurePolicy: "The JobSet is always declared failed
    if any job in the set finished with status failed", jobset api/jobset/v1alpha2/jobset_types.go), which the
    TrainJob reports as its Failed condition (plugins/jobset/jobset.go Status). The operator then reads the exit
    code from the pod: 1-127 fails the run, 128-255 starts a new TrainJob within scheduling.backoffLimit
    (operators/runs.py), the same budget the PyTorchJob path keeps. JobSet restarts (failurePolicy.maxRestarts)
    are left at zero so that one budget, the run's, counts every restart.
    """
    container = {
        "name": TRAINJOB_CONTAINER,
        # Each TrainJob sets its own image (spec.trainer.image); this one only serves a TrainJob that sets none.
        "image": image or ImageSpec().trainer,
        "imagePullPolicy": pull_policy,
        "command": TRAIN_COMMAND,
        "env": list(_WRITABLE_ENV),
        "ports": [{"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": "/cache"},
                         {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": container_security_context(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod = {
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}},
                    {"name": "shm", "emptyDir": {"medium": "Memory"}}],
    }
    # Kubeflow's own runtimes carry the framework label (the SDK lists runtimes by it); the chart adds its labels.
    metadata: dict[str, Any] = {"name": name,
                                "labels": {"trainer.kubeflow.org/framework": "torch"} | dict(extra_labels or {})}
    if namespace:
        metadata["namespace"] = namespace
    runtime = {
        "apiVersion": TRAINER_API_VERSION,
        "kind": kind,
        "metadata": metadata,
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [{
                "name": TRAINJOB_REPLICATED_JOB,
                "replicas": 1,
                "template": {
                    "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
                    "spec": {"backoffLimit": 0, "template": {"spec": pod}},
                },
            }]}},
        },
    }
    model = "TrainerV1alpha1ClusterTrainingRuntime" if kind == "ClusterTrainingRuntime" else \
        "TrainerV1alpha1TrainingRuntime"
    return _typed(model, runtime)


# --- gang admission: the rollout in the trainer's JobSet -----------------------------------------------------------

ROLLOUT_REPLICATED_JOB = "rollout"
# The rollout container restarts in place (restartPolicy OnFailure, as a Deployment would restart it) up to this
# many times before its Job, and with it the JobSet and the TrainJob, fail.
ROLLOUT_BACKOFF_LIMIT = 6


def run_runtime_name(run: str) -> str:
    return f"{run}-runtime"


def run_training_runtime(ctx: _Context) -> dict:
    """The namespaced TrainingRuntime of one run that samples from a rollout service: ttrv's runtime
    (training_runtime) with the run's rollout pod as a second replicated job, `rollout`, ahead of `node`. Owned by
    the run; the run's TrainJobs reference it.

    Why a runtime per run: a TrainJob's runtimePatches cannot set a container's image, command or resources
    (kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go ContainerPatch: name, env, volumeMounts,
    securityContext), and spec.trainer reaches only the `node` container, so the rollout pod, whose image and GPUs
    are the run's, must be in the runtime itself.

    What this buys, each verified upstream:
    - One Kueue Workload, one pod set per replicated job (kueue pkg/controller/jobs/trainjob/trainjob_controller.go
      PodSets builds the JobSet from the runtime and hands it to jobs/jobset/jobset_controller.go PodSets): Kueue
      admits and preempts the rollout's GPUs and the trainer's together, and a preempted TrainJob suspends its
      JobSet, whose Jobs' pods all go.
    - `node` starts only once the rollout pod is ready: JobSet's dependsOn (jobset api/jobset/v1alpha2/jobset_types.go
      DependsOn, status Ready: ready + succeeded + failed Jobs equal the replicas; pkg/controllers/depends_on.go).
      The first replicated job may not depend on anything, hence `rollout` first.
    - The JobSet succeeds when `node` has: successPolicy All over targetReplicatedJobs [node] (the rollout serves
      until it is stopped, so the default policy, every Job complete, would never be met), and a finished JobSet
      deletes its still-active Jobs, the rollout's (pkg/controllers/jobset_controller.go reconcile: jobSetFinished
      then deleteJobs).
    - Kubeflow Trainer leaves a replicated job without the trainjob-ancestor-step label alone: its builder sets the
      image, command, env and resourcesPerNode only on the `node` container of the `trainer` ancestor
      (pkg/runtime/framework/plugins/jobset/builder.go Trainer), numNodes only on that job's pod count
      (pkg/runtime/core/trainingruntime.go newRuntimeInfo), the torch plugin's PET_* only in that container
      (plugins/torch/torch.go EnforceMLPolicy), and the runtime webhook checks only jobs with an ancestor label
      (pkg/webhooks/trainingruntime_webhook.go validateReplicatedJobs). Kubeflow's own torch-distributed-with-cache
      runtime runs a second job the same way (manifests/base/runtimes/data-cache/torch_distributed_with_cache.yaml).
    - The trainer reaches the rollout through the run's rollout Service, which selects the rollout pod by its labels
      wherever it runs (TTRV_ROLLOUT_URL unchanged); the NetworkPolicy likewise.

    Order: Trainer's webhook refuses a TrainJob whose runtime its cache does not hold ("specified trainingRuntime
    must be created before the TrainJob is created", pkg/runtime/core/trainingruntime.go ValidateObjects); the
    operator creates the runtime ahead of the TrainJob (run_children's order), and a refusal in the moment between
    is retried with the reconcile (operators/ttrv_operator.py _handle).

    Differences from the PyTorchJob path: a rollout container that keeps failing fails the JobSet after
    ROLLOUT_BACKOFF_LIMIT restarts (no failurePolicy: any failed Job fails the JobSet), so the TrainJob fails whole
    and the run takes the retry path of a failed trainer; a Deployment would restart it for ever.
    """
    from ttrv.manifests.rollout import _rollout_pod_template

    runtime = training_runtime("TrainingRuntime", run_runtime_name(ctx.name), ctx.namespace, ctx.spec.image.trainer,
                               ctx.spec.image.pull_policy)
    rollout_pod = _rollout_pod_template(ctx)
    # A Job's pods restart OnFailure or Never; OnFailure restarts `ttrv serve` in place as the Deployment would.
    rollout_pod["spec"]["restartPolicy"] = "OnFailure"
    jobset = runtime["spec"]["template"]["spec"]
    node = jobset["replicatedJobs"][0]
    node["dependsOn"] = [{"name": ROLLOUT_REPLICATED_JOB, "status": "Ready"}]
    # The run's trainer pods, labelled here as in the TrainJob's patch: the runtime is this run's alone.
    node["template"]["spec"]["template"]["metadata"] = ctx.pod_metadata(TRAINER)
    jobset["replicatedJobs"] = [{
        "name": ROLLOUT_REPLICATED_JOB,
        "replicas": 1,
        "template": {
            # No trainjob-ancestor-step label: Kubeflow Trainer leaves this job as the runtime has it.
            "metadata": {"labels": {COMPONENT_LABEL: ROLLOUT}},
            "spec": {"backoffLimit": ROLLOUT_BACKOFF_LIMIT, "template": rollout_pod},
        },
    }, node]
    jobset["successPolicy"] = {"operator": "All", "targetReplicatedJobs": [TRAINJOB_REPLICATED_JOB]}
    runtime["spec"]["mlPolicy"]["numNodes"] = ctx.spec.run.resources.nodes
    runtime["metadata"] = ctx.metadata(run_runtime_name(ctx.name), ROLLOUT) | {
        "labels": ctx.labels(ROLLOUT) | runtime["metadata"]["labels"]}
    return _typed("TrainerV1alpha1TrainingRuntime", runtime)
