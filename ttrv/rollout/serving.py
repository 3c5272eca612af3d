"""The serving engines behind `ttrv serve`: what generates the answers of its chat endpoint.

Two engines behind one interface (`ServingEngine`): vLLM, whose own OpenAI server runs as a child process on a
loopback port and gets the requests passed on (the production path), and the in-process Hugging Face engine for
machines without vLLM. `choose_engine` picks one for a spec (rollout.engine). The HTTP service around them is
`ttrv.rollout.service`. ("Backend" is the spec's `rollout.backend`, in-process or service, not these.)
"""

from __future__ import annotations

import functools
import io
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from ttrv.data import MAX_IMAGE_PIXELS, DataError, Prompt
from ttrv.rollout.chat import NEUTRAL_SAMPLING, prompt_from_messages
from ttrv.rollout.sync import VersionRefused
from ttrv.rollout.vllm_process import VLLMError, VLLMProcess, vllm_available, vllm_flags, vllm_python
from ttrv.spec import RunSpec

ENGINE_EXIT_SECONDS = 15.0
"""How long a failed request waits for a vLLM server whose engine died to exit: it stops by itself once it sees the
dead engine, on a failed request at once or within the 5 s of its watchdog (vllm/entrypoints/launchers/launcher.py,
terminate_if_errored and watchdog_loop), after logging the engine's error."""


class ServiceError(Exception):
    """An HTTP error answer: its status and a message naming the field or the fix."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Cancelled(Exception):
    """The request's client went away before its answer: nothing to answer."""


class ServingEngine(Protocol):
    name: str

    def start(self) -> None: ...

    def complete(self, body: dict[str, Any], cancelled: threading.Event | None = None) -> dict[str, Any]:
        """A chat-completion request (validated only as far as the engine needs) -> the OpenAI answer; raises
        ServiceError, or Cancelled once `cancelled` is set (its client went away) before the answer."""
        ...

    def load(self, step: int, path: Path, kind: str) -> None:
        """Serve the fetched version at `path` (kind full|lora); VersionRefused when it cannot, unchanged."""
        ...

    def problem(self) -> str | None:
        """Why the engine cannot serve (None: it can)."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------ vLLM
class VLLMServingEngine:
    """vLLM's own OpenAI server on a loopback port; requests are passed on with the served model's name."""

    name = "vllm"

    def __init__(self, spec: RunSpec, model_path: str, log_path: Path, gpu: bool, max_loras: int = 1):
        self.server = VLLMProcess(model_path, flags=vllm_flags(spec, gpu, max_loras), log_path=log_path,
                                  startup_timeout=1800, request_timeout=3600)
        self._death: str | None = None

    def start(self) -> None:
        self.server.start()

    def complete(self, body: dict[str, Any], cancelled: threading.Event | None = None) -> dict[str, Any]:
        # vLLM cancels a request whose connection closes (vllm/entrypoints/serve/utils/api_utils.py,
        # with_cancellation); this call holds its connection until vLLM answers, so `cancelled` is not looked at.
        return self.complete_as(self.server.served_model, body)

    def complete_as(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request passed on to vLLM as `model` (the served model, or a runtime-loaded LoRA adapter's name)."""
        try:
            return self.server.post("/v1/chat/completions", {**NEUTRAL_SAMPLING, **body, "model": model})
        except VLLMError as error:
            if error.status is not None and error.status < 500:
                raise ServiceError(error.status, f"vLLM: {error}") from None
            # vLLM answers a request that its dying engine was serving with a bare "EngineCore encountered an
            # issue": the reason worth passing on is the engine's error, in the log of the server that then exits.
            if not self.server.healthy() and self.server.wait_exit(ENGINE_EXIT_SECONDS):
                raise ServiceError(HTTPStatus.SERVICE_UNAVAILABLE, self.problem(), "server_error") from None
            raise ServiceError(HTTPStatus.BAD_GATEWAY, f"vLLM: {error}", "server_error") from None

    def load(self, step: int, path: Path, kind: str) -> None:
        # The directory's name (step and content digest) is new for every published version: adapter name and
        # path are never reused, as VLLMProcess requires.
        if kind == "lora":
            if not self.server.lora:
                raise VersionRefused("it is a LoRA adapter but the spec has no model.lora, so vLLM was started "
                                     "without LoRA; set model.lora as the trainer has it")
            self.server.load_lora(path.name, path)
        else:
            self.server.reload_full(path, path.name)

    def problem(self) -> str | None:
        if self.server.running():
            return None
        if self._death is None:  # an exited server stays exited: its log is read once
            self._death = f"the vLLM engine died: {self.server.failure()}"
        return self._death

    def close(self) -> None:
        self.server.stop()


# ------------------------------------------------------------------------------------------------ Hugging Face
HF_FIELDS = {"model", "messages", "n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "logprobs",
             "return_token_ids", "stream", "seed"}


