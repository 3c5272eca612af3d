"""Run and experiment specs: the single source of truth.

`RunSpec` is one adaptation run (one dataset): `ttrv run` and the trainer pod read it. `ExperimentSpec` is what a
user installs with `helm install` (several datasets, scheduling, images); the controller derives one `RunSpec` per
dataset from it with `ExperimentSpec.run_spec`. The chart's `values.schema.json` and the CRDs' openAPIV3Schema are
generated from these models (`ttrv spec schema`), and a test fails when the committed files drift.

Keys are camelCase, as in every Kubernetes resource; snake_case names are accepted too. Defaults are the TTRV
reference's settings (examples/ttrv/run.sh), so a spec only states what differs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from ttrv.net import holds_userinfo

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
# A positive Kubernetes resource quantity (apimachinery's resource.Quantity, without signs and exponents).
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def _integer_quantity(value: Any) -> Any:
    """`cpu: 8` (YAML, `helm --set`) means "8", as in a pod's resources."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else value


# int-or-string as in a pod's resources; crds.py turns the schema into the API server's x-kubernetes-int-or-string.
Quantity = Annotated[str, BeforeValidator(_integer_quantity), Field(pattern=QUANTITY_PATTERN),
                     WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0},
                                               {"type": "string", "pattern": QUANTITY_PATTERN}],
                                     "x-kubernetes-int-or-string": True})]


class SpecError(ValueError):
    """A spec that cannot run; the message names each bad field and how to fix it."""


DNS_LABEL_RULE = ("a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or "
                  "digit, e.g. 'imagenet-r'")


def check_dns_label(value: Any, field: str, why: str = "") -> str:
    """`value` when it is a DNS label (RFC 1123, what Kubernetes requires of namespaces and of the names objects are
    derived from), else a SpecError naming `field` and the value, and `why` the name matters ("; it names ...")."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise SpecError(f"{field}: {value!r} must be {DNS_LABEL_RULE}{why}")
    return value


class StrictModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        # NaN and infinity in any float field: a NaN reward "succeeds" while DeepSpeed skips every step, and the
        # values end up in events.jsonl and progress.json, which strict JSON readers reject.
        allow_inf_nan=False,
    )


class LoraSpec(StrictModel):
    rank: PositiveInt = 16
    """LoRA rank r."""
    alpha: PositiveInt = 32
    """LoRA scaling numerator (scale = alpha / rank)."""
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Names of the language-model linear layers that get adapters."""


class ModelSpec(StrictModel):
    path: str = "ttrv://tiny-qwen2vl"
    """Checkpoint folder: a local path, file://…, s3://bucket/prefix, a Hugging Face hub id, or ttrv://tiny-qwen2vl
    (the tiny model that ships with ttrv)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype: auto is bfloat16 on GPU and float32 on CPU."""
    trainable: Literal["language", "all"] = "language"
    """Which parts are updated: the language model only (vision tower frozen, as the reference does for
    InternVL) or everything."""
    lora: LoraSpec | None = None
    """Train LoRA adapters instead of full weights; the adapter alone is published to the rollout service."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """Attention kernel of the trainer's model."""


class DataSpec(StrictModel):
    path: str
    """Test-set file: reference JSON (a list of records), verl parquet or JSONL; ttrv://tiny-shapes/<split> for the
    bundled benchmark."""
    format: Literal["auto", "reference_json", "verl_parquet", "jsonl"] = "auto"
    """File format; auto decides by extension and content."""
    path_map: list[str] = []
    """Image path-prefix rewrites OLD=NEW, applied in order (the reference's files carry absolute paths)."""
    subset_size: PositiveInt | None = 20
    """Size of the unlabeled adaptation subset drawn from the test set (reference: 20 or 500); null = all."""
    subset_seed: int = 0
    """Seed of the subset draw."""
    single_example: bool = False
    """Adapt on one randomly chosen example, repeated `singleExampleRepeats` times (the paper's extreme case)."""
    single_example_repeats: PositiveInt = 4
    """Copies of the single example in single-example mode."""
    heldout_path: str | None = None
    """Optional disjoint split, never adapted on, to measure generalisation."""

    @field_validator("path_map")
    @classmethod
    def _path_map_pairs(cls, value: list[str]) -> list[str]:
        for item in value:
            old, sep, new = item.partition("=")
            if not sep or not old:
                raise ValueError(f"{item!r} is not OLD=NEW; write e.g. '/data/authors/imagenet=/mnt/imagenet'")
        return value


