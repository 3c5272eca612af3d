"""Weight versions: sets under `weights/v{step:06d}/` (safetensors shards, Hugging Face's index for sharded full
weights, peft's layout for LoRA adapters). The latest version is derived from the manifests, never from a mutable
pointer; a reader leases the version it reads, so that `gc_weights` keeps it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from ttrv import log
from ttrv.store.backend import BufferSource, MiB, Source, as_source
from ttrv.store.delta import DELTA_SHARD, DeltaBase, delta_meta, encode_delta, plan_delta
from ttrv.store.errors import CorruptVersionError, StoreConfigError, StoreError
from ttrv.store.keys import (
    LEASES,
    MANIFEST,
    TEMPORARY,
    WEIGHTS,
    check_key,
    local_path,
    parse_step,
    weights_prefix,
)
from ttrv.store.sets import Manifest, SetStore
from ttrv.store.shards import (
    SafetensorsSource,
    parse_safetensors,
    plan_shards,
    tensor_bytes,
)

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
    _delta_base: DeltaBase | None = None
    """The last full version this writer published with `full_every > 1`: what its next deltas are built on."""
    _served: tuple[dict, str, dict] | None = None
    """What `update_weights` last wrote: (the target, the digest of the full base version it holds, per tensor the
    int64 positions where it holds a delta's values instead of the base's)."""
    _rebuilt: tuple[str | None, dict] = (None, {})
    """The last delta `_rebuild` applied: its manifest digest and, per tensor, the positions it wrote."""
    _base_cache: tuple[str, dict[str, np.ndarray]] | None = None
    """The files of the last base version this reader verified (its manifest digest, a private copy): a reader
    that follows a run downloads each base once, not once per delta. Before each use the base's manifest in the
    store is read again and must still carry this digest."""

    def publish_weights(self, step: int, tensors: Mapping[str, torch.Tensor], *, kind: Literal["full", "lora"],
                        base_model: str, dtype: str,
                        extra_files: Mapping[str, bytes | bytearray | memoryview | Path] | None = None,
                        max_shard_bytes: int = DEFAULT_SHARD_SIZE, full_every: int = 1,
                        delta_max_share: float = 0.5) -> Manifest:
        """Publishes weight version `step` under weights/v{step:06d}/.

        full: safetensors shards of at most `max_shard_bytes` (model.safetensors, or model-0000i-of-0000n with
        Hugging Face's model.safetensors.index.json). lora: one adapter_model.safetensors next to
        `extra_files["adapter_config.json"]` (peft's layout, which vLLM's /v1/load_lora_adapter reads).
        Each shard is built once in memory and uploaded while it is being built.

        full_every > 1 (kind full only): a version may be a sparse delta on the last full version this Store
        published (`ttrv.store.delta`): a full version is written at least every `full_every` steps, whenever the
        delta would exceed `delta_max_share` of the full size, and whenever the base is gone, replaced, or the
        tensors' names, shapes or dtypes changed. The writer keeps a CPU copy of the base's tensors for this."""
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
        if not isinstance(full_every, int) or full_every < 1:
            raise StoreConfigError(f"full_every: {full_every!r} must be an integer >= 1 (1: every version is full)")
        if not 0 <= delta_max_share <= 1:
            raise StoreConfigError(f"delta_max_share: {delta_max_share!r} must be between 0 and 1")
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
        if kind == "full" and full_every > 1:
            meta["delta_base"] = True  # readers keep its files while deltas on it may follow
            delta = self._delta_for(step, tensors, full_every, delta_max_share)
            if delta is not None:
                delta_tensors, base = delta
                meta |= {"shards": [DELTA_SHARD], "tensors": len(tensors),
                         "delta": {"base": base.step, "base_digest": base.digest}}
                del meta["delta_base"]
                delta_sources = [(DELTA_SHARD, SafetensorsSource(list(delta_tensors.items())))]
                return self._publish(prefix, iter(delta_sources + extra_sources), meta)
        manifest = self._publish(prefix, items(), meta)
        if kind == "full" and full_every > 1:
            self._delta_base = DeltaBase(step, manifest.digest, {name: tensor.detach().to("cpu", copy=True)
                                                                 for name, tensor in tensors.items()})
        else:
            self._delta_base = None
        return manifest

    def _delta_for(self, step: int, tensors: Mapping[str, torch.Tensor], full_every: int, max_share: float
                   ) -> tuple[dict[str, torch.Tensor], DeltaBase] | None:
        """The delta tensors of `tensors` on the current base, or None when this version should be full."""
        base = self._delta_base
        if base is None or not 0 < step - base.step < full_every or not base.matches(tensors):
            return None
        current = self.read_manifest(weights_prefix(base.step))
        if current is None or current.digest != base.digest:  # gc'd, or republished by a resumed trainer
            return None
        delta, size = encode_delta(base.tensors, {name: t.detach().to("cpu") for name, t in tensors.items()},
                                   self._pool)
        full = sum(tensor_bytes(t) for t in tensors.values())
        logger.debug("weight_delta", step=step, base=base.step, delta_mb=round(size / 1e6, 2),
                     full_mb=round(full / 1e6, 2), share=round(size / max(full, 1), 4))
        return (delta, base) if size <= max_share * full else None

    def update_weights(self, step: int, target: dict[str, torch.Tensor]) -> list[str]:
        """Brings `target` (an engine's served tensors, under the version's names; it may hold more) to version
        `step` in place; returns the names of the tensors it wrote. Everything is verified (xxh3) before the first
        write, and a version that does not fit `target` (a missing name, another shape or dtype) is refused with
        StoreConfigError before any write.

        Sparse when it can: when `target` holds, as far as this Store knows (it was last brought to a version by this
        call, on this Store), the base of delta version `step` with another delta's values written in, only the
        elements the two deltas change are written (the previous delta's positions get the base's values back, then
        the new values go in): work in proportion to the delta, not to the model. Otherwise the whole version is
        read (rebuilt from its base for a delta) and copied in."""
        started = time.monotonic()
        served, self._served = self._served, None  # unknown until this update has finished writing
        manifest = self._require_version(step)
        delta = delta_meta(manifest.meta)
        cached = self._base_cache
        if (delta is None or served is None or served[0] is not target or served[1] != delta["base_digest"]
                or cached is None or cached[0] != delta["base_digest"]):
            manifest, tensors = self.read_weights(step)
            _check_fits(target, {name: (t.shape, t.dtype) for name, t in tensors.items()}, manifest.prefix)
            for name, tensor in tensors.items():
                target[name].copy_(tensor)
            if manifest.meta.get("delta_base") is True:
                self._served = (target, manifest.digest, {})
            elif (delta := delta_meta(manifest.meta)) is not None and self._rebuilt[0] == manifest.digest:
                self._served = (target, delta["base_digest"], self._rebuilt[1])
            return list(tensors)
        where = f"{self.url}/{manifest.prefix}"
        with self.lease(step), self.lease(delta["base"]):
            manifest = self._require_version(step)  # under the leases: neither can be deleted while read
            base = self._require_base(manifest)  # still the base that `target` and the cached copy hold
            delta_files = self._read(manifest)
        base_tensors: dict[str, torch.Tensor] = {}
        for name in base.meta["shards"]:
            base_tensors.update(parse_safetensors(cached[1][name], f"{self.url}/{base.prefix}/{name}"))
        plan = plan_delta(base_tensors, parse_safetensors(delta_files[DELTA_SHARD], f"{where}/{DELTA_SHARD}"), where)
        previous = served[2]
        _check_fits(target, {name: (base_tensors[name].shape, base_tensors[name].dtype)
                             for name in {*previous, *(name for name, _, _ in plan)}}, manifest.prefix)
        for name, selector in previous.items():
            flat = target[name].view(-1)
            flat[selector.to(flat.device)] = base_tensors[name].view(-1)[selector].to(flat.device)
        for name, selector, values in plan:
            flat = target[name].view(-1)
            flat[selector.to(flat.device)] = values.to(flat.device)
        self._served = (target, base.digest, {name: selector for name, selector, _ in plan})
        changed = sorted({*previous, *(name for name, _, _ in plan)})
        logger.debug("weights_updated_sparse", step=step, base=base.meta["step"], tensors=len(changed),
                     elements=sum(int(s.numel()) for s in previous.values()) + sum(int(s.numel()) for _, s, _ in plan),
                     seconds=round(time.monotonic() - started, 3))
        return changed

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
            if delta_meta(manifest.meta) is None:
                self._fetch(manifest, path)
            else:
                self._fetch_delta(manifest, path)
        self._log_read(manifest, started, str(path))
        return path

    def _fetch_delta(self, manifest: Manifest, path: Path) -> None:
        """A delta version on disk as its base's files with the delta applied (the bytes a full publish of the
        same tensors writes), plus the delta's own extra files; its manifest.json is the delta's, so the path and
        the digest name the version that was published."""
        if path.exists():
            if (path / MANIFEST).is_file() and (path / MANIFEST).read_bytes() == manifest.raw:
                return
            raise StoreConfigError(f"dest_dir: {path} exists and does not hold {manifest.prefix!r} as published "
                                   "now; fetch into a new directory")
        files = self._rebuild(manifest)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMPORARY}")
        try:
            temporary.mkdir(parents=True)
            for name, data in files.items():
                target = local_path(temporary, name, f"{manifest.prefix}/{MANIFEST}: files[{name!r}]")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(memoryview(data))
            (temporary / MANIFEST).write_bytes(manifest.raw)
            try:
                temporary.rename(path)
            except OSError:
                if not (path / MANIFEST).is_file() or (path / MANIFEST).read_bytes() != manifest.raw:
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)

    def _rebuild(self, manifest: Manifest) -> dict[str, np.ndarray]:
        """The files of delta version `manifest` rebuilt in memory: the base's verified files with the delta's
        verified values written into its tensors' bytes, and the delta's files other than its delta shard."""
        where = f"{self.url}/{manifest.prefix}"
        base_step = manifest.meta["delta"]["base"]
        with self.lease(base_step):
            base = self._require_base(manifest)
            cached = self._base_cache
            if cached is not None and cached[0] == base.digest:
                base_files = {name: data.copy() for name, data in cached[1].items()}
            else:
                try:
                    base_files = self._read(base)
                except StoreError as error:
                    raise CorruptVersionError(f"{where}: its base version {base_step} cannot be verified ({error}); "
                                              "this version cannot be loaded, load a full version") from None
                self._base_cache = (base.digest, {name: data.copy() for name, data in base_files.items()})
        delta_files = self._read(manifest)
        delta = parse_safetensors(delta_files[DELTA_SHARD], f"{where}/{DELTA_SHARD}")
        tensors: dict[str, torch.Tensor] = {}
        for name in base.meta["shards"]:
            shard = parse_safetensors(base_files[name], f"{self.url}/{base.prefix}/{name}")
            for tensor_name, tensor in shard.items():
                start = base_files[name].ctypes.data  # parse_safetensors copies a misaligned tensor out
                if tensor.numel() and not start <= tensor.data_ptr() < start + len(base_files[name]):
                    raise CorruptVersionError(f"{self.url}/{base.prefix}/{name}: tensor {tensor_name!r} is not "
                                              "aligned as publish_weights writes it; load a full version")
            tensors.update(shard)
        plan = plan_delta(tensors, delta, where)
        for name, selector, values in plan:
            tensors[name].view(-1)[selector] = values
        self._rebuilt = (manifest.digest, {name: selector for name, selector, _ in plan})
        files = {name: data for name, data in base_files.items() if name in base.meta["shards"]
                 or name == "model.safetensors.index.json"}
        files |= {name: data for name, data in delta_files.items() if name != DELTA_SHARD}
        return files

    def _require_base(self, manifest: Manifest) -> Manifest:
        """The base of delta version `manifest`: a full version whose manifest is the one the delta was built on."""
        where = f"{self.url}/{manifest.prefix}"
        delta = manifest.meta["delta"]
        try:
            base = self._require_version(delta["base"])
        except StoreError as error:
            raise CorruptVersionError(f"{where}: its base version {delta['base']} cannot be verified ({error}); "
                                      "this version cannot be loaded, load a full version") from None
        if base.digest != delta["base_digest"] or delta_meta(base.meta) is not None:
            raise CorruptVersionError(f"{where}: its base version {delta['base']} was replaced since the delta was "
                                      "published (manifest digest differs); this version cannot be loaded, load a "
                                      "full version")
        return base

    def load_weights(self, step: int) -> dict[str, torch.Tensor]:
        """Version `step`'s tensors on CPU, downloaded and verified in memory (views of the downloaded shards)."""
        return self.read_weights(step)[1]

    def read_weights(self, step: int) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """`load_weights` with the manifest the tensors were verified against (its `meta.kind`, its digest that
        names these exact bytes). Nothing touches the disk: parallel ranged GETs land in one buffer per file, each
        range is hashed (xxh3-128) as it arrives, and the tensors are views of the verified buffers."""
        prefix = weights_prefix(step)
        started = time.monotonic()
        with self.lease(step):
            manifest = self._require_version(step)
            if delta_meta(manifest.meta) is None:
                buffers = self._read(manifest)
                shards = manifest.meta["shards"]
                if manifest.meta.get("delta_base") is True:
                    self._base_cache = (manifest.digest, {name: data.copy() for name, data in buffers.items()})
            else:
                buffers = self._rebuild(manifest)
                shards = self._require_base(manifest).meta["shards"]
        tensors: dict[str, torch.Tensor] = {}
        for name in shards:
            tensors.update(parse_safetensors(buffers[name], f"{self.url}/{prefix}/{name}"))
        self._log_read(manifest, started, "memory")
        return manifest, tensors

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
        elif (delta := meta.get("delta")) is not None:
            if kind != "full" or shards != [DELTA_SHARD]:
                problem = f"a delta version is kind 'full' with meta.shards [{DELTA_SHARD!r}], not {kind!r} {shards}"
            elif (not isinstance(delta, dict) or not isinstance(delta.get("base"), int)
                  or isinstance(delta.get("base"), bool) or not 0 <= delta["base"] < step
                  or not isinstance(delta.get("base_digest"), str)):
                problem = f"meta.delta is {str(delta)[:120]!r}: it names a base step below {step} and its digest"
        elif kind == "full" and len(shards) > 1 and "model.safetensors.index.json" not in files:
            problem = f"{len(shards)} shards without model.safetensors.index.json"
        if problem is not None:
            raise CorruptVersionError(f"{self.url}/{prefix}: the manifest's metadata does not agree with its files "
                                      f"({problem}); this version cannot be loaded, publish it again or load another "
                                      "one")
        return manifest

    def _bases_of(self, steps: Iterable[int]) -> set[int]:
        """The base versions that the delta versions among `steps` need (one manifest read each)."""
        bases = set()
        for step in steps:
            try:
                manifest = self.read_manifest(weights_prefix(step))
            except CorruptVersionError:
                continue
            delta = None if manifest is None else manifest.meta.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("base"), int):
                bases.add(delta["base"])
        return bases

    def gc_weights(self, keep: int, in_use: Iterable[int] = ()) -> list[int]:
        """Deletes weight versions except the newest `keep`, those in `in_use`, those leased by a reader and the
        bases of the delta versions among them;
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
        kept |= self._bases_of(kept & complete)
        victims = sorted(step for step in complete if step not in kept)
        if newest:
            victims += sorted(step for step in present - complete if step < newest[0] and step not in kept)
        for step in victims:
            self._delete(weights_prefix(step), listing)
        if victims:
            logger.debug("weight_versions_deleted", store=self.url, steps=victims, kept=sorted(kept & complete))
        return victims



def _check_fits(target: Mapping[str, torch.Tensor], wanted: Mapping[str, tuple], prefix: str) -> None:
    """Refuses a version whose tensors `target` cannot take in place (before anything is written)."""
    for name, (shape, dtype) in wanted.items():
        tensor = target.get(name)
        if tensor is None or tensor.shape != shape or tensor.dtype != dtype or not tensor.is_contiguous():
            have = "no such tensor" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise StoreConfigError(f"target[{name!r}]: {have}, but {prefix} holds {tuple(shape)} {dtype}; update "
                                   "the tensors of the model the version was published for (contiguous)")
