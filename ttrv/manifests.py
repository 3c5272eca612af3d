"""Pure builders of an experiment's Kubernetes objects: spec and metadata in, plain dicts out.

The operator and `ttrv render` call the same functions (KubeRay style): `adaptation_run` makes one dataset's
AdaptationRun from its Experiment, `run_children` the objects that run owns (ConfigMap, the trainer: a TrainJob or a
PyTorchJob, and, for a service rollout, the rollout Deployment, Service and NetworkPolicy), `training_runtime` the
ClusterTrainingRuntime (or namespaced TrainingRuntime) that every ttrv TrainJob references.

The trainer's two APIs (`scheduling.trainerApi`):
- `trainjob`: Kubeflow Trainer v2 (trainer.kubeflow.org/v1alpha1 TrainJob on a JobSet). Its objects go through the
  typed models of Kubeflow's own `kubeflow-trainer-api` package (`_typed`), the way Kubeflow's SDK builds them.
- `pytorchjob`: the v1 training operator (kubeflow.org/v1 PyTorchJob), for clusters that still run it.

The core kinds and the PyTorchJob are plain dicts, not the typed models of the kubernetes / kubeflow-training
clients: those models check little beyond required fields, and would make `ttrv render` need the cluster extras.
Trainer v2's objects pass through `kubeflow-trainer-api` (a core dependency: pydantic models only), which fixes
their shape but, like those, ignores unknown keys, so `_typed` insists on an exact round trip. The tests validate
every object built here against the real schemas (kubernetes-validate in strict mode, the vendored PyTorchJob and
Trainer v2 CRDs, the generated ttrv CRDs), which rejects a misspelt field as a typed constructor would, and a wrong
value as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

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
    QUEUE_LABEL,
    ROLLOUT,
    RUN_LABEL,
    TRAINER,
)
from ttrv.spec import (
    AdaptationRunSpec,
    ExperimentSpec,
    SpecError,
    check_dns_label,
    parse_spec,
)
from ttrv.spec.experiment import ImageSpec
from ttrv.spec.names import check_dns1035_label, check_label_key, check_label_value, check_object_name

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
    """Every object an AdaptationRun owns; the rollout service only when the run samples from one.

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
    if spec.run.rollout.backend == "service":
        children += [_rollout_deployment(ctx), _rollout_service(ctx), _rollout_network_policy(ctx)]
    if trainer_api == TRAINJOB:
        children.append(_train_job(ctx, runtime or RuntimeRef()))
    elif trainer_api == PYTORCHJOB:
        children.append(_trainer_job(ctx))
    else:
        raise SpecError(f"scheduling.trainerApi: {trainer_api!r} is not a training API; use one of "
                        f"{', '.join(TRAINER_APIS)}")
    # Builders reuse pieces (mounts, probes, the trainer container); the caller gets objects sharing nothing.
    return check_names(json.loads(json.dumps(children)))


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

    @property
    def rollout_name(self) -> str:
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
        # NCCL and vLLM's tensor-parallel workers exchange data through /dev/shm, which is 64 MiB by default.
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ] + [{"name": f"volume-{index}", "persistentVolumeClaim": {"claimName": volume.claim_name,
                                                               "readOnly": volume.read_only}}
         for index, volume in enumerate(ctx.spec.volumes)]


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


def container_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _resources(cpu: str, memory: str, gpus: int) -> dict:
    gpu = {GPU: str(gpus)} if gpus else {}
    # No CPU limit: throttling a data loader or NCCL proxy thread stalls every rank.
    return {"requests": {"cpu": cpu, "memory": memory} | gpu, "limits": {"memory": memory} | gpu}


def _pod_spec(ctx: _Context, container: dict, gpus: int) -> dict:
    scheduling = ctx.spec.scheduling
    pod: dict[str, Any] = {
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": _volumes(ctx),
        # The pods call nothing of the Kubernetes API: no token in them.
        "automountServiceAccountToken": False,
    }
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if gpus:
        if scheduling.node_selector:
            pod["nodeSelector"] = dict(scheduling.node_selector)
        if scheduling.tolerations:
            pod["tolerations"] = [resource_dump(t) for t in scheduling.tolerations]
    return pod


