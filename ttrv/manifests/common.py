"""What every builder of ttrv's objects shares: names, labels, constants, the per-run context, and the pod pieces
(volumes, mounts, security contexts, resources, the trainer's environment and command)."""


from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ttrv.labels import (
    APP,
    COMPONENT_LABEL,
    DATASET_LABEL,
    EXPERIMENT_LABEL,
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    NAME_LABEL,
    QUEUE_LABEL,
    RUN_LABEL,
)
from ttrv.spec import (
    AdaptationRunSpec,
    ExperimentSpec,
    SpecError,
    check_dns_label,
    k8s_dump,
)

SPEC_DIR = "/etc/ttrv"
SPEC_KEY = "run.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_KEY}"
ROLLOUT_PORT = 8000
METRICS_PORT = 9400
# The training operator's default master port and its required port name (pytorch_types.go), stated explicitly
# so the pod template says what the pods listen on.
MASTER_PORT = 23456
MASTER_PORT_NAME = "pytorchjob-port"
TRAINER_CONTAINER = "pytorch"  # the training operator finds the container to configure by this name
USER_ID = 1000
GPU = "nvidia.com/gpu"
# The training operator names pods and their Services `<job>-worker-<index>`, DNS labels of at most 63 characters:
# `<run>-trainer-worker-` plus three digits leaves 44 for the run name.
RUN_NAME_MAX = 44

TRAINJOB = "trainjob"
PYTORCHJOB = "pytorchjob"
TRAINER_KINDS = {TRAINJOB: "TrainJob", PYTORCHJOB: "PyTorchJob"}
TRAINER_APIS = tuple(TRAINER_KINDS)
TRAINER_API_GROUP = "trainer.kubeflow.org"
TRAINER_API_VERSION = f"{TRAINER_API_GROUP}/v1alpha1"
# Kubeflow Trainer's torch plugin finds the trainer container by this name in the replicated job labelled
# trainjob-ancestor-step=trainer, and gives it the PET_* variables that `ttrv train`'s launcher reads
# (kubeflow/trainer pkg/constants/constants.go: Node = "node", AncestorTrainer = "trainer";
# pkg/runtime/framework/plugins/torch/torch.go: EnforceMLPolicy).
TRAINJOB_CONTAINER = "node"
TRAINJOB_REPLICATED_JOB = "node"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
RUNTIME_NAME = "ttrv-trainer"
# The manager key of ttrv's entry in a TrainJob's spec.runtimePatches (a map keyed by manager, so Kueue's own entry,
# kueue.x-k8s.io/manager, sits beside it; trainjob_types.go RuntimePatch). It must be a domain-prefixed path
# (pkg/runtime/framework/plugins/jobset/jobset.go Validate).
RUNTIME_PATCH_MANAGER = "ttrv.io/operator"


def resolve_trainer_api(requested: str, served: frozenset[str] | None = None) -> str | None:
    """The API a run's trainer uses. `auto` picks TrainJob when it is served, else PyTorchJob; `served` None means
    no cluster to ask (`ttrv render`): TrainJob, Kubeflow's current API. None: no served API fits."""
    if requested != "auto":
        return requested if served is None or requested in served else None
    for api in TRAINER_APIS:
        if served is None or api in served:
            return api
    return None


def run_store_uri(storage_uri: str, namespace: str, experiment: str, dataset: str) -> str:
    """Object-store prefix of one run in a cluster: `<storage.uri>/<namespace>/<experiment>/<dataset>`, so teams
    (namespaces) sharing a bucket never write into each other's runs. Each part must be a DNS label: a '/' or '..'
    would put one run's prefix inside another's, where its keys could read or overwrite the other's objects."""
    for field, value in (("metadata.namespace", namespace), ("metadata.name", experiment),
                         ("datasets[].name", dataset)):
        check_dns_label(value, field, "; it names the run's object-store prefix")
    return f"{storage_uri.rstrip('/')}/{namespace}/{experiment}/{dataset}"


def shared_rollout_name(experiment: str) -> str:
    """The experiment's shared rollout service (rollout.shared): its Deployment, Service, NetworkPolicy and
    ConfigMap. No run's children take it: a run's own are `<run>-rollout`, `<run>-spec` and `<run>-trainer`."""
    return f"{experiment}-shared-rollout"


