"""Cluster resources: the AdaptationRun spec and the status of both custom resources. The CRDs' schemas are
generated from these models (ttrv/crds.py), so the operator, `ttrv render` and the API server agree."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
)

from ttrv.spec.base import NAME_PATTERN, StrictModel
from ttrv.spec.experiment import ImageSpec, S3SecretRef, SchedulingSpec, VolumeSpec
from ttrv.spec.pod import PodSettings
from ttrv.spec.run import RunSpec

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
    pod: PodSettings = PodSettings()
    """Settings of every pod (the Experiment's `pod`)."""
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
    stop_reason: str | None = None
    """Why adapting stopped before its last epoch: EarlyStopped, MaxStepsReached, GpuHoursSpent or CollapseGuard."""
    steps_saved: Annotated[int, Field(ge=0)] | None = None
    """Steps of the epochs not taken because adapting stopped early."""
    restarts: Annotated[int, Field(ge=0)] = 0
    """Trainer restarts after retryable failures (in place by the training operator, or a new PyTorchJob)."""
    last_restart: str | None = None
    """Marker of the last restart counted (a Restarting condition's time, or a failed PyTorchJob's uid), so that
    each restart is counted once."""
    exit_code: int | None = None
    """Exit code of the trainer's last failed container, when seen."""
    trainer_api: str | None = None
    """The API the run's trainer uses, trainjob or pytorchjob: scheduling.trainerApi, or for auto the operator's
    choice from what the API server serves. Kept once set, so a run never changes API midway."""
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
