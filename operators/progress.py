"""A run's progress as its trainer reports it: the `progress.json` contract, and where the operator reads it.

The trainer's rank 0 writes `<store prefix>/progress.json` after every optimiser step (the store prefix is the
AdaptationRun's `spec.run.storage.uri`), and in a cluster also reports the same document into its own
AdaptationRun's `status.trainerProgress` (a JSON string; ttrv/status_report.py, through the run's own
ServiceAccount whose Role reaches that one object: ttrv/manifests/access.py). The cluster's operator reads only the
latter (`progress_from_status`): it holds no credentials to the teams' stores and never connects to an endpoint a
spec names. The local stand-in (operators/local/) reads the store instead (`ProgressReader`). The document's shape
follows the trainer status of Kubeflow KEP-2779; these keys are the contract between trainer and operator:

    progressPercentage         number 0-100   optimiser steps done, percent
    estimatedRemainingSeconds  integer >= 0   the trainer's estimate of the time left
    step                       integer >= 0   optimiser steps done
    totalSteps                 integer >= 0   optimiser steps of the whole run
    weightVersion              integer >= 0   newest weight version published to the store
    checkpointStep             integer >= 0   step of the newest full checkpoint (where a restart resumes)
    baseAccuracy               number 0-1     greedy accuracy of the base model (eval before adapting)
    accuracy                   number 0-1     newest greedy accuracy of the adapted model
    stage                      string         what the trainer does: evaluating-before, adapting,
                                              evaluating-after or finished
    evalPromptsDone            integer >= 0   prompts the running evaluation stage has done, of all its passes
    evalPromptsTotal           integer >= 0   prompts of all the stage's passes (greedy and maj@N, all splits)
    stopReason                 string         why adapting stopped before its last epoch: EarlyStopped,
                                              MaxStepsReached, GpuHoursSpent or CollapseGuard (ttrv/guard.py)
    stepsSaved                 integer >= 0   steps of the epochs not taken because of that
    metrics                    {name: number} the step's metrics; the operator does not copy them into status

The trainer writes the whole document each time, and also while it evaluates, before and after adapting (on a real
model those are the longest phases): `stage` with the evaluation keys, and while evaluating after, the time left.
A document with a `stage` is a snapshot: its time left and evaluation keys are current, and one it leaves out is
unknown now (the operator clears it in status); without a stage (an older trainer) a missing key keeps its value.

Every key is optional. Unknown keys are ignored; a key with the wrong type or out of range is dropped (and named
in `Progress.problems`) while the others are used, because the AdaptationRun's schema would reject the whole
status write over one bad value.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from ttrv.guard import STOP_REASONS
from ttrv.spec import RunStage

PROGRESS_KEY = "progress.json"
STATUS_FIELD = "trainerProgress"
"""The AdaptationRun status field the trainer writes its progress document into (a JSON string)."""
# How long one read may keep retrying an unreachable store: the poll comes back every interval anyway.
STORE_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Progress:
    percentage: float | None = None
    remaining_seconds: int | None = None
    step: int | None = None
    total_steps: int | None = None
    weight_version: int | None = None
    checkpoint_step: int | None = None
    base_accuracy: float | None = None
    accuracy: float | None = None
    stage: str | None = None
    eval_prompts_done: int | None = None
    eval_prompts_total: int | None = None
    stop_reason: str | None = None
    steps_saved: int | None = None
    problems: tuple[str, ...] = ()

    @property
    def eval_progress(self) -> float | None:
        """Percent of the evaluation stage's prompts done, when the trainer is evaluating."""
        if self.stage not in EVALUATING or self.eval_prompts_done is None or not self.eval_prompts_total:
            return None
        return round(min(100.0, 100.0 * self.eval_prompts_done / self.eval_prompts_total), 1)


STAGES = get_args(RunStage)
EVALUATING = ("evaluating-before", "evaluating-after")
"""The stages that report evaluation progress."""


# key in progress.json → (field of Progress, integer?, lowest, highest)
_FIELDS = {
    "progressPercentage": ("percentage", False, 0.0, 100.0),
    "estimatedRemainingSeconds": ("remaining_seconds", True, 0, None),
    "step": ("step", True, 0, None),
    "totalSteps": ("total_steps", True, 0, None),
    "weightVersion": ("weight_version", True, 0, None),
    "checkpointStep": ("checkpoint_step", True, 0, None),
    "baseAccuracy": ("base_accuracy", False, 0.0, 1.0),
    "accuracy": ("accuracy", False, 0.0, 1.0),
    "evalPromptsDone": ("eval_prompts_done", True, 0, None),
    "evalPromptsTotal": ("eval_prompts_total", True, 0, None),
    "stepsSaved": ("steps_saved", True, 0, None),
}


