"""`ttrv serve`: the rollout service, a process (a pod in a cluster) apart from the trainer, sharing nothing with it
but the weight store.

HTTP, OpenAI-compatible where OpenAI defines the call:
    POST /v1/chat/completions  one prompt (one user turn, its image as a data: URL) -> n samples with vLLM's
                               `token_ids` and the sampler's log-probs. An optional `ttrv_weight_version` (a step,
                               or null for the base model) pins the version: when another one is served the answer
                               is 409, so the trainer never samples from a version it did not ask for. Every answer
                               of this endpoint, errors included, carries the served `ttrv_weight_version`.
    GET  /health               200 once the engine is up and the store has been looked at; 503 before, or when broken
                               ("status": "dead" once the engine died, with the engine's own error as "reason")
    GET  /v1/models            the one model served (id: the run's name)
    GET  /weight_version       the served version, and the versions refused with why
    POST /sync                 look at the store now (the trainer calls it right after publishing)

Two engines behind one interface (`Backend`): vLLM, whose own OpenAI server runs as a child process on a loopback
port and gets the requests passed on (the production path), and the in-process Hugging Face engine for machines
without vLLM. A `SyncAgent` loads each new weight version from the store; requests hold the read side of its lock
and a reload the write side, so a reload waits for the requests in flight and holds back new ones (vLLM must not
reload mid-request, and an answer must come from the version it names).

An engine that died (the vLLM server exited, the sampling thread ended) or a reload that failed midway leaves nothing
to serve: the service answers 503 with the engine's own error for a few seconds, so that the requests in flight and
the trainer's retries read why, then `ttrv serve` exits with exitcodes.ROLLOUT_ENGINE_DIED, to be restarted (by its
Deployment in a cluster, by `ttrv run` locally) rather than answer 503 forever. /health fails from the first moment,
so the Deployment's liveness probe restarts a service that cannot exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from ttrv import exitcodes, lifetime, log
from ttrv.data import DataError, Prompt
from ttrv.rollout.chat import NEUTRAL_SAMPLING, prompt_from_messages
from ttrv.rollout.sync import SyncAgent, VersionRefused
from ttrv.rollout.vllm_server import CPU_ARGS, VLLMError, VLLMServer, free_port, vllm_python
from ttrv.spec import RunSpec

logger = log.get_logger(__name__)

MAX_BODY_BYTES = 64 << 20
DEATH_GRACE_SECONDS = 5.0
"""How long a service whose engine died keeps answering 503 with the reason before it exits (longer while requests
are still being answered, up to DEATH_DRAIN_SECONDS): the trainer's retries come every few seconds."""
DEATH_DRAIN_SECONDS = 30.0
ENGINE_EXIT_SECONDS = 15.0
"""How long a failed request waits for a vLLM server whose engine died to exit: it stops by itself once it sees the
dead engine, on a failed request at once or within the 5 s of its watchdog (vllm/entrypoints/launchers/launcher.py,
terminate_if_errored and watchdog_loop), after logging the engine's error."""
PROMPT_TOKEN_BUDGET = 1024
"""Room left for the prompt (text and image tokens) next to the longest response, where vLLM on CPU needs a model
length; on GPU vLLM takes the checkpoint's own."""


