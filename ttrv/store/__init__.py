"""Versioned weights and checkpoints over `file://` and `s3://`: the only channel between trainer and rollout pods.

Everything is a *set*: a prefix holding some files and a `manifest.json` that lists each file's size and checksum.
The manifest is written last and deleted first, so a set without one does not exist for readers, and a reader
verifies every byte against it before returning: a half-published, half-deleted, corrupt or truncated version is
never loaded. Weight versions are sets under `weights/v{step:06d}/` (safetensors shards, Hugging Face's index for
sharded full weights, peft's layout for LoRA adapters); the latest version is derived from the manifests, never
from a mutable pointer. Checkpoints and anything else use the same primitive under their own prefix.

Transfers run in parallel on a bounded thread pool: S3 objects go up as multipart uploads whose parts are slices of
the serialised shard (no copy per part) and come down as parallel ranged GETs into one buffer. Transient S3 errors
are retried with exponential backoff and jitter up to a time budget (then `StoreUnavailableError`); credential
errors fail at once (`StoreAuthError`). Credentials come from the environment or a mounted Secret directory, never
from the spec, and never reach a log line or an error message.

The modules, each one concern: `keys` (names, prefixes, their validation), `errors`, `backend` (the backend
interface and the sources an upload reads from), `file_backend` and `s3_backend` (with its retries), `shards`
(streaming safetensors), `sets` (manifests and the set primitive), `weights` (weight versions, leases, gc:
`Store`), `credentials`, and `uri` (`open_store`). Callers import from `ttrv.store`.
"""

from ttrv.store.backend import MiB
from ttrv.store.errors import (
    CorruptVersionError,
    SetNotFoundError,
    StoreAuthError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
)
from ttrv.store.keys import LEASES, MANIFEST, WEIGHTS, check_key, weights_prefix
from ttrv.store.s3_backend import DEFAULT_PART_SIZE, DEFAULT_RETRY_SECONDS
from ttrv.store.sets import MANIFEST_FORMAT, FileEntry, Manifest
from ttrv.store.shards import parse_safetensors, serialize_safetensors
from ttrv.store.uri import open_store
from ttrv.store.weights import DEFAULT_LEASE_SECONDS, DEFAULT_SHARD_SIZE, WEIGHT_DTYPES, Store

__all__ = [
    "DEFAULT_LEASE_SECONDS", "DEFAULT_PART_SIZE", "DEFAULT_RETRY_SECONDS", "DEFAULT_SHARD_SIZE", "LEASES",
    "MANIFEST", "MANIFEST_FORMAT", "WEIGHTS", "WEIGHT_DTYPES", "CorruptVersionError", "FileEntry", "Manifest",
    "MiB", "SetNotFoundError", "Store", "StoreAuthError", "StoreConfigError", "StoreError", "StoreUnavailableError",
    "check_key", "open_store", "parse_safetensors", "serialize_safetensors", "weights_prefix",
]