def _rollout_deployment(ctx: _Context) -> dict:
    run = ctx.spec.run
    gpus = run.resources.rollout_gpus
    image = ctx.spec.image
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10}
    container = {
        "name": "rollout",
        "image": image.rollout,
        "imagePullPolicy": image.pull_policy,
        # `ttrv serve` builds vLLM's flags from the spec file, the pod's GPUs and memory share included
        # (ttrv.rollout.vllm_process.vllm_flags): none are passed here.
        "command": ["ttrv", "serve", "--spec", SPEC_PATH, "--host", "0.0.0.0", "--port", str(ROLLOUT_PORT)],
        "env": _WRITABLE_ENV + _store_env(ctx),
        "ports": [{"name": "http", "containerPort": ROLLOUT_PORT, "protocol": "TCP"}],
        # Loading a checkpoint and compiling CUDA graphs takes minutes: up to 30 before liveness applies.
        "startupProbe": probe | {"failureThreshold": 180},
        "readinessProbe": probe | {"failureThreshold": 3},
        "livenessProbe": probe | {"failureThreshold": 6},
        "resources": _resources(run.resources.rollout_cpu or run.resources.cpu,
                                run.resources.rollout_memory or run.resources.memory, gpus),
        "volumeMounts": _mounts(ctx),
        "securityContext": container_security_context(),
    }
    selector = ctx.selector(ROLLOUT)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        # Kueue (deployment integration) reads the queue label on the Deployment and copies it to the pods.
        "metadata": ctx.metadata(ctx.rollout_name, ROLLOUT, ctx.queue_labels),
        "spec": {
            "replicas": 0 if ctx.spec.suspend else 1,
            "selector": {"matchLabels": selector},
            # A rolling update would hold a second set of GPUs; the trainer waits out the restart instead.
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": ctx.labels(ROLLOUT)},
                "spec": _pod_spec(ctx, container, gpus),
            },
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
    return env


TRAIN_COMMAND = ["ttrv", "train", "--spec", SPEC_PATH]


def _trainer_job(ctx: _Context) -> dict:
    run = ctx.spec.run
    res = run.resources
    scheduling = ctx.spec.scheduling
    env = _WRITABLE_ENV + _trainer_env(ctx)
    container = {
        "name": TRAINER_CONTAINER,
        "image": ctx.spec.image.trainer,
        "imagePullPolicy": ctx.spec.image.pull_policy,
        # torchrun's launcher (ttrv.launch) takes nnodes, nproc-per-node, node rank and master address from the
        # PET_* variables that the training operator sets in every replica, and exits with the failing worker's
        # own code, which restartPolicy ExitCode needs (plain torchrun exits 1 for any worker failure).
        "command": TRAIN_COMMAND,
        "env": env,
        "ports": [
            {"name": MASTER_PORT_NAME, "containerPort": MASTER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": _resources(res.cpu, res.memory, res.gpus_per_node),
        "volumeMounts": _mounts(ctx),
        "securityContext": container_security_context(),
        # A trainer that fails leaves the tail of its log as the pod's termination message, which the operator
        # copies into the run's status: why a run failed, without `kubectl logs` of a pod that may be gone.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }

    def replica(count: int) -> dict:
        return {
            "replicas": count,
            # Exit codes 128-255 (signals, the trainer's retryable failures) restart the pod, up to backoffLimit;
            # 1-127 fail the job at once.
            "restartPolicy": "ExitCode",
            "template": {
                "metadata": {"labels": ctx.labels(TRAINER)},
                "spec": _pod_spec(ctx, container, res.gpus_per_node),
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


def experiment_objects(experiment_meta: Mapping, spec: ExperimentSpec, trainer_api: str | None = None,
                       runtime: RuntimeRef | None = None) -> list[dict]:
    """Every object the controller creates for an experiment: each dataset's AdaptationRun and its children. The
    trainer's API is `trainer_api`, else the spec's scheduling.trainerApi, `auto` read as TrainJob (no cluster is
    asked here; the operator asks its API server)."""
    api = resolve_trainer_api(trainer_api or spec.scheduling.trainer_api)
    objects = []
    for dataset in spec.datasets:
        run = adaptation_run(experiment_meta, spec, dataset.name)
        objects += [run, *run_children(run, api, runtime)]
    return objects


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
    `ttrv train`'s launcher reads as it does under the v1 training operator. Env for the `node` container may only
    come through spec.trainer.env: the webhook refuses it in a runtime patch (plugins/jobset/jobset.go Validate).
    Kubeflow merges ttrv's patch into the runtime's JobSet template with a strategic merge patch (volumes and
    containers by name, volumeMounts by mountPath; pkg/runtime/core/trainingruntime.go mergeRuntimePatches).
    """
    res = ctx.spec.run.resources
    scheduling = ctx.spec.scheduling
    pod_spec: dict[str, Any] = {
        "volumes": [volume for volume in _volumes(ctx) if "emptyDir" not in volume],
        "containers": [{"name": TRAINJOB_CONTAINER,
                        "volumeMounts": [mount for mount in _mounts(ctx)
                                         if mount["name"] not in _RUNTIME_VOLUMES]}],
    }
    if res.gpus_per_node:
        if scheduling.node_selector:
            pod_spec["nodeSelector"] = dict(scheduling.node_selector)
        if scheduling.tolerations:
            pod_spec["tolerations"] = [resource_dump(t) for t in scheduling.tolerations]
    patch = {
        "manager": RUNTIME_PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
            "name": TRAINJOB_REPLICATED_JOB,
            "template": {"spec": {"template": {
                "metadata": {"labels": ctx.labels(TRAINER)},
                "spec": pod_spec,
            }}},
        }]}}},
    }
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
                "env": _trainer_env(ctx),
                "numNodes": res.nodes,
                "numProcPerNode": res.nproc_per_node,
                "resourcesPerNode": _resources(res.cpu, res.memory, res.gpus_per_node),
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
