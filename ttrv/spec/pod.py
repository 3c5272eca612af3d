"""The pod settings a platform team sets on every pod of an experiment (`ExperimentSpec.pod`, and the affinity and
topology spread of `scheduling`), with the Kubernetes core types they carry.

The core types (Affinity, TopologySpreadConstraint, EnvVar and their parts) are pydantic models of the fields of
k8s.io/api/core/v1/types.go (Kubernetes 1.33), strict as every spec model: an unknown or misspelt key is refused
with its field named, where the API server would prune it in silence, and the CRDs get a structural schema of each
(ttrv.crds), so `kubectl explain experiment.spec.scheduling.affinity` works. `k8s_dump` writes them as a pod spec
wants them. The rendered objects are validated against Kubernetes' own schemas by the tests.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from ttrv.labels import COMPONENT_LABEL, INSTANCE_LABEL, MANAGED_BY_LABEL, NAME_LABEL
from ttrv.spec.base import Quantity, StrictModel
from ttrv.spec.names import check_dns1123_subdomain, check_label_key, check_label_value

LabelKey = Annotated[str, AfterValidator(check_label_key)]
LabelValue = Annotated[str, AfterValidator(check_label_value)]
ObjectName = Annotated[str, AfterValidator(check_dns1123_subdomain)]
Weight = Annotated[int, Field(ge=1, le=100)]


def k8s_dump(model: BaseModel) -> dict:
    """A core-type model as the API writes it: camelCase, and fields left at an empty default (None, [], {})
    omitted, as `omitempty` omits them. A value the user set, even an empty selector `{}` (which matches every
    pod), stays."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value == field.default and field.default in (None, [], {}):
            continue
        out[field.alias or name] = _dump_value(value)
    return out


def _dump_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return k8s_dump(value)
    if isinstance(value, list):
        return [_dump_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _dump_value(item) for key, item in value.items()}
    return value


# --- label selectors and affinity (types.go: Affinity, NodeAffinity, PodAffinity, PodAntiAffinity; meta/v1
# LabelSelector) --------------------------------------------------------------------------------------------------

class LabelSelectorRequirement(StrictModel):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = []
    """Values for In and NotIn (non-empty there); empty for Exists and DoesNotExist."""


class LabelSelector(StrictModel):
    match_labels: dict[LabelKey, LabelValue] = {}
    match_expressions: list[LabelSelectorRequirement] = []


class NodeSelectorRequirement(StrictModel):
    key: str
    """A node label key (matchExpressions) or field name such as metadata.name (matchFields)."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] = []


class NodeSelectorTerm(StrictModel):
    match_expressions: list[NodeSelectorRequirement] = []
    match_fields: list[NodeSelectorRequirement] = []


class NodeSelector(StrictModel):
    node_selector_terms: Annotated[list[NodeSelectorTerm], Field(min_length=1)]
    """Terms ORed: a node matching any one of them is eligible."""


class PreferredSchedulingTerm(StrictModel):
    weight: Weight
    preference: NodeSelectorTerm


class NodeAffinity(StrictModel):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] = []


class PodAffinityTerm(StrictModel):
    label_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    namespaces: list[str] = []
    topology_key: Annotated[str, Field(min_length=1)]
    """Node label whose value defines the domain, e.g. kubernetes.io/hostname or topology.kubernetes.io/zone."""
    match_label_keys: list[str] = []
    mismatch_label_keys: list[str] = []


class WeightedPodAffinityTerm(StrictModel):
    weight: Weight
    pod_affinity_term: PodAffinityTerm


class PodAffinity(StrictModel):
    """Pod affinity or anti-affinity (the two have the same fields)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] = []
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] = []


class Affinity(StrictModel):
    """A pod's affinity (core/v1 Affinity)."""

    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


class TopologySpreadConstraint(StrictModel):
    """core/v1 TopologySpreadConstraint."""

    max_skew: Annotated[int, Field(ge=1)]
    topology_key: Annotated[str, Field(min_length=1)]
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    label_selector: LabelSelector | None = None
    """Pods counted in each domain; select them by ttrv's labels, e.g. matchLabels {app.kubernetes.io/component:
    trainer}, with matchLabelKeys [ttrv.io/run] to count only the pod's own run."""
    min_domains: Annotated[int, Field(ge=1)] | None = None
    node_affinity_policy: Literal["Honor", "Ignore"] | None = None
    node_taints_policy: Literal["Honor", "Ignore"] | None = None
    match_label_keys: list[LabelKey] = []


# --- environment (types.go: EnvVar, EnvVarSource) ----------------------------------------------------------------

class KeySelector(StrictModel):
    """A key of a Secret or ConfigMap in the experiment's namespace."""

    name: ObjectName
    key: Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")]
    optional: bool | None = None


class ObjectFieldSelector(StrictModel):
    field_path: Annotated[str, Field(min_length=1)]
    """E.g. metadata.name, status.podIP."""
    api_version: str | None = None


class EnvVarSource(StrictModel):
    secret_key_ref: KeySelector | None = None
    config_map_key_ref: KeySelector | None = None
    field_ref: ObjectFieldSelector | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        given = [name for name, source in (("secretKeyRef", self.secret_key_ref),
                                           ("configMapKeyRef", self.config_map_key_ref), ("fieldRef", self.field_ref))
                 if source is not None]
        if len(given) != 1:
            # The same words as its CEL rule (ttrv.crds.CROSS_FIELD_RULES), which cannot list what was given.
            raise ValueError("valueFrom needs exactly one of secretKeyRef, configMapKeyRef and fieldRef")
        return self


