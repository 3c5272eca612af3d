"""`ttrv serve`: the rollout service, a process (a pod in a cluster) apart from the trainer, sharing nothing with it
but the weight store.

HTTP, OpenAI-compatible where OpenAI defines the call:
    POST /v1/chat/completions  one prompt (one user turn, its image as a data: URL) -> n samples with vLLM's
                               `token_ids` and the sampler's log-probs. An optional `ttrv_weight_version` (a step,
                               or null for the base model) pins the version: when another one is served the answer
                               is 409, so the trainer never samples from a version it did not ask for. Every answer
                               of this endpoint carries the served `ttrv_weight_version`, and so does every error
                               answer of the service (`error_answer`: too large, not JSON, no such route).
    GET  /health               200 once the engine is up and the store has been looked at; 503 before, or when broken
                               ("status": "dead" once the engine died, with the engine's own error as "reason")
    GET  /v1/models            the one model served (id: the run's name)
    GET  /weight_version       the served version, and the versions refused with why
    POST /sync                 look at the store now (the trainer calls it right after publishing)
    GET  /metrics              Prometheus text: the service's own ttrv_rollout_* metrics and, with vLLM, vLLM's own

The answers come from a serving engine (`ttrv.rollout.serving`: vLLM or the in-process Hugging Face engine). A
`SyncAgent` loads each new weight version from the store; requests hold the read side of its lock
and a reload the write side, so a reload waits for the requests in flight and holds back new ones (vLLM must not
reload mid-request, and an answer must come from the version it names).

An engine that died (the vLLM server exited, the sampling thread ended) or a reload that failed midway leaves nothing
to serve: the service answers 503 with the engine's own error for a few seconds, so that the requests in flight and
the trainer's retries read why, then `ttrv serve` exits with exitcodes.ROLLOUT_ENGINE_DIED, to be restarted (by its
Deployment in a cluster, by `ttrv run` locally) rather than answer 503 forever. /health fails from the first moment,
so the Deployment's liveness probe restarts a service that cannot exit.

The HTTP layer is FastAPI (Starlette) on uvicorn, as vLLM's own OpenAI server is (vllm/entrypoints/openai/
api_server.py re-exports vllm/entrypoints/launchers/launcher.py, whose serve_http builds a uvicorn.Config around a
FastAPI app with header limits, and vllm/entrypoints/launchers/api_server/entry.py passes timeout_keep_alive). What
uvicorn does not bound, this module does (`ServiceLimits`): the time a connection may take to send its headers and
its body, the body's size whatever Content-Length says (or chunked), the chat requests held at once (more get 503
with Retry-After), and every field of a request (`ChatRequest`, pydantic: finite numbers, ranges, upper limits on n,
max_tokens and image pixels; a violation answers 400 naming the field). The OpenAPI description is GET /openapi.json.
The engine's work runs in threads, so the event loop keeps answering /health while a batch samples; a client that
disconnects cancels its request (no further votes are sampled for it).
"""


from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ttrv import exitcodes, log
from ttrv.rollout.api import ServiceLimits, chat_request_model, validation_message
from ttrv.rollout.asgi import (
    BodyRefused,
    HTTPThread,
    add_metrics_route,
    disconnected,
    listening_socket,
    read_body,
)
from ttrv.rollout.serving import Cancelled, ServiceError, ServingEngine, choose_engine
from ttrv.rollout.sync import SyncAgent
from ttrv.spec import RunSpec

logger = log.get_logger(__name__)

DEATH_GRACE_SECONDS = 5.0
"""How long a service whose engine died keeps answering 503 with the reason before it exits (longer while requests
are still being answered, up to DEATH_DRAIN_SECONDS): the trainer's retries come every few seconds."""
DEATH_DRAIN_SECONDS = 30.0
CHAT_PATH = "/v1/chat/completions"