def run_name(experiment: str, dataset: str) -> str:
    """Name of a dataset's AdaptationRun; long names are cut and made unique again by a hash of the full name."""
    name = f"{experiment}-{dataset}"
    if len(name) <= RUN_NAME_MAX:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[: RUN_NAME_MAX - 7].rstrip('-')}-{digest}"


def labels(experiment: str, run: str, dataset: str, component: str | None = None) -> dict[str, str]:
    result = {
        NAME_LABEL: APP,
        INSTANCE_LABEL: experiment,
        MANAGED_BY_LABEL: MANAGER,
        EXPERIMENT_LABEL: experiment,
        RUN_LABEL: run,
        DATASET_LABEL: dataset,
    }
    if component:
        result[COMPONENT_LABEL] = component
    return result


def _metadata(name: str, namespace: str, object_labels: dict[str, str], owner: Mapping) -> dict:
    """Object metadata, owned by `owner` when that exists in the cluster (the API server assigns the uid):
    `ttrv render` shows the objects of an Experiment that was never applied, so they have no owner yet."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": object_labels}
    uid = owner["metadata"].get("uid")
    if uid:
        metadata["ownerReferences"] = [{
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }]
    return metadata


def resource_dump(model: BaseModel) -> dict:
    """A model as a custom resource's field: camelCase JSON, with the fields left at a None default omitted.

    Omitting them keeps the meaning (pydantic restores the default) and is needed: the API server cannot accept
    null for an enum field. An explicit null that differs from the default (e.g. `subsetSize: null` = all) stays.
    """
    dumped = model.model_dump(mode="json")
    _drop_none_defaults(model, dumped)
    return dumped


def _drop_none_defaults(model: BaseModel, dumped: dict) -> None:
    for name, field in type(model).model_fields.items():
        key = field.alias or name
        value = getattr(model, name)
        if value is None and field.default is None:
            del dumped[key]
        elif isinstance(value, BaseModel):
            _drop_none_defaults(value, dumped[key])
        elif isinstance(value, list):
            for item, item_dumped in zip(value, dumped[key], strict=True):
                if isinstance(item, BaseModel):
                    _drop_none_defaults(item, item_dumped)


def _require_cluster_store(spec: ExperimentSpec) -> None:
    if not spec.storage.uri.startswith("s3://"):
        raise SpecError(
            f"storage.uri: {spec.storage.uri!r} is a local path, which the trainer and rollout pods do not share; "
            "set storage.uri to s3://bucket/prefix (the operator chart's bundled MinIO serves s3://ttrv)"
        )




@dataclass(frozen=True)
class RuntimeRef:
    """The training runtime a TrainJob references (trainjob_types.go RuntimeRef): the operator chart's
    ClusterTrainingRuntime, or a TrainingRuntime in the run's namespace for a namespaced install."""

    kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    name: str = RUNTIME_NAME


class _Context:
    """What every child builder of one run needs, computed once."""

    def __init__(self, run: Mapping, spec: AdaptationRunSpec):
        self.spec = spec
        self.name = run["metadata"]["name"]
        self.namespace = run["metadata"].get("namespace") or "default"
        self.run = run

    def labels(self, component: str | None = None) -> dict[str, str]:
        return labels(self.spec.experiment, self.name, self.spec.dataset, component)

    def selector(self, component: str) -> dict[str, str]:
        return {NAME_LABEL: APP, RUN_LABEL: self.name, COMPONENT_LABEL: component}

    def metadata(self, name: str, component: str | None = None, extra_labels: dict | None = None) -> dict:
        return _metadata(name, self.namespace, self.labels(component) | (extra_labels or {}), self.run)

    def pod_metadata(self, component: str) -> dict:
        """A pod template's metadata: the spec's pod labels and annotations, ttrv's labels over them."""
        pod = self.spec.pod
        metadata: dict[str, Any] = {"labels": dict(pod.labels) | self.labels(component)}
        if pod.annotations:
            metadata["annotations"] = dict(pod.annotations)
        return metadata

    @property
    def rollout_name(self) -> str:
        if self.spec.run.rollout.shared:  # the experiment's one service (ttrv.manifests.rollout.shared_rollout)
            return shared_rollout_name(self.spec.experiment)
        return f"{self.name}-rollout"

    @property
    def queue_labels(self) -> dict[str, str]:
        queue = self.spec.scheduling.queue_name
        return {QUEUE_LABEL: queue} if queue else {}


