"""Weight versions: sets under `weights/v{step:06d}/` (safetensors shards, Hugging Face's index for sharded full
weights, peft's layout for LoRA adapters). The latest version is derived from the manifests, never from a mutable
pointer; a reader leases the version it reads, so that `gc_weights` keeps it."""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ttrv import log
from ttrv.store.backend import BufferSource, MiB, Source, as_source
from ttrv.store.errors import CorruptVersionError, StoreConfigError, StoreError
from ttrv.store.keys import LEASES, MANIFEST, WEIGHTS, check_key, parse_step, weights_prefix
from ttrv.store.sets import Manifest, SetStore
from ttrv.store.shards import SafetensorsSource, parse_safetensors, plan_shards, tensor_bytes

if TYPE_CHECKING:  # torch is imported where tensors are handled: the operator reads progress without it
    import torch

logger = log.get_logger(__name__)

DEFAULT_SHARD_SIZE = 512 * MiB
DEFAULT_LEASE_SECONDS = 600.0
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


class Store(SetStore):
    """Sets, weight versions, leases and small JSON documents over one backend (see `open_store`)."""

    lease_seconds = DEFAULT_LEASE_SECONDS
    """How long a reader's lease protects its version from gc when the reader dies without releasing it."""

    def publish_weights(self, step: int, tensors: Mapping[str, torch.Tensor], *, kind: Literal["full", "lora"],
                        base_model: str, dtype: str,
                        extra_files: Mapping[str, bytes | bytearray | memoryview | Path] | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_SIZE) -> Manifest:
        """Publishes weight version `step` under weights/v{step:06d}/.

        full: safetensors shards of at most `max_shard_bytes` (model.safetensors, or model-0000i-of-0000n with
        Hugging Face's model.safetensors.index.json). lora: one adapter_model.safetensors next to
        `extra_files["adapter_config.json"]` (peft's layout, which vLLM's /v1/load_lora_adapter reads).
        Each shard is built once in memory and uploaded while it is being built."""
        import torch

        prefix = weights_prefix(step)
        if kind not in ("full", "lora"):
            raise StoreConfigError(f"kind: {kind!r} is neither 'full' nor 'lora'")
        if dtype not in WEIGHT_DTYPES:
            raise StoreConfigError(f"dtype: {dtype!r} is not one of {list(WEIGHT_DTYPES)}")
        if not isinstance(base_model, str) or not base_model:
            raise StoreConfigError("base_model: empty; name the model the weights belong to")
        if not tensors:
            raise StoreConfigError(f"tensors: version {step} has no tensors")
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise StoreConfigError(f"tensors: {name!r} is not a usable tensor name")
            if not isinstance(tensor, torch.Tensor):
                raise StoreConfigError(f"tensors[{name!r}]: expected a torch.Tensor, got {type(tensor).__name__}")
        if max_shard_bytes < 1:
            raise StoreConfigError(f"max_shard_bytes: {max_shard_bytes} must be positive")
        extra = dict(extra_files or {})
        if kind == "lora":
            if "adapter_config.json" not in extra:
                raise StoreConfigError("extra_files: a LoRA version needs 'adapter_config.json' (peft's "
                                       "LoraConfig.to_dict()); without it vLLM cannot load the adapter")
            groups, names = [list(tensors.items())], ["adapter_model.safetensors"]
        else:
            groups = plan_shards(tensors, max_shard_bytes)
            names = (["model.safetensors"] if len(groups) == 1 else
                     [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
        index = None
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(tensor_bytes(t) for t in tensors.values())},
                     "weight_map": {tensor: shard for shard, group in zip(names, groups, strict=True) for tensor, _ in group}}
            names_taken = [*names, "model.safetensors.index.json"]
        else:
            names_taken = names
        for name in extra:
            check_key(name, f"extra_files[{name!r}]")
            if name in names_taken or name == MANIFEST:
                raise StoreConfigError(f"extra_files[{name!r}]: the name is taken by the weights themselves")
        extra_sources = [(name, as_source(name, value)) for name, value in extra.items()]

        def items() -> Iterator[tuple[str, Source]]:
            for name, group in zip(names, groups, strict=True):
                yield name, SafetensorsSource(group)
            if index is not None:
                yield "model.safetensors.index.json", BufferSource(json.dumps(index, indent=1).encode())
            yield from extra_sources

        meta = {"step": step, "kind": kind, "base_model": base_model, "dtype": dtype, "shards": names,
                "tensors": len(tensors)}
        return self._publish(prefix, items(), meta)

    def weight_versions(self) -> list[int]:
        """Steps of the complete weight versions, ascending."""
        return sorted(step for name in self.list_sets(WEIGHTS) if (step := parse_step(name)) is not None)

    def latest_weights(self) -> int | None:
        versions = self.weight_versions()
        return versions[-1] if versions else None

    @contextmanager
    def lease(self, step: int, seconds: float | None = None) -> Iterator[None]:
        """Marks version `step` as being read, so that `gc_weights` keeps it, until the block ends or `seconds`
        pass (the lease carries its expiry time by the reader's clock, so a crashed reader blocks nothing for long;
        pod clocks must agree to well within `seconds`)."""
        reader = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        key = f"{LEASES}/{reader}.json"
        self.put_json(key, {"reader": reader, "step": step,
                            "expires": time.time() + (seconds or self.lease_seconds)})
        try:
            yield
        finally:
            try:
                self._backend.delete([key])
            except StoreError as error:
                logger.warning("lease_not_released", key=key, action="it expires by itself", error=str(error))

    def _leased_steps(self) -> set[int]:
        steps, expired = set(), []
        now = time.time()
        for key in self._backend.list(LEASES):
            data = self._backend.get(key)
            try:
                lease = json.loads(data) if data is not None else None
                if lease is None:
                    continue
                if float(lease["expires"]) < now:
                    expired.append(key)
                else:
                    steps.add(int(lease["step"]))
            except (ValueError, KeyError, TypeError):
                logger.warning("lease_unreadable_ignored", key=key)
        if expired:
            self._backend.delete(expired)
        return steps

    def fetch_weights(self, step: int, dest_dir: str | Path) -> Path:
        """Downloads and verifies version `step` into `dest_dir/v{step:06d}-{digest}` and returns that path. The
        path names the exact bytes (vLLM caches adapters by path), so a republished step gets a new one; a path
        fetched before is returned at once. The local copy is a cache: it is not fsynced."""
        weights_prefix(step)  # refuses a bad step before a lease is written for it
        started = time.monotonic()
        with self.lease(step):
            manifest = self._require_version(step)
            path = Path(dest_dir) / f"v{step:06d}-{manifest.digest[:12]}"
            self._fetch(manifest, path)
        self._log_read(manifest, started, str(path))
        return path

    def load_weights(self, step: int) -> dict[str, torch.Tensor]:
        """Version `step`'s tensors on CPU, downloaded and verified in memory (views of the downloaded shards)."""
        prefix = weights_prefix(step)
        started = time.monotonic()
        with self.lease(step):
            manifest = self._require_version(step)
            buffers = self._read(manifest)
        tensors: dict[str, torch.Tensor] = {}
        for name in manifest.meta["shards"]:
            tensors.update(parse_safetensors(buffers[name], f"{self.url}/{prefix}/{name}"))
        self._log_read(manifest, started, "memory")
        return tensors

    def _require_version(self, step: int) -> Manifest:
        """The manifest of weight version `step`, whose metadata agrees with its files as `publish_weights` writes
        them: a manifest rewritten by hand or by another tool (a "full" version without shards, a shard it does not
        list) is refused as corrupt before anything is transferred, instead of being served as if it held weights."""
        prefix = weights_prefix(step)
        manifest = self._require_manifest(prefix)
        meta, files = manifest.meta, manifest.files
        kind, shards = meta.get("kind"), meta.get("shards")
        problem = None
        if meta.get("step") != step:
            problem = f"meta.step is {meta.get('step')!r}, not {step}"
        elif kind not in ("full", "lora"):
            problem = f"meta.kind is {kind!r}, neither 'full' nor 'lora'"
        elif meta.get("dtype") not in WEIGHT_DTYPES:
            problem = f"meta.dtype is {meta.get('dtype')!r}, not one of {list(WEIGHT_DTYPES)}"
        elif not isinstance(shards, list) or not shards or not all(isinstance(name, str) for name in shards):
            problem = f"meta.shards is {shards!r}: a {kind} version lists at least one safetensors shard"
        elif missing := [name for name in shards if name not in files]:
            problem = f"meta.shards names {missing[:3]}, which the version's files do not hold"
        elif [name for name in shards if not name.endswith(".safetensors")]:
            problem = f"meta.shards {shards[:3]} are not all .safetensors files"
        elif kind == "lora" and (shards != ["adapter_model.safetensors"] or "adapter_config.json" not in files):
            problem = "a lora version holds adapter_model.safetensors and adapter_config.json (peft's layout)"
        elif kind == "full" and len(shards) > 1 and "model.safetensors.index.json" not in files:
            problem = f"{len(shards)} shards without model.safetensors.index.json"
        if problem is not None:
            raise CorruptVersionError(f"{self.url}/{prefix}: the manifest's metadata does not agree with its files "
                                      f"({problem}); this version cannot be loaded, publish it again or load another "
                                      "one")
        return manifest

    def gc_weights(self, keep: int, in_use: Iterable[int] = ()) -> list[int]:
        """Deletes weight versions except the newest `keep`, those in `in_use` and those leased by a reader;
        also removes leftovers of crashed publishes older than every kept version. Returns the deleted steps."""
        if not isinstance(keep, int) or keep < 1:
            raise StoreConfigError(f"keep: {keep!r} must be an integer >= 1 (the newest version is always kept)")
        listing = self._backend.list(WEIGHTS)
        complete, present = set(), set()
        for key in listing:
            parts = key.split("/")
            step = parse_step(parts[1]) if len(parts) >= 3 else None
            if step is not None:
                present.add(step)
                if len(parts) == 3 and parts[2] == MANIFEST:
                    complete.add(step)
        newest = sorted(complete)[-keep:]
        kept = set(newest) | set(in_use) | self._leased_steps()
        victims = sorted(step for step in complete if step not in kept)
        if newest:
            victims += sorted(step for step in present - complete if step < newest[0] and step not in kept)
        for step in victims:
            self._delete(weights_prefix(step), listing)
        if victims:
            logger.debug("weight_versions_deleted", store=self.url, steps=victims, kept=sorted(kept & complete))
        return victims