# ----------------------------------------------------------------------------------------------------- service
class RolloutService:
    """The engine, the sync agent and the HTTP routes, without the socket (`serve` adds it)."""

    def __init__(self, spec: RunSpec, engine: ServingEngine, agent: SyncAgent, limits: ServiceLimits | None = None,
                 work: Path | None = None):
        self.spec = spec
        self.model_id = spec.name
        self.engine = engine
        self.agent = agent
        self.limits = limits or ServiceLimits()
        self.work = work
        self.started = False
        self.dead: str | None = None
        """Why the service will never answer again (set by `serve` once it found the engine dead); it then exits."""
        self.in_flight = 0
        """Chat requests held now (read and changed on the event loop only)."""

    def death(self) -> str | None:
        """Why the engine can never serve again (None: it may): it died, or a reload failed midway."""
        if self.agent.broken:
            return self.agent.broken
        if self.started:
            return self.engine.problem()
        return None

    def problem(self) -> str | None:
        """Why the service cannot answer now (None: it can)."""
        if self.dead:
            return (f"the rollout engine died; this service exits (code {exitcodes.ROLLOUT_ENGINE_DIED}) to be "
                    f"restarted: {self.dead}")
        if self.agent.broken:
            return self.agent.broken
        if not self.started:
            return f"starting: the {self.engine.name} engine is loading the model"
        if not self.agent.synced.is_set():
            detail = f" ({self.agent.last_error})" if self.agent.last_error else ""
            return f"starting: the weight store has not been read yet{detail}"
        return self.engine.problem()

    def health(self) -> tuple[int, dict]:
        problem = self.problem()
        state = {"engine": self.engine.name, "weight_version": self.agent.version,
                 "in_flight": self.agent.lock.readers}
        if problem:
            return 503, {"status": "dead" if self.dead else "unavailable", "reason": self.scrub(problem), **state}
        return 200, {"status": "ok", **state}

    def weight_version(self, model: str | None = None) -> tuple[int, dict]:
        """`model`: the shared service's run (`?model=` of GET /weight_version); one run is served here."""
        refused = {str(step): self.scrub(reason) for step, (_, reason) in sorted(self.agent.refused.items())}
        store_error = self.agent.last_error and self.scrub(self.agent.last_error)
        return 200, {"weight_version": self.agent.version, "engine": self.engine.name, "refused": refused,
                     "store_error": store_error}

    version_labels: tuple[str, ...] = ()
    """The labels of the weight-version metric: none for one run; the shared service labels each run's."""

    def served_versions(self) -> dict[tuple[str, ...], int | None]:
        """The weight version served (None: the base model), by its `version_labels` values: what /metrics says."""
        return {(): self.agent.version}

    def refused_count(self) -> int:
        """Weight versions refused so far (GET /weight_version says why)."""
        return len(self.agent.refused)

    def models(self) -> tuple[int, dict]:
        return 200, {"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": 0, "owned_by": "ttrv", "root": self.spec.model.path,
            "ttrv_weight_version": self.agent.version}]}

    def sync(self) -> tuple[int, dict]:
        self.agent.wake()
        return 202, {"weight_version": self.agent.version}

    def chat(self, body: dict[str, Any], cancelled: threading.Event | None = None) -> tuple[int, dict]:
        """A validated request (`chat_request_model`'s fields as sent) -> (status, answer). Blocks: runs in a thread.
        Raises Cancelled when `cancelled` is set (the client went away) before the engine answered."""
        version = None
        try:
            agent, complete, model_id = self.route(body)
            version = agent.version
            pinned = "ttrv_weight_version" in body
            wanted = body.pop("ttrv_weight_version", None)
            problem = self.problem()
            if problem:
                raise ServiceError(503, problem, "server_error")
            body.pop("model", None)
            with agent.lock.read():
                version = agent.version
                if pinned and wanted != version:
                    raise ServiceError(409, f"ttrv_weight_version: this service serves {_version_name(version)}, "
                                            f"not {_version_name(wanted)}; wait for GET /weight_version to report "
                                            "it", "conflict_error")
                answer = complete(body, cancelled)
        except Cancelled:
            raise
        except ServiceError as error:
            if error.status >= 500:
                logger.warning("rollout_request_failed", status=int(error.status), error=error.message)
            return self.error_answer(error, version)
        except Exception as error:  # noqa: BLE001 - an engine failure answers 500; the service keeps serving
            logger.error("rollout_request_crashed", error=f"{type(error).__name__}: {error}", exc_info=True)
            failure = ServiceError(500, f"the {self.engine.name} engine failed: {type(error).__name__}: {error}",
                                   "server_error")
            return self.error_answer(failure, version)
        return 200, {**answer, "model": model_id, "ttrv_weight_version": version}

    def route(self, body: dict[str, Any]) -> tuple[SyncAgent, Any, str]:
        """Which weights a request is for: (the sync agent whose version it pins, the engine call that answers it,
        the model id it answers as). One run here; the shared service (`ttrv.rollout.shared`) picks the run that
        the request's `model` names."""
        if body.get("model") not in (None, self.model_id):
            raise ServiceError(404, f"model: {body['model']!r} is not served here; this service serves "
                                    f"{self.model_id!r} (the run's name)", "not_found_error")
        return self.agent, self.engine.complete, self.model_id

    def error_answer(self, error: ServiceError, version: int | None = None, *, now: bool = False) -> tuple[int, dict]:
        """Every error answer of the service: its status and OpenAI's error shape, with the served weight version
        (the one the request met; `now`: the one served now) as every answer of the service carries it. The
        message names no folder of this machine."""
        return error_answer(error, self.agent.version if now else version, self.scrub)

    def scrub(self, text: str) -> str:
        """`text` without this machine's folders (the work folder, the model's, the temporary folder, ...): a
        request's answer tells the client what was wrong, not where this service keeps its files."""
        folders = {str(self.work) if self.work else "", tempfile.gettempdir(), str(Path.home()), os.getcwd(),
                   self.spec.model.path if self.spec.model.path.startswith("/") else ""}
        for folder in sorted(filter(lambda f: len(f) > 1, folders), key=len, reverse=True):
            text = re.sub(re.escape(folder.rstrip("/")) + r"(/[^\s:'\"]*)?", "<server path>", text)
        return text