# libyaml's emitter where PyYAML has it: the same text as the pure-Python one, five times faster, and the operator
# builds a run's children on every reconcile.
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _spec_config_map(ctx: _Context) -> dict:
    run_yaml = yaml.dump(ctx.spec.run.model_dump(mode="json"), Dumper=_YAML_DUMPER, sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": ctx.metadata(f"{ctx.name}-spec"),
        "data": {SPEC_KEY: run_yaml},
    }


def _store_env(ctx: _Context) -> list[dict]:
    secret = ctx.spec.s3_secret
    env = [
        {"name": "AWS_ACCESS_KEY_ID",
         "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.access_key_key}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": secret.name, "key": secret.secret_key_key}}},
    ]
    if ctx.spec.run.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": ctx.spec.run.storage.endpoint})
    return env


# The root filesystem is read-only: HOME and the caches (Hugging Face, torch extensions, Triton) go to emptyDirs.
_WRITABLE_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": "/cache"},
    {"name": "HF_HOME", "value": "/cache/huggingface"},
]


def _volumes(ctx: _Context) -> list[dict]:
    return [
        {"name": "spec", "configMap": {"name": f"{ctx.name}-spec"}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        _shm_volume(ctx),
    ] + [{"name": f"volume-{index}", "persistentVolumeClaim": {"claimName": volume.claim_name,
                                                               "readOnly": volume.read_only}}
         for index, volume in enumerate(ctx.spec.volumes)]


def _shm_volume(ctx: _Context) -> dict:
    # NCCL and vLLM's tensor-parallel workers exchange data through /dev/shm, which is 64 MiB by default.
    limit = ctx.spec.pod.shm_size_limit
    return {"name": "shm", "emptyDir": {"medium": "Memory"} | ({"sizeLimit": limit} if limit else {})}


def _mounts(ctx: _Context) -> list[dict]:
    return [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "shm", "mountPath": "/dev/shm"},
    ] + [{"name": f"volume-{index}", "mountPath": volume.mount_path, "readOnly": volume.read_only}
         for index, volume in enumerate(ctx.spec.volumes)]


def pod_security_context() -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context(ipc_lock: bool = False) -> dict:
    """Every capability dropped; with `ipc_lock` (pod.ipcLock, trainers only) IPC_LOCK added back, which InfiniBand
    verbs need to pin memory for RDMA."""
    capabilities: dict[str, list[str]] = {"drop": ["ALL"]}
    if ipc_lock:
        capabilities["add"] = ["IPC_LOCK"]
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": capabilities}


def _resources(cpu: str, memory: str, gpus: int, extra: Mapping[str, str] | None = None,
               ephemeral_storage: str | None = None) -> dict:
    """Requests and limits of a ttrv container: GPUs and `extra` (pod.extraResources) requested and limited alike,
    as extended resources must be; ephemeral storage (pod.ephemeralStorage) only requested, so that a download
    larger than planned slows nothing and is not evicted for it."""
    devices = ({GPU: str(gpus)} if gpus else {}) | dict(extra or {})
    disk = {"ephemeral-storage": ephemeral_storage} if ephemeral_storage else {}
    # No CPU limit: throttling a data loader or NCCL proxy thread stalls every rank.
    return {"requests": {"cpu": cpu, "memory": memory} | disk | devices, "limits": {"memory": memory} | devices}


def _trainer_resources(ctx: _Context) -> dict:
    res, pod = ctx.spec.run.resources, ctx.spec.pod
    return _resources(res.cpu, res.memory, res.gpus_per_node, pod.extra_resources, pod.ephemeral_storage)


def _extra_env(ctx: _Context) -> list[dict]:
    return [k8s_dump(variable) for variable in ctx.spec.pod.env]