class ServiceError(Exception):
    """An HTTP error answer: its status and a message naming the field or the fix."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class Backend(Protocol):
    name: str

    def start(self) -> None: ...

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat-completion request (validated only as far as the engine needs) -> the OpenAI answer; raises
        ServiceError."""
        ...

    def load(self, step: int, path: Path, kind: str) -> None:
        """Serve the fetched version at `path` (kind full|lora); VersionRefused when it cannot, unchanged."""
        ...

    def problem(self) -> str | None:
        """Why the engine cannot serve (None: it can)."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------ vLLM
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


def vllm_engine_args(spec: RunSpec, gpu: bool) -> list[str]:
    """vLLM's flags for this spec: the model's dtype (the trainer's, so both compute the same log-probs); on CPU the
    CPU settings with a model length that fits the longest response; then $TTRV_VLLM_ARGS (set per pod by the
    manifests builder: tensor parallelism, memory share), which win because vLLM's parser keeps a flag's last value."""
    from ttrv.modeling import torch_dtype

    dtype = str(torch_dtype(spec.model.dtype, "cuda" if gpu else "cpu")).removeprefix("torch.")
    args = []
    if not gpu:
        longest = max(spec.rollout.max_new_tokens, spec.eval.max_new_tokens or 0)
        args += [*CPU_ARGS, "--max-model-len", str(PROMPT_TOKEN_BUDGET + longest)]
    return args + ["--dtype", dtype, *shlex.split(os.environ.get("TTRV_VLLM_ARGS", ""))]


class VLLMBackend:
    """vLLM's own OpenAI server on a loopback port; requests are passed on with the served model's name."""

    name = "vllm"

    def __init__(self, spec: RunSpec, model_path: str, log_path: Path, gpu: bool):
        lora = spec.model.lora
        self.server = VLLMServer(model_path, lora=lora is not None, max_lora_rank=lora.rank if lora else 16,
                                 extra_args=vllm_engine_args(spec, gpu), log_path=log_path,
                                 startup_timeout=1800, request_timeout=3600)
        self._death: str | None = None

    def start(self) -> None:
        self.server.start()

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.server.post("/v1/chat/completions", {**NEUTRAL_SAMPLING, **body,
                                                              "model": self.server.served_model})
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
        # path are never reused, as VLLMServer requires.
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


class HFBackend:
    """The in-process Hugging Face engine. Requests that arrive while a batch is being sampled queue up, and those
    that share sampling settings are sampled together as the next batch (one `generate` call)."""

    name = "hf"

    def __init__(self, spec: RunSpec, model_path: str, image_dir: Path):
        self.spec = spec
        self.model_path = model_path
        self.image_dir = image_dir
        self.engine = None
        self.base: dict | None = None
        self._pending: deque[tuple[tuple, Prompt, Future]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None

    def start(self) -> None:
        import torch

        from ttrv.modeling import load_model, load_processor
        from ttrv.rollout.hf import HFEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(self.model_path, self.spec.model.dtype, device)
        self.engine = HFEngine(model, load_processor(self.model_path))
        if self.spec.model.lora is not None:
            # adapters are merged into a copy of the base weights: each version replaces the previous one
            self.base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        self._worker = threading.Thread(target=self._run, name="ttrv-hf-batches", daemon=True)
        self._worker.start()

    def load(self, step: int, path: Path, kind: str) -> None:
        from safetensors.torch import load_file

        from ttrv.weights import merge_lora

        tensors = {}
        for shard in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(shard))
        try:
            if kind == "lora":
                if self.base is None:
                    raise ValueError("it is a LoRA adapter but the spec has no model.lora; set model.lora as the "
                                     "trainer has it")
                lora = self.spec.model.lora
                tensors = merge_lora(self.base, tensors, lora.alpha / lora.rank)
            self.engine.load_tensors(step, tensors)
        except ValueError as error:
            raise VersionRefused(str(error)) from None

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
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
        # a seeded request's samples depend on its seed alone (the engine seeds each row from the prompt id), not on
        # the requests it happens to be batched with
        prompt = Prompt(f"seed:{seed}" if seed is not None else uuid.uuid4().hex, text,
                        self._image_file(image) if image is not None else None)
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise ServiceError(503, "the service is stopping", "server_error")
            key = (n, temperature, top_p, max_tokens, 0 if seed is not None else None)
            self._pending.append((key, prompt, future))
            self._cond.notify()
        try:
            samples = future.result()
        except (DataError, ValueError) as error:  # an unreadable image, greedy with n > 1
            raise ServiceError(400, str(error)) from None
        return self._answer(samples, bool(body.get("logprobs")))

    def _image_file(self, data: bytes) -> str:
        """The image as a file named by its content, the form the engine's processor loads (and checks); written
        once, as prompts come back every step."""
        path = self.image_dir / hashlib.sha256(data).hexdigest()
        if not path.exists():
            staged = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
            staged.write_bytes(data)
            staged.replace(path)
        return str(path)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for _, _, future in self._pending:
                        future.set_exception(ServiceError(503, "the service is stopping", "server_error"))
                    return
                key = self._pending[0][0]
                batch = [item for item in self._pending if item[0] == key]
                self._pending = deque(item for item in self._pending if item[0] != key)
            try:
                results = self.engine.generate([prompt for _, prompt, _ in batch], *key)
            except Exception as error:  # noqa: BLE001 - each request of the batch gets the error
                for _, _, future in batch:
                    future.set_exception(error)
            else:
                for (_, _, future), samples in zip(batch, results, strict=True):
                    future.set_result(samples)

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


def _field(body: dict, name: str, kind: type, default, minimum: float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ServiceError(400, f"{name}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    if value < minimum:
        raise ServiceError(400, f"{name}: {value} is below {minimum}")
    return kind(value)


# ----------------------------------------------------------------------------------------------------- service
class RolloutService:
    """The engine, the sync agent and the HTTP routes, without the socket (`serve` adds it)."""

    def __init__(self, spec: RunSpec, backend: Backend, agent: SyncAgent):
        self.spec = spec
        self.model_id = spec.name
        self.backend = backend
        self.agent = agent
        self.started = False
        self.dead: str | None = None
        """Why the service will never answer again (set by `serve` once it found the engine dead); it then exits."""

    def death(self) -> str | None:
        """Why the engine can never serve again (None: it may): it died, or a reload failed midway."""
        if self.agent.broken:
            return self.agent.broken
        if self.started:
            return self.backend.problem()
        return None

    def problem(self) -> str | None:
        """Why the service cannot answer now (None: it can)."""
        if self.dead:
            return (f"the rollout engine died; this service exits (code {exitcodes.ROLLOUT_ENGINE_DIED}) to be "
                    f"restarted: {self.dead}")
        if self.agent.broken:
            return self.agent.broken
        if not self.started:
            return f"starting: the {self.backend.name} engine is loading the model"
        if not self.agent.synced.is_set():
            detail = f" ({self.agent.last_error})" if self.agent.last_error else ""
            return f"starting: the weight store has not been read yet{detail}"
        return self.backend.problem()

    def health(self) -> tuple[int, dict]:
        problem = self.problem()
        state = {"engine": self.backend.name, "weight_version": self.agent.version,
                 "in_flight": self.agent.lock.readers}
        if problem:
            return 503, {"status": "dead" if self.dead else "unavailable", "reason": problem, **state}
        return 200, {"status": "ok", **state}

    def weight_version(self) -> tuple[int, dict]:
        refused = {str(step): reason for step, (_, reason) in sorted(self.agent.refused.items())}
        return 200, {"weight_version": self.agent.version, "engine": self.backend.name, "refused": refused,
                     "store_error": self.agent.last_error}

    def models(self) -> tuple[int, dict]:
        return 200, {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "ttrv", "root": self.spec.model.path,
            "ttrv_weight_version": self.agent.version}]}

    def sync(self) -> tuple[int, dict]:
        self.agent.wake()
        return 202, {"weight_version": self.agent.version}

    def chat(self, body: Any) -> tuple[int, dict]:
        version = self.agent.version
        try:
            if not isinstance(body, dict):
                raise ServiceError(400, "the body must be a JSON object (a chat-completion request)")
            if body.get("model") not in (None, self.model_id):
                raise ServiceError(404, f"model: {body['model']!r} is not served here; this service serves "
                                        f"{self.model_id!r} (the run's name)", "not_found_error")
            pinned = "ttrv_weight_version" in body
            wanted = body.pop("ttrv_weight_version", None)
            if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int)):
                raise ServiceError(400, f"ttrv_weight_version: expected a step (integer) or null, got {wanted!r}")
            problem = self.problem()
            if problem:
                raise ServiceError(503, problem, "server_error")
            body.pop("model", None)
            with self.agent.lock.read():
                version = self.agent.version
                if pinned and wanted != version:
                    raise ServiceError(409, f"ttrv_weight_version: this service serves {_version_name(version)}, "
                                            f"not {_version_name(wanted)}; wait for GET /weight_version to report "
                                            "it", "conflict_error")
                answer = self.backend.complete(body)
        except ServiceError as error:
            if error.status >= 500:
                logger.warning("rollout_request_failed", status=int(error.status), error=error.message)
            return error.status, _error_answer(error, version)
        except Exception as error:  # noqa: BLE001 - an engine failure answers 500; the service keeps serving
            logger.error("rollout_request_crashed", error=f"{type(error).__name__}: {error}", exc_info=True)
            failure = ServiceError(500, f"the {self.backend.name} engine failed: {type(error).__name__}: {error}",
                                   "server_error")
            return 500, _error_answer(failure, version)
        return 200, {**answer, "model": self.model_id, "ttrv_weight_version": version}


def _error_answer(error: ServiceError, version: int | None) -> dict:
    """OpenAI's error shape, with the served version as every answer of the chat endpoint carries it."""
    return {"error": {"message": error.message, "type": error.kind, "param": None, "code": int(error.status)},
            "ttrv_weight_version": version}


def _version_name(version: int | None) -> str:
    return "the base model (weight version null)" if version is None else f"weight version {version}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        service = self.server.service
        routes = {"/health": service.health, "/weight_version": service.weight_version, "/v1/models": service.models}
        route = routes.get(self.path.split("?", 1)[0])
        self._send(*(route() if route else self._not_found()))

    def do_POST(self) -> None:
        service = self.server.service
        path = self.path.split("?", 1)[0]
        if path == "/sync":
            self._send(*service.sync())
            return
        if path != "/v1/chat/completions":
            self._send(*self._not_found())
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, {"error": {"message": f"the request is over {MAX_BODY_BYTES >> 20} MiB; send smaller "
                                                  "images", "type": "invalid_request_error", "code": 413}})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError as error:
            self._send(400, {"error": {"message": f"the body is not JSON: {error}", "type": "invalid_request_error",
                                       "code": 400}})
            return
        self._send(*service.chat(body))

    def _not_found(self) -> tuple[int, dict]:
        return 404, {"error": {"message": f"no route {self.command} {self.path}; see `ttrv serve --help`",
                               "type": "not_found_error", "code": 404}}

    def _send(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        logger.debug("http_request", client=self.client_address[0], line=format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The trainer opens one connection per prompt at once; the default backlog of 5 refuses some under load.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: RolloutService):
        super().__init__(address, _Handler)
        self.service = service


def choose_backend(spec: RunSpec, model_path: str, work: Path) -> Backend:
    """rollout.engine: vllm, hf, or auto (vLLM where a Python with vLLM is configured, else Hugging Face)."""
    import torch

    engine = spec.rollout.engine
    if engine == "auto":
        engine = "vllm" if vllm_available() else "hf"
    if engine == "vllm":
        vllm_python()  # raises, naming the fix, where there is none
        # vLLM's log goes with the work folder; the errors that need it (failed start, dead server) quote its tail.
        return VLLMBackend(spec, model_path, work / "vllm.log", torch.cuda.is_available())
    (work / "images").mkdir()
    return HFBackend(spec, model_path, work / "images")


def serve(spec: RunSpec, host: str, port: int) -> int:
    """Run the service until SIGTERM or SIGINT (exit code 0) or until its engine dies (ROLLOUT_ENGINE_DIED)."""
    from ttrv.store import open_store
    from ttrv.weights import resolve_model

    work = Path(tempfile.mkdtemp(prefix="ttrv-serve-"))
    store = open_store(spec.storage.uri, spec.storage.endpoint)
    backend = choose_backend(spec, resolve_model(spec.model.path), work)
    agent = SyncAgent(store, backend.load, work / "weights")
    service = RolloutService(spec, backend, agent)
    httpd = _Server((host, port), service)

    def stop(signum, _frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stopping(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    http_thread = threading.Thread(target=httpd.serve_forever, name="ttrv-http", daemon=True)
    http_thread.start()
    logger.info("serve_listening", host=host, port=httpd.server_address[1], engine=backend.name, model=spec.model.path,
                store=spec.storage.uri)
    code = exitcodes.OK
    try:
        backend.start()
        service.started = True
        agent.start()
        ready = False
        # Timed waits, so that a signal is handled at once; the engine is looked at twice a second.
        while not (death := service.death()):
            if not ready and agent.synced.wait(0.5):
                ready = True
                logger.info("serve_ready", engine=backend.name, weight_version=agent.version)
            elif ready:
                time.sleep(0.5)
        code = _die(service, death)
    except _Stopping as stopping:
        logger.info("serve_stopping", signal=str(stopping))
    finally:
        httpd.shutdown()
        httpd.server_close()
        agent.stop()
        backend.close()
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    return code


def _die(service: RolloutService, death: str) -> int:
    """The engine is dead: answer 503 with why for DEATH_GRACE_SECONDS and while requests are still being answered
    (at most DEATH_DRAIN_SECONDS), then the exit code that says so."""
    service.dead = death
    logger.error("rollout_engine_died", reason=death, exit_code=exitcodes.ROLLOUT_ENGINE_DIED,
                 action=f"answering 503 for {DEATH_GRACE_SECONDS:.0f} s, then exiting to be restarted")
    started = time.monotonic()
    while True:
        waited = time.monotonic() - started
        if waited >= DEATH_DRAIN_SECONDS or (waited >= DEATH_GRACE_SECONDS and not service.agent.lock.readers):
            return exitcodes.ROLLOUT_ENGINE_DIED
        time.sleep(0.1)


class _Stopping(Exception):
    """SIGTERM or SIGINT: stop wherever the main thread is (the engine may still be starting)."""


class ServeProcess:
    """`ttrv serve` as a child process of this machine, in a session of its own, always at the same address: what
    runs beside the trainer locally where a cluster runs the rollout pod. A restart comes back at the same URL, as a
    pod does behind its Service."""

    def __init__(self, spec_path: str | Path, log_path: str | Path, port: int | None = None,
                 env: dict[str, str] | None = None):
        self.spec_path = Path(spec_path)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> ServeProcess:
        """Start it and wait until /health answers 200; raises RuntimeError with the log's tail otherwise."""
        command = [sys.executable, "-m", "ttrv.cli", "serve", "--spec", str(self.spec_path), "--port", str(self.port)]
        with self.log_path.open("ab") as log_file:
            self.process = lifetime.start(command, serves=self.env.get(lifetime.RUN_LOCK_ENV), env=self.env,
                                          stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ttrv serve exited with code {self.process.returncode}; its log "
                                   f"({self.log_path}) ends with:\n{self.log_tail()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"ttrv serve not healthy after {timeout:.0f} s; its log ({self.log_path}) ends "
                           f"with:\n{self.log_tail()}")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, decoded JSON answer) of one call."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def kill(self) -> None:
        """SIGKILL, as when a node fails: no handler runs. (With the vLLM engine its server, in a process group of
        its own, gets SIGTERM from the kernel and shuts down by itself.)"""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, grace: float = 60.0) -> int:
        """SIGTERM, as Kubernetes stops a pod, then SIGKILL after `grace` seconds; the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        with self.log_path.open(errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