class RolloutSpec(StrictModel):
    votes: Annotated[int, Field(ge=2)] = 32
    """N: answers sampled per prompt; each answer's reward is its share of these votes."""
    group_size: PositiveInt = 16
    """G: how many of the N samples per prompt are trained on (the first G)."""
    temperature: Annotated[float, Field(gt=0.0, le=5.0)] = 1.0
    """Sampling temperature of the votes."""
    top_p: Probability = 1.0
    """Nucleus sampling mass of the votes."""
    max_new_tokens: PositiveInt = 1024
    """Longest response sampled."""
    backend: Literal["inprocess", "service"] = "inprocess"
    """inprocess: the trainer samples with its own Hugging Face engine; service: it calls a separate rollout
    service (`ttrv serve`, vLLM or Hugging Face) that loads each weight version from the store."""
    engine: Literal["auto", "vllm", "hf"] = "auto"
    """Engine of the rollout service: auto takes vLLM where it is installed, else Hugging Face."""
    max_staleness: Annotated[int, Field(ge=0, le=4)] = 0
    """0: step k+1 samples from weight version k (on-policy); 1: one-step-off asynchronous rollout."""

    @model_validator(mode="after")
    def _group_within_votes(self) -> RolloutSpec:
        if self.group_size > self.votes:
            raise ValueError(
                f"groupSize ({self.group_size}) > votes ({self.votes}): the trained group is taken from the votes; "
                "set groupSize <= votes (reference: votes 32, groupSize 16)"
            )
        return self


class RewardSpec(StrictModel):
    extractor: Literal["choice", "numeric", "text"] = "choice"
    """How an answer is read from a response: a multiple-choice letter, a number, or normalised free text."""
    choices: Annotated[str, Field(pattern=r"^[A-Z]{2,26}$")] = "ABCD"
    """Option letters for the choice extractor."""
    entropy_weight: Annotated[float, Field(ge=0.0)] = 0.75
    """w in r_j = count(a_j)/N - w * H_norm (reference 0.75)."""
    entropy_mode: Literal["reference", "batch", "scale"] = "scale"
    """How the entropy term acts: reference (per-group normalisation, which cancels it: the reference's behaviour),
    scale (each prompt's group advantages times 1 - w * H_norm: updates from prompts whose votes disagree are
    damped), batch (advantages normalised over the whole step's batch, so low-entropy prompts are favoured)."""
    invalid_reward: float = -1.0
    """Reward of a response with no readable answer (not counted as a vote class)."""


class GRPOSpec(StrictModel):
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 5e-7
    """Peak learning rate of AdamW."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.03
    """Share of all optimiser steps spent in linear warm-up."""
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.01
    """AdamW weight decay."""
    grad_clip: Annotated[float, Field(gt=0.0)] = 1.0
    """Global gradient-norm clip."""
    kl_coef: Annotated[float, Field(ge=0.0)] = 0.001
    """Weight of the KL penalty to the frozen base model (0 disables the reference model)."""
    kl_kind: Literal["low_var_kl", "kl", "mse"] = "low_var_kl"
    """KL estimator: k3 (low_var_kl, clamped to [-10, 10]), k1 (kl) or k2 (mse)."""
    clip_low: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    """PPO ratio clip below 1."""
    clip_high: Annotated[float, Field(gt=0.0)] = 0.2
    """PPO ratio clip above 1."""
    dual_clip: Annotated[float, Field(gt=1.0)] = 3.0
    """Dual-clip constant c bounding the loss of negative-advantage tokens."""
    epochs: PositiveInt = 2
    """Passes over the adaptation subset."""
    prompts_per_step: PositiveInt = 4
    """Prompts per optimiser step (the reference uses one per GPU)."""
    ppo_epochs: PositiveInt = 1
    """Gradient passes over each step's batch."""
    micro_batch_size: PositiveInt = 16
    """Sequences per forward/backward on one rank."""


class EvalSpec(StrictModel):
    before: bool = True
    """Evaluate the base model before adapting."""
    after: bool = True
    """Evaluate the adapted model at the end."""
    full_test_set: bool = True
    """Also evaluate on the whole test set (the reference's transductive setting), not only the subset."""
    limit: PositiveInt | None = None
    """Evaluate on at most this many prompts of each split (null = all)."""
    maj_votes: Annotated[int, Field(ge=0)] = 0
    """Votes for maj@N evaluation; 0 = rollout.votes."""
    max_new_tokens: PositiveInt | None = None
    """Longest greedy answer in evaluation; null = rollout.max_new_tokens."""
    every: Annotated[int, Field(ge=0)] = 0
    """Also evaluate greedy accuracy on the adaptation subset every this many steps (0 = never)."""