def parse_progress(document: Any) -> Progress:
    """The contract's keys of a decoded progress.json, each checked on its own (see the module docstring)."""
    if not isinstance(document, Mapping):
        return Progress(problems=(f"progress.json is a {type(document).__name__}, not an object",))
    values: dict[str, Any] = {}
    problems = []
    for key, (name, integer, low, high) in _FIELDS.items():
        value = document.get(key)
        if value is None:
            continue
        # bool is an int in Python, and a float with a fraction is no step count.
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if integer and numeric and float(value).is_integer():
            value = int(value)
        elif integer or not numeric:
            problems.append(f"{key}: {value!r} is not {'an integer' if integer else 'a number'}")
            continue
        if value < low or (high is not None and value > high):
            problems.append(f"{key}: {value!r} is outside [{low}, {high if high is not None else 'inf'}]")
            continue
        values[name] = value if integer else float(value)
    stage = document.get("stage")
    if stage in STAGES:
        values["stage"] = stage
    elif stage is not None:
        problems.append(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    reason = document.get("stopReason")
    if reason in STOP_REASONS:
        values["stop_reason"] = reason
    elif reason is not None:
        problems.append(f"stopReason: {reason!r} is not one of {', '.join(STOP_REASONS)}")
    return Progress(**values, problems=tuple(problems))


def progress_from_status(run: Mapping) -> dict | None:
    """The progress document the run's trainer reported into `status.trainerProgress`, or None while it has
    reported none. What the trainer wrote is the tenant's: a value that is no JSON object comes back as the
    string itself, which `parse_progress` then names as breaking the contract."""
    text = (run.get("status") or {}).get(STATUS_FIELD)
    if not text:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def read_progress(store_uri: str, endpoint: str | None = None) -> dict | None:
    """The decoded progress.json of the run stored at `store_uri`, or None while its trainer has written none; one
    store client opened and closed for this read (`ProgressReader` keeps them).

    This is the operator's only seam to the object store (ttrv.store, which brings credentials from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint from `endpoint` or AWS_ENDPOINT_URL). The kopf tests
    replace it with a fake; the store's own tests cover what is behind it.
    """
    # Imported on use: the operator schedules and reports runs without the store, and only this read needs it.
    from ttrv.store import open_store

    with open_store(store_uri, endpoint, retry_seconds=STORE_RETRY_SECONDS) as store:
        return store.get_json(PROGRESS_KEY)


# What open_store reads from the environment to reach an S3 store: a client is kept per store and these values.
_STORE_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "TTRV_S3_SECRET_DIR", "AWS_REGION", "AWS_DEFAULT_REGION")


class ProgressReader:
    """`read_progress` for a long-lived caller: one client per S3 store (bucket, endpoint and credentials), opened
    on the first read and kept until `close`. Opening a store builds a client and probes (or creates) its bucket;
    the operator reads every unfinished run's progress at each poll, and those runs share a few buckets.

    A run's store is `s3://<bucket>/<prefix>`; the client is the bucket's, and the run's progress.json is the key
    `<prefix>/progress.json` in it. A file:// store has no client to keep: it is opened for each read."""

    def __init__(self):
        self._stores: dict[tuple, object] = {}
        self._lock = threading.Lock()  # kopf reconciles in a thread pool

    def __call__(self, store_uri: str, endpoint: str | None = None) -> dict | None:
        from ttrv.store import check_key, open_store

        scheme, _, rest = store_uri.partition("://") if isinstance(store_uri, str) else ("", "", "")
        if scheme != "s3":
            return read_progress(store_uri, endpoint)
        bucket, _, prefix = rest.partition("/")
        prefix = check_key(prefix.strip("/"), "storage.uri prefix", allow_empty=True)
        key = (bucket, endpoint, *(os.environ.get(name) for name in _STORE_ENV))
        with self._lock:
            store = self._stores.get(key)
        if store is None:  # opened outside the lock: an unreachable store must not hold up the others' reads
            opened = open_store(f"s3://{bucket}", endpoint, workers=1, retry_seconds=STORE_RETRY_SECONDS)
            with self._lock:
                store = self._stores.setdefault(key, opened)
            if store is not opened:  # another reconcile opened it meanwhile
                opened.close()
        return store.get_json(f"{prefix}/{PROGRESS_KEY}" if prefix else PROGRESS_KEY)

    def __len__(self) -> int:
        """How many store clients it holds."""
        with self._lock:
            return len(self._stores)

    def close(self) -> None:
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()