# What ttrv itself sets in its containers (ttrv.manifests.common: the writable folders, the store's credentials and
# endpoint, the metrics port, the rollout URL, DeepSpeed's accelerator on CPU, torch elastic's shutdown timeout);
# PET_* and the MASTER_*/RANK variables are the training operators' (Kubeflow Trainer's torch plugin, whose webhook
# refuses PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in a TrainJob:
# kubeflow/trainer pkg/constants/constants.go TorchRunReservedEnvNames; the v1 operator's PyTorchJob controller). A second definition would be refused by TrainJob's env (a list map keyed by
# name) or silently win over ttrv's in a Deployment.
RESERVED_ENV = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                "DS_ACCELERATOR", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE",
                "RANK", "LOCAL_RANK")
RESERVED_ENV_PREFIXES = ("TTRV_", "PET_")


class EnvVar(StrictModel):
    """An environment variable of every ttrv container: a value, or valueFrom a Secret's key (HF_TOKEN), a
    ConfigMap's key or a field of the pod."""

    name: Annotated[str, Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=253)]
    value: str | None = None
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: set value or valueFrom, not both")
        if self.name in RESERVED_ENV or self.name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(f"env {self.name}: ttrv or the training operator sets this variable; remove it (the "
                             f"store's credentials come from s3Secret, the shutdown timeout from "
                             f"pod.terminationGracePeriodSeconds)")
        return self


# --- the settings ------------------------------------------------------------------------------------------------

# Resources with a field of their own (resources.cpu / memory / gpusPerNode / rolloutGpus, pod.ephemeralStorage).
_OWN_RESOURCES = {"cpu": "resources.cpu (rolloutCpu)", "memory": "resources.memory (rolloutMemory)",
                  "nvidia.com/gpu": "resources.gpusPerNode (rolloutGpus)",
                  "ephemeral-storage": "pod.ephemeralStorage"}
_TTRV_LABELS = (NAME_LABEL, INSTANCE_LABEL, MANAGED_BY_LABEL, COMPONENT_LABEL)


def _extra_resources(value: dict[str, str]) -> dict[str, str]:
    for name in value:
        if name in _OWN_RESOURCES:
            raise ValueError(f"{name!r} has its own field; set {_OWN_RESOURCES[name]} instead")
        check_label_key(name, "resource name")  # a resource name is a qualified name, as a label key
    return value


ExtraResources = Annotated[dict[str, Quantity], AfterValidator(_extra_resources)]


class PodSettings(StrictModel):
    """Settings of every pod an experiment's runs create (the trainer's, under TrainJob or PyTorchJob, and the
    rollout service's), for a shared cluster's rules: a service account, secrets from the namespace, devices, and
    how long a preempted trainer has to checkpoint. docs/kubernetes.md ("Pod settings") shows them in use."""

    service_account_name: ObjectName | None = None
    """ServiceAccount of the pods (null: the namespace's `default`); its token is still not mounted, since the pods
    call nothing of the Kubernetes API. For a cluster whose admission or image pulls key on the account."""
    labels: dict[LabelKey, LabelValue] = {}
    """Extra labels on every pod; ttrv's own (app.kubernetes.io/*, ttrv.io/*) cannot be replaced."""
    annotations: dict[LabelKey, str] = {}
    """Extra annotations on every pod, e.g. Kueue's topology-aware placement
    (kueue.x-k8s.io/podset-preferred-topology) or a network attachment (k8s.v1.cni.cncf.io/networks)."""
    env: list[EnvVar] = []
    """Extra environment of every ttrv container, e.g. HF_TOKEN from a Secret (valueFrom.secretKeyRef) or NCCL_*
    settings; the variables ttrv or the training operator set are refused."""
    extra_resources: ExtraResources = {}
    """Extra resources of each trainer pod, requested and limited alike (extended resources must be), e.g.
    {rdma/hca: 1} for an InfiniBand device."""
    rollout_extra_resources: ExtraResources = {}
    """Extra resources of the rollout pod (the same form as extraResources)."""
    ipc_lock: bool = False
    """Add the IPC_LOCK capability to the trainer containers (every other capability stays dropped): InfiniBand
    verbs pin memory for RDMA (NCCL over IB) beyond the memlock limit. Pod Security's restricted and baseline
    levels both refuse it: the namespace needs the privileged level."""
    termination_grace_period_seconds: Annotated[int, Field(ge=0, le=86_400)] = 900
    """Seconds a trainer pod gets between SIGTERM (preemption, eviction, drain) and SIGKILL. On SIGTERM the trainer
    finishes its step, then writes a checkpoint to the store; for a 7B model with ZeRO that is about 100 GB (2
    bytes of bf16 weights plus 12 of fp32 master weights and Adam moments a parameter), minutes at the 0.5-1 GB/s a
    node uploads, after a step of sampling that itself takes minutes: Kubernetes' 30 s loses it, and the run
    restarts from the previous checkpoint. 900 s (15 min) covers both; a preempting workload waits as long at
    worst. torch elastic's own SIGTERM-to-SIGKILL wait (TORCH_ELASTIC_SHUTDOWN_TIMEOUT) follows it."""
    shm_size_limit: Quantity | None = None
    """sizeLimit of /dev/shm (a memory-backed emptyDir, where NCCL and vLLM's workers exchange data); its pages
    count against the pod's memory limit. null: no limit of its own."""
    ephemeral_storage: Quantity | None = None
    """ephemeral-storage request of the trainer and rollout pods: the node disk that the model download (/cache)
    and temporary files take, so the scheduler places a pod where it fits (a 7B checkpoint is about 16 GB).
    null: none requested."""

    @field_validator("labels")
    @classmethod
    def _not_ttrv_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key in _TTRV_LABELS or key.startswith("ttrv.io/"):
                raise ValueError(f"label {key!r} is set by ttrv (its controllers select pods by it); use a key of "
                                 "your own")
        return value