class GuardSpec(StrictModel):
    enabled: bool = True
    """Stop and roll back to the last healthy weights when the policy collapses (label-free signals)."""
    entropy_below: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Collapse needs the mean vote entropy of a step at or below this..."""
    dominant_answer_share: Probability = 0.9
    """...and one answer to win this share of all votes across different prompts, or the response length to fall
    below `lengthRatio` of its first-step value."""
    length_ratio: Probability = 0.5
    """Response-length collapse threshold relative to the first step."""
    patience: PositiveInt = 2
    """Consecutive collapsed steps before the guard fires."""


# The value is not repeated: it holds a credential, and the message reaches logs and the resource's status.
_NO_USERINFO = ("holds credentials (user:password@); remove them: the store reads them from AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY, in a cluster from the Secret named by s3Secret")


class StorageSpec(StrictModel):
    uri: str = "file://runs/store"
    """Where weight versions, checkpoints and progress go: file:///path or s3://bucket/prefix. Credentials never go
    here: they come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (a Secret in the cluster)."""
    endpoint: str | None = None
    """S3 endpoint (host:port or URL) for s3:// URIs; default from AWS_ENDPOINT_URL."""
    keep_versions: PositiveInt = 3
    """Weight versions kept; older ones are garbage-collected unless being loaded."""
    checkpoint_every: Annotated[int, Field(ge=0)] = 10
    """Full checkpoint every K steps (and on SIGTERM); 0 = only on SIGTERM and at the end."""

    @field_validator("endpoint")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        if value is not None and holds_userinfo(value):
            raise ValueError(_NO_USERINFO)
        return value

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition("://")
        if scheme == "s3" and holds_userinfo(rest.split("/", 1)[0]):
            raise ValueError(_NO_USERINFO)
        if not sep or scheme not in ("file", "s3"):
            raise ValueError(f"{value!r} has no known scheme; use file:///abs/path, file://rel/path or s3://bucket/prefix")
        if scheme == "s3" and not rest.split("/", 1)[0]:
            raise ValueError(f"{value!r} names no bucket; write s3://bucket/prefix")
        if ".." in rest.split("/"):
            raise ValueError(f"{value!r} contains '..'; write the store prefix without parent-directory steps")
        return value


class ResourcesSpec(StrictModel):
    nodes: PositiveInt = 1
    """Trainer nodes (PyTorchJob Master + nodes-1 Workers)."""
    gpus_per_node: Annotated[int, Field(ge=0)] = 1
    """GPUs per trainer node (nprocPerNode); 0 trains on CPU."""
    processes_per_node: PositiveInt | None = None
    """Data-parallel processes per node; default one per GPU (one on CPU)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """ZeRO-Offload of optimiser states to CPU memory."""
    gradient_checkpointing: bool = False
    """Activation checkpointing in the trainer's model."""
    cpu: Quantity = "8"
    """CPU request of each trainer pod."""
    memory: Quantity = "64Gi"
    """Memory request of each trainer pod."""
    rollout_gpus: Annotated[int, Field(ge=0)] = 1
    """GPUs of the rollout service (vLLM tensor-parallel size)."""
    rollout_gpu_memory_utilization: Probability = 0.85
    """Share of each rollout GPU that vLLM may take."""
    rollout_cpu: Quantity | None = None
    """CPU request of the rollout pod; default: `cpu`."""
    rollout_memory: Quantity | None = None
    """Memory request of the rollout pod; default: `memory`."""

    @property
    def nproc_per_node(self) -> int:
        return self.processes_per_node or max(1, self.gpus_per_node)


class AdaptationSettings(StrictModel):
    """What every adaptation run of an experiment shares."""

    seed: int = 0
    """Seed of sampling, shuffling and initialisation."""
    model: ModelSpec = ModelSpec()
    rollout: RolloutSpec = RolloutSpec()
    reward: RewardSpec = RewardSpec()
    grpo: GRPOSpec = GRPOSpec()
    eval: EvalSpec = EvalSpec()
    guard: GuardSpec = GuardSpec()
    storage: StorageSpec = StorageSpec()
    resources: ResourcesSpec = ResourcesSpec()