def _container(ctx: _Context, name: str, image: str, command: list[str], env: list[dict], ports: list[dict],
               resources: dict, ipc_lock: bool = False, **kind_keys) -> dict:
    """A ttrv container: the spec's pull policy, the writable-folder variables ahead of `env` and the spec's extra
    env (pod.env) after it, the run's mounts and the hardened security context every ttrv container has (IPC_LOCK
    added with `ipc_lock`); `kind_keys` are the kind's own (probes, the termination message)."""
    return {"name": name, "image": image, "imagePullPolicy": ctx.spec.image.pull_policy, "command": command,
            "env": _WRITABLE_ENV + env + _extra_env(ctx), "ports": ports, **kind_keys, "resources": resources,
            "volumeMounts": _mounts(ctx), "securityContext": container_security_context(ipc_lock)}


def _placement(ctx: _Context, gpus: int) -> dict:
    """The pod-spec fields that place a pod and pull its image, shared by every kind (a TrainJob carries them as a
    runtime patch): tolerations, affinity, pull secrets and service account on every pod, the node selector on GPU
    pods only."""
    scheduling, pod = ctx.spec.scheduling, ctx.spec.pod
    fields: dict[str, Any] = {}
    if pod.service_account_name:
        fields["serviceAccountName"] = pod.service_account_name
    if ctx.spec.image.pull_secrets:
        fields["imagePullSecrets"] = [{"name": name} for name in ctx.spec.image.pull_secrets]
    if gpus and scheduling.node_selector:
        fields["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.affinity:
        fields["affinity"] = k8s_dump(scheduling.affinity)
    if scheduling.tolerations:
        fields["tolerations"] = [resource_dump(t) for t in scheduling.tolerations]
    return fields


def _pod_spec(ctx: _Context, container: dict, gpus: int, grace_seconds: int | None = None) -> dict:
    """A Deployment's or PyTorchJob's pod spec; `grace_seconds` its terminationGracePeriodSeconds (None: the
    Kubernetes default, 30 s)."""
    scheduling = ctx.spec.scheduling
    pod: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(ctx),
        # No default token: only the trainer calls the Kubernetes API (its run's status), with a projected token
        # of its own ServiceAccount (access.py).
        "automountServiceAccountToken": False,
    }
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    pod |= _placement(ctx, gpus)
    if scheduling.topology_spread_constraints:
        pod["topologySpreadConstraints"] = [k8s_dump(c) for c in scheduling.topology_spread_constraints]
    if grace_seconds is not None:
        pod["terminationGracePeriodSeconds"] = grace_seconds
    return pod




def _trainer_env(ctx: _Context) -> list[dict]:
    """The trainer's own variables (both APIs); the launcher's PET_* come from the training operator."""
    run = ctx.spec.run
    env = _store_env(ctx) + [{"name": "TTRV_METRICS_PORT", "value": str(METRICS_PORT)}]
    if run.rollout.backend == "service":
        env.append({"name": "TTRV_ROLLOUT_URL",
                    "value": f"http://{ctx.rollout_name}.{ctx.namespace}.svc:{ROLLOUT_PORT}"})
    if not run.resources.gpus_per_node:
        # DeepSpeed picks its accelerator by probing; on GPU nodes it must find CUDA, so it is only pinned here.
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    # On SIGTERM torch elastic's launcher (ttrv.launch) passes it to the workers and SIGKILLs them after
    # TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default (torch/distributed/launcher/api.py LaunchConfig; the agent's
    # `_shutdown` in elastic/agent/server/api.py): the workers' checkpoint needs the pod's grace period, less a
    # margin for the launcher to exit with their code before the kubelet's SIGKILL.
    env.append({"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(_shutdown_timeout(ctx))})
    return env


SHUTDOWN_MARGIN_SECONDS = 10


def _shutdown_timeout(ctx: _Context) -> int:
    return max(0, ctx.spec.pod.termination_grace_period_seconds - SHUTDOWN_MARGIN_SECONDS)


TRAIN_COMMAND = ["ttrv", "train", "--spec", SPEC_PATH]