class _Request:
    """A request waiting for, or in, a batch; its image file (if any) is removed by whoever drops it last: the
    sampling thread once its batch is sampled, or the request itself when it leaves the queue first."""

    def __init__(self, key: tuple, prompt: Prompt, cancelled: threading.Event | None, adapter: str | None = None):
        self.key, self.prompt, self.cancelled, self.adapter = key, prompt, cancelled, adapter
        self.future: Future = Future()

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()

    def discard_image(self) -> None:
        if self.prompt.image_path is not None:
            Path(self.prompt.image_path).unlink(missing_ok=True)


class HFServingEngine:
    """The in-process Hugging Face engine. Requests that arrive while a batch is being sampled queue up, and those
    that share sampling settings are sampled together as the next batch (one `generate` call). A cancelled request
    leaves the queue; a batch whose requests are all cancelled stops at its next token."""

    name = "hf"

    def __init__(self, spec: RunSpec, model_path: str, image_dir: Path, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.spec = spec
        self.model_path = model_path
        self.image_dir = image_dir
        self.max_image_pixels = max_image_pixels
        self.engine = None
        self.merge = None
        self.stopped_early = 0
        """Batches stopped before their end because every request in them was cancelled."""
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        self.model_lock = threading.Lock()
        """Held by the sampling thread while it samples a batch, and by whoever changes the model's adapters (the
        shared service, `ttrv.rollout.shared`): an adapter is never added or deleted in the middle of a batch."""

    def start(self) -> None:
        import torch

        from ttrv.modeling import load_model, load_processor
        from ttrv.rollout.hf import HFEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        trust = self.spec.model.trust_remote_code
        model = load_model(self.model_path, self.spec.model.dtype, device, trust_remote_code=trust)
        self.engine = HFEngine(model, load_processor(self.model_path, trust, self.spec.model.max_pixels))
        self._serve_versions(model)
        self._worker = threading.Thread(target=self._run, name="ttrv-hf-batches", daemon=True)
        self._worker.start()

    def _serve_versions(self, model) -> None:
        """How versions reach the model: a LoRA version merged into a copy of the base (`lora_merger`)."""
        from ttrv.rollout.hf import lora_merger

        self.merge = lora_merger(model, self.spec.model.lora)

    def load(self, step: int, path: Path, kind: str) -> None:
        from safetensors.torch import load_file

        tensors = {}
        for shard in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(shard))
        self.load_in_memory(step, tensors, kind)

    def load_in_memory(self, step: int, tensors: dict, kind: str) -> None:
        """Serve a version's verified tensors (the store's in-memory read: no file written on the way)."""
        try:
            if kind == "lora":
                if self.merge is None:
                    raise ValueError("it is a LoRA adapter but the spec has no model.lora; set model.lora as the "
                                     "trainer has it")
                tensors = self.merge(tensors)
            self.engine.load_tensors(step, tensors)
        except ValueError as error:
            raise VersionRefused(str(error)) from None

    def complete(self, body: dict[str, Any], cancelled: threading.Event | None = None,
                 adapter: str | None = None) -> dict[str, Any]:
        unsupported = sorted(key for key, value in body.items() if key not in HF_FIELDS and value is not None
                             and not (key in NEUTRAL_SAMPLING and value in (NEUTRAL_SAMPLING[key], -1)))
        if unsupported:
            raise ServiceError(400, f"{', '.join(unsupported)}: not supported by the Hugging Face rollout engine; "
                                    "remove it, or serve with vLLM (rollout.engine: vllm)")
        if body.get("stream"):
            raise ServiceError(400, "stream: the rollout service answers whole completions; send stream: false")
        n = _field(body, "n", int, 1, minimum=1)
        temperature = _field(body, "temperature", float, 1.0, minimum=0.0)
        top_p = _field(body, "top_p", float, 1.0, minimum=0.0)
        max_tokens = _field(body, "max_tokens", int, None, minimum=1) or \
            _field(body, "max_completion_tokens", int, self.spec.rollout.max_new_tokens, minimum=1)
        if temperature == 0 and n != 1:
            raise ServiceError(400, "n: greedy decoding (temperature 0) gives one answer per prompt; send n: 1")
        try:
            text, image = prompt_from_messages(body.get("messages"))
        except ValueError as error:
            raise ServiceError(400, str(error)) from None
        seed = _field(body, "seed", int, None, minimum=0)
        image_path = self._image_file(image) if image is not None else None
        # a seeded request's samples depend on its seed alone (the engine seeds each row from the prompt id), not on
        # the requests it happens to be batched with
        prompt = Prompt(f"seed:{seed}" if seed is not None else uuid.uuid4().hex, text, image_path)
        request = _Request((n, temperature, top_p, max_tokens, 0 if seed is not None else None), prompt, cancelled,
                           adapter)
        with self._cond:
            if self._closed:
                request.discard_image()
                raise ServiceError(503, "the service is stopping", "server_error")
            self._pending.append(request)
            self._cond.notify()
        try:
            samples = self._wait(request)
        except (DataError, ValueError) as error:  # an unreadable image, greedy with n > 1
            message = str(error)
            if image_path is not None:
                message = message.replace(image_path, "messages[0].content: the image")
            raise ServiceError(400, message) from None
        return self._answer(samples, bool(body.get("logprobs")))

    def _wait(self, request: _Request):
        while True:
            if request.cancelled is None:
                return request.future.result()
            try:
                return request.future.result(timeout=0.25)  # a cancelled request leaves the queue within this
            except FutureTimeout:  # the builtin TimeoutError only from Python 3.11 on
                if not request.cancelled.is_set():
                    continue
            with self._cond:
                if request in self._pending:  # not sampled yet: it leaves the queue, its image with it
                    self._pending.remove(request)
                    request.discard_image()
            raise Cancelled()

    def _image_file(self, data: bytes) -> str:
        """The image as a file of this request's own, the form the engine's processor loads; only its header is
        read here (its size against max_image_pixels), the pixels are decoded once, by the batch that samples it.
        Removed once the request is sampled or dropped."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise ServiceError(400, f"messages[0].content: the image is not an image file Pillow reads "
                                    f"({type(error).__name__}); send a PNG or JPEG") from None
        if width * height > self.max_image_pixels:
            raise ServiceError(400, f"messages[0].content: the image is {width}x{height}, over this service's "
                                    f"{self.max_image_pixels} pixels; downscale it")
        path = self.image_dir / f"{uuid.uuid4().hex}.image"
        path.write_bytes(data)
        return str(path)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for request in self._pending:
                        request.discard_image()
                        request.future.set_exception(ServiceError(503, "the service is stopping", "server_error"))
                    self._pending.clear()
                    return
                key = self._pending[0].key
                batch = [request for request in self._pending if request.key == key]
                self._pending = deque(request for request in self._pending if request.key != key)
            failure: Exception | None = None
            # the shared service's engine applies each row's adapter (every request there names one)
            adapters = [request.adapter for request in batch] if self.engine.row_adapters is not None else None
            try:
                with self.model_lock:
                    results = self.engine.generate([request.prompt for request in batch], *key,
                                                   stop=functools.partial(_all_cancelled, batch), adapters=adapters)
            except Exception as error:  # noqa: BLE001 - each request of the batch gets the error
                failure = error
            finally:
                # The images go before the answers: a client holding its answer finds no file of its request left.
                for request in batch:
                    request.discard_image()
            if failure is not None:
                for request in batch:
                    request.future.set_exception(failure)
            elif results is None:
                self.stopped_early += 1
                for request in batch:
                    request.future.set_exception(Cancelled())
            else:
                for request, samples in zip(batch, results, strict=True):
                    request.future.set_result(samples)

    def _answer(self, samples, logprobs: bool) -> dict[str, Any]:
        tokenizer = self.engine.processor.tokenizer
        choices = []
        for index, sample in enumerate(samples):
            stopped = bool(sample.token_ids) and sample.token_ids[-1] in self.engine.eos_ids
            choice = {"index": index, "message": {"role": "assistant", "content": sample.text},
                      "finish_reason": "stop" if stopped else "length", "token_ids": list(sample.token_ids),
                      "logprobs": None}
            if logprobs:
                tokens = tokenizer.convert_ids_to_tokens(list(sample.token_ids))
                choice["logprobs"] = {"content": [{"token": token, "logprob": value, "top_logprobs": []}
                                                  for token, value in zip(tokens, sample.logprobs, strict=True)]}
            choices.append(choice)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "choices": choices}

    def problem(self) -> str | None:
        return None if self._worker is not None and self._worker.is_alive() else "the sampling thread is not running"

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()


def _all_cancelled(batch: list[_Request]) -> bool:
    return all(request.is_cancelled() for request in batch)


def _field(body: dict, name: str, kind: type, default, minimum: float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ServiceError(400, f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise ServiceError(400, f"{name}: {value} is below {minimum}")
    return kind(value)


def choose_engine(spec: RunSpec, model_path: str, work: Path,
                  max_image_pixels: int = MAX_IMAGE_PIXELS) -> ServingEngine:
    """rollout.engine: vllm, hf, or auto (vLLM where a Python with vLLM is configured, else Hugging Face)."""
    import torch

    engine = spec.rollout.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
    if engine == "vllm":
        vllm_python()  # raises, naming the fix, where there is none
        # vLLM's log goes with the work folder; the errors that need it (failed start, dead server) quote its tail.
        return VLLMServingEngine(spec, model_path, work / "vllm.log", torch.cuda.is_available())
    (work / "images").mkdir()
    return HFServingEngine(spec, model_path, work / "images", max_image_pixels)