class RunSpec(AdaptationSettings):
    """One adaptation run on one dataset."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "ttrv-run"
    """Run name (DNS label): names the store prefix and, in a cluster, the objects."""
    data: DataSpec


class DatasetSpec(DataSpec):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Dataset name (DNS label): names its adaptation run."""


class ImageSpec(StrictModel):
    trainer: str = "ghcr.io/ttrv/ttrv-trainer:0.1.0"
    """Image of the trainer pods (torch, DeepSpeed, transformers, ttrv)."""
    rollout: str = "ghcr.io/ttrv/ttrv-trainer:0.1.0"
    """Image of the rollout service (vLLM + ttrv); the same image by default."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """imagePullPolicy of all pods."""


class S3SecretRef(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "ttrv-s3"
    """Secret holding the object-store credentials."""
    access_key_key: str = "AWS_ACCESS_KEY_ID"
    """Key of the access key id in that Secret."""
    secret_key_key: str = "AWS_SECRET_ACCESS_KEY"
    """Key of the secret access key in that Secret."""


# Where the pods mount their own volumes (manifests.py); a data volume there would hide them.
RESERVED_MOUNT_PATHS = ("/etc/ttrv", "/tmp", "/cache", "/dev/shm")


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
        if not value.startswith("/") or value.rstrip("/") == "" or ".." in value.split("/"):
            raise ValueError(f"{value!r} must be an absolute path below / without '..', e.g. /data")
        path = value.rstrip("/")
        for reserved in RESERVED_MOUNT_PATHS:
            if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"):
                raise ValueError(f"{value!r} overlaps {reserved}, which the pods use themselves; mount it "
                                 "elsewhere, e.g. /data")
        return path


class Toleration(StrictModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class SchedulingSpec(StrictModel):
    queue_name: str | None = None
    """Kueue LocalQueue; when set, children carry kueue.x-k8s.io/queue-name and are created suspended."""
    priority_class_name: str | None = None
    """PriorityClass of the trainer and rollout pods."""
    node_selector: dict[str, str] = {}
    """Node labels the GPU pods must match."""
    tolerations: list[Toleration] = [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    """Tolerations of the GPU pods."""
    backoff_limit: Annotated[int, Field(ge=0)] = 3
    """Restarts of a trainer after retryable exit codes (128-255) before its run fails; the operator counts them
    (the training operator alone does not cap restarts under restartPolicy ExitCode)."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] = 3600
    """How long a finished PyTorchJob is kept."""