def error_answer(error: ServiceError, version: int | None, scrub=lambda text: text) -> tuple[int, dict]:
    status = int(error.status)
    return status, {"error": {"message": scrub(error.message), "type": error.kind, "param": None, "code": status},
                    "ttrv_weight_version": version}


def _version_name(version: int | None) -> str:
    return "the base model (weight version null)" if version is None else f"weight version {version}"


# ------------------------------------------------------------------------------------------------------- app
def build_app(service: RolloutService) -> FastAPI:
    """The ASGI app of the service: its routes, the request model's validation and the limits on bodies and on
    requests held at once. `serve` runs it on uvicorn; tests may too."""
    limits = service.limits
    request_model = chat_request_model(limits)
    # One thread per request held: each waits on the engine (the Hugging Face engine's one sampling thread, or
    # vLLM's server), so the event loop never blocks.
    pool = ThreadPoolExecutor(limits.max_in_flight, thread_name_prefix="ttrv-request")
    app = FastAPI(title="ttrv serve", description="The rollout service of a ttrv run (OpenAI chat completions with "
                  "ttrv_weight_version).", version="1", docs_url=None, redoc_url=None)
    app.state.service, app.state.pool = service, pool

    def answer(status: int, document: dict, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(document, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (404 no route, 405 wrong method) in the service's error shape
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = (f"no route {request.method} {request.url.path}; see `ttrv serve --help`" if error.status_code == 404
                   else f"{request.method} {request.url.path}: {error.detail}")
        return answer(*service.error_answer(ServiceError(error.status_code, message, kind), now=True))

    @app.exception_handler(Exception)
    async def crash(request: Request, error: Exception) -> JSONResponse:
        logger.error("http_request_crashed", path=request.url.path, error=f"{type(error).__name__}: {error}",
                     exc_info=error)
        failure = ServiceError(500, f"internal error: {type(error).__name__}", "server_error")
        return answer(*service.error_answer(failure, now=True))

    @app.get("/health", summary="200 once the engine is up and the store read; 503 before, or when broken")
    async def health() -> JSONResponse:
        return answer(*service.health())

    @app.get("/weight_version", summary="the served version, and the versions refused with why")
    async def weight_version(model: str | None = None) -> JSONResponse:
        # `model`: which run's version, on an experiment's shared service (the trainer's client always sends it)
        return answer(*service.weight_version(model))

    @app.get("/v1/models", summary="the one model served (id: the run's name)")
    async def models() -> JSONResponse:
        return answer(*service.models())

    @app.post("/sync", summary="look at the store now (the trainer calls it right after publishing)")
    async def sync(request: Request) -> Response:
        # the body ({"step": k} from the trainer) is read, within the limits, and not looked at: read whole, the
        # connection stays open for the next call (BodyGuard closes one whose body was left unread)
        try:
            await read_body(request, limits)
        except BodyRefused as refused:
            return answer(*service.error_answer(refused.error, now=True))
        except ClientDisconnect:
            return Response(status_code=499)
        return answer(*service.sync())

    schema = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    app.openapi_schema = None
    chat_components = schema.pop("$defs", {})

    @app.post(CHAT_PATH, summary="n samples of one prompt, with token_ids and log-probs", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}})
    async def chat(request: Request) -> Response:
        if service.in_flight >= limits.max_in_flight:
            error = ServiceError(503, f"the service holds {limits.max_in_flight} requests already; retry after "
                                      f"{limits.retry_after_seconds} s", "server_error")
            return answer(*service.error_answer(error, now=True),
                          headers={"Retry-After": str(limits.retry_after_seconds)})
        service.in_flight += 1
        try:
            return await _chat(request)
        finally:
            service.in_flight -= 1

    async def _chat(request: Request) -> Response:
        try:
            raw = await read_body(request, limits)
        except BodyRefused as refused:
            return answer(*service.error_answer(refused.error, now=True))
        except ClientDisconnect:
            return Response(status_code=499)  # nobody reads it
        try:
            document = json.loads(raw or b"null")
        except ValueError as error:  # UnicodeDecodeError too
            return answer(*service.error_answer(ServiceError(400, f"the body is not JSON: {error}"), now=True))
        if not isinstance(document, dict):
            error = ServiceError(400, "the body must be a JSON object (a chat-completion request)")
            return answer(*service.error_answer(error, now=True))
        try:
            request_model.model_validate(document)
        except ValidationError as error:
            return answer(*service.error_answer(ServiceError(400, validation_message(error)), now=True))
        # The body as sent (validated): extra fields are the engine's to take or refuse.
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(pool, service.chat, document, cancelled)
        # As vLLM's with_cancellation (vllm/entrypoints/serve/utils/api_utils.py): the body is read, so the next
        # message of the connection can only be http.disconnect.
        disconnect = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait([work, disconnect], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                cancelled.set()
                logger.info("rollout_request_cancelled", reason="the client disconnected")
            disconnect.cancel()
        try:
            status, document = await work
        except Cancelled:
            return Response(status_code=499)
        return answer(status, document)

    original_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = original_openapi()
            document.setdefault("components", {}).setdefault("schemas", {}).update(chat_components)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
    add_metrics_route(app, service)
    return app



# ------------------------------------------------------------------------------------------------------- serve
def serve(spec: RunSpec, host: str, port: int, limits: ServiceLimits | None = None,
          build_service: Callable[[Path, ServiceLimits], RolloutService] | None = None) -> int:
    """Run the service until SIGTERM or SIGINT (exit code 0) or until its engine dies (ROLLOUT_ENGINE_DIED).
    `build_service(work, limits)`: another service than the run's own, e.g. an experiment's shared one
    (`ttrv.rollout.shared.shared_service`, which builds on this module, so the CLI passes it in)."""
    from ttrv.store import open_store
    from ttrv.weights import resolve_model

    limits = limits or ServiceLimits.from_env()
    sock = listening_socket(host, port)
    work = Path(tempfile.mkdtemp(prefix="ttrv-serve-"))
    if build_service is None:
        store = open_store(spec.storage.uri, spec.storage.endpoint)
        engine = choose_engine(spec, resolve_model(spec.model.path), work, limits.max_image_pixels)
        agent = SyncAgent(store, engine.load, work / "weights",
                          load_in_memory=getattr(engine, "load_in_memory", None))
        service = RolloutService(spec, engine, agent, limits, work)
    else:
        service = build_service(work, limits)
        engine, agent, store = service.engine, service.agent, service.agent
    app = build_app(service)
    http = HTTPThread(app, sock, limits)

    def stop(signum, _frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stopping(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = exitcodes.OK
    try:
        http.start()
        logger.info("serve_listening", host=host, port=http.port, engine=engine.name, model=spec.model.path,
                    store=spec.storage.uri, runs=sorted(getattr(agent, "agents", {})) or None)  # a shared service's runs
        engine.start()
        service.started = True
        agent.start()
        ready = False
        # Timed waits, so that a signal is handled at once; the engine is looked at twice a second.
        while not (death := service.death()):
            if not ready and agent.synced.wait(0.5):
                ready = True
                logger.info("serve_ready", engine=engine.name, weight_version=agent.version)
            elif ready:
                time.sleep(0.5)
        code = _die(service, death)
    except _Stopping as stopping:
        logger.info("serve_stopping", signal=str(stopping), grace_seconds=limits.shutdown_seconds)
    finally:
        # uvicorn's graceful shutdown: the listener closes, the requests in flight are answered (the engine still
        # runs), then the engine stops.
        http.stop(limits.shutdown_seconds + 5)
        app.state.pool.shutdown(wait=False, cancel_futures=True)
        agent.stop()
        engine.close()
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
