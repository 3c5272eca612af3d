"""The Experiment's spec: several datasets, images, scheduling and volumes; `ExperimentSpec.run_spec` derives
one `RunSpec` per dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from ttrv.spec.base import (
    NAME_PATTERN,
    SUBDOMAIN_PATTERN,
    SpecError,
    StrictModel,
    check_dns_label,
    load_yaml,
    parse_spec,
    repeated,
)
from ttrv.spec.names import (
    check_dns1123_subdomain,
    check_image_reference,
    check_label_key,
    check_label_value,
    check_mount_path,
)
from ttrv.spec.pod import Affinity, ObjectName, PodSettings, TopologySpreadConstraint
from ttrv.spec.run import AdaptationSettings, BudgetSpec, DataSpec, RunSpec

ImageReference = Annotated[str, AfterValidator(check_image_reference)]
LabelKey = Annotated[str, AfterValidator(check_label_key)]
LabelValue = Annotated[str, AfterValidator(check_label_value)]


def _queue_name(value: str) -> str:
    """A Kueue LocalQueue's name, which is also the value of the kueue.x-k8s.io/queue-name label on the children."""
    return check_label_value(check_dns1123_subdomain(value))


class DatasetSpec(DataSpec):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Dataset name (DNS label): names its adaptation run."""
    budget: BudgetSpec | None = None
    """This dataset's limits, replacing the experiment's `budget` as a whole (null: the experiment's)."""


class ImageSpec(StrictModel):
    trainer: ImageReference = "ghcr.io/ttrv/ttrv-trainer:0.1.0"
    """Image of the trainer pods (torch, DeepSpeed, transformers, ttrv)."""
    rollout: ImageReference = "ghcr.io/ttrv/ttrv-trainer:0.1.0"
    """Image of the rollout service (vLLM + ttrv); the same image by default."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """imagePullPolicy of all pods."""
    pull_secrets: list[ObjectName] = []
    """Secrets (type kubernetes.io/dockerconfigjson, in the experiment's namespace) every pod pulls its image with
    (the pods' imagePullSecrets)."""


class S3SecretRef(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "ttrv-s3"
    """Secret holding the object-store credentials."""
    access_key_key: str = "AWS_ACCESS_KEY_ID"
    """Key of the access key id in that Secret."""
    secret_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """Key of the secret access key in that Secret."""


# Where the pods mount their own volumes (ttrv/manifests/; the last is the trainer's status token, access.py);
# a data volume there would hide them.
RESERVED_MOUNT_PATHS = ("/etc/ttrv", "/tmp", "/cache", "/dev/shm", "/var/run/secrets/ttrv.io/status")


class VolumeSpec(StrictModel):
    """A PersistentVolumeClaim mounted into the trainer and rollout pods: how dataset files, their images or a
    model folder reach the pods (`datasets[].path`, `pathMap` and `model.path` then name paths under
    `mountPath`)."""

    claim_name: Annotated[str, Field(pattern=SUBDOMAIN_PATTERN)]
    """Name of the PersistentVolumeClaim, in the experiment's namespace."""
    mount_path: str
    """Absolute path where the pods see it, e.g. /data."""
    read_only: bool = True
    """Mount read-only (the pods only read data and models)."""

    @field_validator("mount_path")
    @classmethod
    def _usable_mount_path(cls, value: str) -> str:
        return check_mount_path(value, reserved=RESERVED_MOUNT_PATHS)


class Toleration(StrictModel):
    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class SchedulingSpec(StrictModel):
    queue_name: Annotated[str, AfterValidator(_queue_name)] | None = None
    """Kueue LocalQueue; when set, children carry kueue.x-k8s.io/queue-name and are created suspended."""
    priority_class_name: Annotated[str, AfterValidator(check_dns1123_subdomain)] | None = None
    """PriorityClass of the trainer and rollout pods."""
    node_selector: dict[LabelKey, LabelValue] = {}
    """Node labels the GPU pods must match."""
    tolerations: list[Toleration] = [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    """Tolerations of every pod (trainer and rollout, with GPUs or without): a tainted node pool of the team's
    takes all of them."""
    affinity: Affinity | None = None
    """Affinity of every pod (node affinity, pod affinity and anti-affinity), as in a pod spec."""
    topology_spread_constraints: list[TopologySpreadConstraint] = []
    """How every pod spreads across nodes or zones, as in a pod spec. A TrainJob cannot carry them (Kubeflow
    Trainer's runtime patches have no such field), so they need trainerApi pytorchjob; on the TrainJob path spread
    the trainers with an affinity or in the training runtime (docs/kubernetes.md, "Pod settings")."""
    backoff_limit: Annotated[int, Field(ge=0)] = 3
    """Restarts of a trainer after retryable exit codes (128-255) before its run fails; the operator counts them
    (the training operator alone does not cap restarts under restartPolicy ExitCode)."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 3600
    """How long a finished PyTorchJob is kept."""
    trainer_api: Literal["auto", "trainjob", "pytorchjob"] = "auto"
    """Which training API runs the trainer: trainjob (Kubeflow Trainer v2, trainer.kubeflow.org TrainJob),
    pytorchjob (the v1 training operator, kubeflow.org PyTorchJob), or auto: the one the API server serves, TrainJob
    first (the operator decides when it starts; `ttrv render` then shows TrainJob)."""

    @model_validator(mode="after")
    def _spread_needs_pytorchjob(self) -> SchedulingSpec:
        # Refused here, at admission, for auto as well: the operator picks auto's API only once it runs, and a
        # TrainJob's runtime patch has no topologySpreadConstraints (kubeflow/trainer trainjob_types.go
        # PodSpecPatch).
        if self.topology_spread_constraints and self.trainer_api != "pytorchjob":
            raise ValueError(f"topologySpreadConstraints need trainerApi: pytorchjob (it is {self.trainer_api}): a "
                             "TrainJob cannot carry them; set trainerApi: pytorchjob, or spread the pods with affinity "
                             "(pod anti-affinity) or Kueue's topology annotations in pod.annotations")
        return self


class ExperimentSpec(AdaptationSettings):
    """An experiment: the same adaptation settings applied to each of its datasets."""

    datasets: Annotated[list[DatasetSpec], Field(min_length=1, max_length=1000)]
    """One adaptation run per dataset (at most 1000: each is an AdaptationRun the operator reconciles)."""
    max_parallel_runs: Annotated[int, Field(gt=0, le=1000)] = 1
    """Adaptation runs active at once; the rest wait Pending, in order (at most 1000, as datasets)."""
    suspend: bool = False
    """Suspend every child (PyTorchJobs suspended, rollout services scaled to zero)."""
    image: ImageSpec = ImageSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    s3_secret: S3SecretRef = S3SecretRef()
    """Object-store credentials, by reference only."""
    volumes: list[VolumeSpec] = []
    """PersistentVolumeClaims mounted into every trainer and rollout pod (datasets, images, models)."""
    pod: PodSettings = PodSettings()
    """Settings of every pod: service account, labels and annotations, extra env and resources, InfiniBand, the
    grace period to checkpoint in, /dev/shm and disk."""

    @field_validator("volumes")
    @classmethod
    def _distinct_mount_paths(cls, value: list[VolumeSpec]) -> list[VolumeSpec]:
        paths = [v.mount_path for v in value]
        for path in paths:
            nested = [other for other in paths if other != path and other.startswith(path + "/")]
            if paths.count(path) > 1 or nested:
                raise ValueError(f"mountPath {path} is used twice or holds another volume's mountPath; give each "
                                 "volume its own folder")
        return value

    @field_validator("datasets")
    @classmethod
    def _unique_dataset_names(cls, value: list[DatasetSpec]) -> list[DatasetSpec]:
        if duplicates := repeated([d.name for d in value]):
            raise ValueError(f"dataset names must be unique; rename {', '.join(duplicates)}")
        return value

    def run_spec(self, dataset: str, storage_uri: str | None = None) -> RunSpec:
        """The RunSpec of one dataset's adaptation run (its store prefix is `<storage.uri>/<dataset>`)."""
        entry = next((d for d in self.datasets if d.name == dataset), None)
        if entry is None:
            raise SpecError(f"datasets: no dataset named {dataset!r}; known: {[d.name for d in self.datasets]}")
        shared = {name: getattr(self, name) for name in AdaptationSettings.model_fields}
        data = DataSpec(**entry.model_dump(exclude={"name", "budget"}))
        if entry.budget is not None:
            shared["budget"] = entry.budget
        storage = self.storage.model_copy(
            update={"uri": storage_uri or f"{self.storage.uri.rstrip('/')}/{dataset}"}
        )
        return RunSpec(**(shared | {"storage": storage, "name": dataset, "data": data}))



def load_experiment(path: str | Path) -> tuple[dict, ExperimentSpec]:
    """An Experiment resource (apiVersion/kind/metadata/spec) or a bare spec; returns (metadata, spec)."""
    document = load_yaml(path)
    if isinstance(document, dict) and "kind" in document:
        if document.get("kind") != "Experiment":
            raise SpecError(f"{path}: kind: expected Experiment, got {document.get('kind')!r}; write "
                            "apiVersion: ttrv.io/v1alpha1 and kind: Experiment")
        metadata = document.get("metadata") or {}
        check_dns_label(metadata.get("name", ""), f"{path}: metadata.name")
        return metadata, parse_spec(document.get("spec"), ExperimentSpec, f"{path}: spec")
    return {"name": Path(path).stem, "namespace": "default"}, parse_spec(document, ExperimentSpec, str(path))