class ExperimentSpec(AdaptationSettings):
    """An experiment: the same adaptation settings applied to each of its datasets."""

    datasets: Annotated[list[DatasetSpec], Field(min_length=1)]
    """One adaptation run per dataset."""
    max_parallel_runs: PositiveInt = 1
    """Adaptation runs active at once; the rest wait Pending, in order."""
    suspend: bool = False
    """Suspend every child (PyTorchJobs suspended, rollout services scaled to zero)."""
    image: ImageSpec = ImageSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    s3_secret: S3SecretRef = S3SecretRef()
    """Object-store credentials, by reference only."""
    volumes: list[VolumeSpec] = []
    """PersistentVolumeClaims mounted into every trainer and rollout pod (datasets, images, models)."""

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
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"dataset names must be unique; rename {', '.join(duplicates)}")
        return value

    def run_spec(self, dataset: str, storage_uri: str | None = None) -> RunSpec:
        """The RunSpec of one dataset's adaptation run (its store prefix is `<storage.uri>/<dataset>`)."""
        entry = next((d for d in self.datasets if d.name == dataset), None)
        if entry is None:
            raise SpecError(f"datasets: no dataset named {dataset!r}; known: {[d.name for d in self.datasets]}")
        shared = {name: getattr(self, name) for name in AdaptationSettings.model_fields}
        data = DataSpec(**entry.model_dump(exclude={"name"}))
        storage = self.storage.model_copy(
            update={"uri": storage_uri or f"{self.storage.uri.rstrip('/')}/{dataset}"}
        )
        return RunSpec(**(shared | {"storage": storage, "name": dataset, "data": data}))


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: dotted.field: message`, with the field spelled as in the YAML."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling (`ttrv spec schema` lists every field)"
        elif problem["type"] == "missing":
            message = "required field is missing; add it"
        elif problem["type"] == "finite_number":
            message = f"{problem['input']!r} is not a finite number; write a number (NaN and infinity are refused)"
        elif problem["type"] == "string_pattern_mismatch" and problem["ctx"]["pattern"] == NAME_PATTERN:
            message += f"; {DNS_LABEL_RULE}"
        elif problem["type"] == "string_pattern_mismatch" and problem["ctx"]["pattern"] == QUANTITY_PATTERN:
            message += "; a Kubernetes quantity, e.g. '8', '500m' (CPU) or '64Gi' (memory)"
        elif problem["type"] == "string_pattern_mismatch" and problem["ctx"]["pattern"] == SUBDOMAIN_PATTERN:
            message += "; a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending " \
                       "with a letter or digit, e.g. 'imagenet-data'"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def parse_spec(document: Any, model: type[BaseModel], source: str = "spec"):
    """Validate a parsed YAML/JSON document; raises SpecError naming every bad field."""
    if not isinstance(document, dict):
        raise SpecError(f"{source}: expected a mapping of fields at the top level, got {type(document).__name__}")
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, source)) from None


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read spec ({error.strerror}); check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML; fix it where shown: {error}") from None


def load_run_spec(path: str | Path) -> RunSpec:
    return parse_spec(load_yaml(path), RunSpec, str(path))


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


# --- Cluster resources: the AdaptationRun spec and the status of both custom resources. The CRDs' schemas are
# generated from these models (ttrv/crds.py), so the operator, `ttrv render` and the API server agree.

RunPhase = Literal["Pending", "Queued", "Running", "Preempted", "Succeeded", "Failed", "Suspended"]
"""Pending: waiting for a slot of `maxParallelRuns` (no AdaptationRun yet); Queued: created, waiting for the
rollout service, Kueue admission, its pods or a retry; Running: trainer running; Preempted: Kueue took the quota
back after the trainer had started (it resumes from its newest checkpoint once re-admitted); Succeeded / Failed:
finished; Suspended: the experiment is suspended."""
RUN_FINISHED: tuple[RunPhase, ...] = ("Succeeded", "Failed")
"""The terminal phases of a run: nothing changes a run once it has one."""

RunStage = Literal["evaluating-before", "adapting", "evaluating-after", "finished"]
"""What a running trainer does, as its progress.json's `stage` says: evaluating-before: measuring the base model
(greedy and maj@N over the test set, the subset and the held-out split); adapting: optimiser steps;
evaluating-after: measuring the adapted model; finished: report written."""

ExperimentPhase = Literal["Pending", "Running", "Succeeded", "PartiallySucceeded", "Failed", "Suspended"]
"""Pending: no run has started training yet; Running: at least one has; Succeeded: every dataset succeeded;
PartiallySucceeded: every dataset finished and some failed; Failed: every dataset failed, or the spec cannot run;
Suspended: `suspend: true`."""
EXPERIMENT_FINISHED: tuple[ExperimentPhase, ...] = ("Succeeded", "PartiallySucceeded", "Failed")
"""The phases of an experiment whose every dataset has finished (or whose spec cannot run)."""


class AdaptationRunSpec(StrictModel):
    """One dataset's adaptation run in a cluster: created by the controller from its Experiment, never by hand."""

    experiment: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Name of the owning Experiment."""
    dataset: Annotated[str, Field(pattern=NAME_PATTERN)]
    """Name of the dataset (an entry of the Experiment's `datasets`)."""
    run: RunSpec
    """The resolved RunSpec (`ExperimentSpec.run_spec`), store prefix included; mounted into the pods as run.yaml."""
    image: ImageSpec = ImageSpec()
    scheduling: SchedulingSpec = SchedulingSpec()
    s3_secret: S3SecretRef = S3SecretRef()
    """Object-store credentials, by reference only."""
    volumes: list[VolumeSpec] = []
    """PersistentVolumeClaims mounted into the trainer and rollout pods."""
    suspend: bool = False
    """Trainer suspended and rollout service scaled to zero."""


class Condition(StrictModel):
    """A Kubernetes condition (the shape of metav1.Condition)."""

    type: str
    """Ready, Running, Succeeded, Failed; SpecChangeRejected on an Experiment."""
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    """CamelCase reason of the last transition."""
    message: str = ""
    """Human-readable detail of the last transition."""
    last_transition_time: str | None = None
    """RFC 3339 time of the last status change."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class AdaptationRunStatus(StrictModel):
    """What the controller reports about one adaptation run."""

    phase: RunPhase = "Pending"
    reason: str = ""
    """CamelCase reason of the phase (e.g. WaitingForRollout, QuotaPending, TrainerFailed)."""
    observed_generation: int | None = None
    """metadata.generation the status was computed from."""
    store_uri: str | None = None
    """Object-store prefix of the run: weight versions, checkpoints, progress, report."""
    step: Annotated[int, Field(ge=0)] = 0
    """Optimiser steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimiser steps of the whole run, once known."""
    progress: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    """Percent of the optimiser steps done."""
    estimated_remaining_seconds: Annotated[int, Field(ge=0)] | None = None
    """The trainer's estimate of the time left, in seconds."""
    eta: str | None = None
    """The same estimate for people, e.g. 1h20m."""
    weight_version: Annotated[int, Field(ge=0)] | None = None
    """Latest weight version published to the store."""
    checkpoint_step: Annotated[int, Field(ge=0)] | None = None
    """Step of the newest full checkpoint: where a restarted or preempted trainer resumes."""
    base_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Greedy accuracy of the base model (eval before adapting)."""
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Latest greedy accuracy of the adapted model."""
    # A string, not the RunStage enum: clearing it writes null, and the API server's enum check rejects a null even
    # where the field is nullable (kube-openapi pkg/validation/validate/schema.go runs the common validator on null
    # data, and validator.go's basicCommonValidator.Validate fails any value not in a non-empty enum). The operator
    # only writes stages that operators/progress.py accepted.
    stage: str | None = None
    """What the running trainer does: evaluating-before, adapting, evaluating-after or finished (while Running)."""
    eval_prompts_done: Annotated[int, Field(ge=0)] | None = None
    """Prompts done of the evaluation in progress (all its passes: greedy and maj@N, all splits)."""
    eval_prompts_total: Annotated[int, Field(ge=0)] | None = None
    """Prompts of all the passes of the evaluation in progress."""
    eval_progress: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    """Percent of the evaluation in progress done (set while the trainer evaluates)."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Trainer restarts after retryable failures (in place by the training operator, or a new PyTorchJob)."""
    last_restart: str | None = None
    """Marker of the last restart counted (a Restarting condition's time, or a failed PyTorchJob's uid), so that
    each restart is counted once."""
    exit_code: int | None = None
    """Exit code of the trainer's last failed container, when seen."""
    start_time: str | None = None
    """RFC 3339 time the trainer started."""
    completion_time: str | None = None
    """RFC 3339 time the run finished."""
    message: str = ""
    """Why the run is in its phase, for `kubectl describe`."""
    conditions: list[Condition] = []


class DatasetStatus(StrictModel):
    """One row of an Experiment's per-dataset table."""

    name: str
    """Dataset name."""
    run: str | None = None
    """Name of its AdaptationRun, once created."""
    phase: RunPhase = "Pending"
    progress: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    """Percent of the run's optimiser steps done."""
    step: Annotated[int, Field(ge=0)] = 0
    """Optimiser steps done."""
    total_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimiser steps of the whole run, once known."""
    eta: str | None = None
    """Estimated time left, e.g. 1h20m."""
    weight_version: Annotated[int, Field(ge=0)] | None = None
    """Latest weight version published to the store."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Trainer restarts after retryable failures."""
    base_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Greedy accuracy of the base model."""
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Latest greedy accuracy of the adapted model."""
    message: str = ""
    """Why the run is in its phase (set while it is not plainly running or done)."""


class ExperimentStatus(StrictModel):
    """What the controller reports about an experiment as a whole."""

    phase: ExperimentPhase = "Pending"
    observed_generation: int | None = None
    """metadata.generation the status was computed from."""
    datasets_total: Annotated[int, Field(ge=0)] = 0
    """Datasets in the experiment."""
    datasets_running: Annotated[int, Field(ge=0)] = 0
    """Datasets whose trainer is running."""
    datasets_done: Annotated[int, Field(ge=0)] = 0
    """Datasets whose run finished (succeeded or failed)."""
    datasets_failed: Annotated[int, Field(ge=0)] = 0
    """Datasets whose run failed."""
    progress: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0
    """Mean progress over all datasets, in percent (a finished run counts 100)."""
    base_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Mean base-model accuracy over the datasets that report both accuracies."""
    accuracy: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Mean current accuracy over the same datasets."""
    datasets: list[DatasetStatus] = []
    """Per-dataset table, in the order of spec.datasets."""
    message: str = ""
    """Why the experiment is in its phase, for `kubectl describe`."""
    conditions: list[Condition] = []
