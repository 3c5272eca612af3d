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

The answers come from a serving engine (`ttrv.rollout.serving`: vLLM or the in-process Hugging Face engine). A
`SyncAgent` loads each new weight version from the store; requests hold the read side of its lock
and a reload the write side, so a reload waits for the requests in flight and holds back new ones (vLLM must not
reload mid-request, and an answer must come from the version it names).

An engine that died (the vLLM server exited, the sampling thread ended) or a reload that failed midway leaves nothing
to serve: the service answers 503 with the engine's own error for a few seconds, so that the requests in flight and
the trainer's retries read why, then `ttrv serve` exits with exitcodes.ROLLOUT_ENGINE_DIED, to be restarted (by its
Deployment in a cluster, by `ttrv run` locally) rather than answer 503 forever. /health fails from the first moment,
so the Deployment's liveness probe restarts a service that cannot exit.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ttrv import exitcodes, log
from ttrv.rollout.serving import ServiceError, ServingEngine, choose_engine
from ttrv.rollout.sync import SyncAgent
from ttrv.spec import RunSpec

logger = log.get_logger(__name__)

MAX_BODY_BYTES = 64 << 20
DEATH_GRACE_SECONDS = 5.0
"""How long a service whose engine died keeps answering 503 with the reason before it exits (longer while requests
are still being answered, up to DEATH_DRAIN_SECONDS): the trainer's retries come every few seconds."""
DEATH_DRAIN_SECONDS = 30.0


# ----------------------------------------------------------------------------------------------------- service
class RolloutService:
    """The engine, the sync agent and the HTTP routes, without the socket (`serve` adds it)."""

    def __init__(self, spec: RunSpec, engine: ServingEngine, agent: SyncAgent):
        self.spec = spec
        self.model_id = spec.name
        self.engine = engine
        self.agent = agent
        self.started = False
        self.dead: str | None = None
        """Why the service will never answer again (set by `serve` once it found the engine dead); it then exits."""

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
            return 503, {"status": "dead" if self.dead else "unavailable", "reason": problem, **state}
        return 200, {"status": "ok", **state}

    def weight_version(self) -> tuple[int, dict]:
        refused = {str(step): reason for step, (_, reason) in sorted(self.agent.refused.items())}
        return 200, {"weight_version": self.agent.version, "engine": self.engine.name, "refused": refused,
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
                answer = self.engine.complete(body)
        except ServiceError as error:
            if error.status >= 500:
                logger.warning("rollout_request_failed", status=int(error.status), error=error.message)
            return error_answer(error, version)
        except Exception as error:  # noqa: BLE001 - an engine failure answers 500; the service keeps serving
            logger.error("rollout_request_crashed", error=f"{type(error).__name__}: {error}", exc_info=True)
            failure = ServiceError(500, f"the {self.engine.name} engine failed: {type(error).__name__}: {error}",
                                   "server_error")
            return error_answer(failure, version)
        return 200, {**answer, "model": self.model_id, "ttrv_weight_version": version}


def error_answer(error: ServiceError, version: int | None) -> tuple[int, dict]:
    """Every error answer of the service: its status and OpenAI's error shape, with the served weight version (the
    one the request met) as every answer of the service carries it."""
    status = int(error.status)
    return status, {"error": {"message": error.message, "type": error.kind, "param": None, "code": status},
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
            self._send(*self._refuse(ServiceError(413, f"the request is over {MAX_BODY_BYTES >> 20} MiB; send "
                                                       "smaller images")))
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError as error:
            self._send(*self._refuse(ServiceError(400, f"the body is not JSON: {error}")))
            return
        self._send(*service.chat(body))

    def _not_found(self) -> tuple[int, dict]:
        return self._refuse(ServiceError(404, f"no route {self.command} {self.path}; see `ttrv serve --help`",
                                         "not_found_error"))

    def _refuse(self, error: ServiceError) -> tuple[int, dict]:
        """An answer refused before the service looked at it, with the version served now."""
        return error_answer(error, self.server.service.agent.version)

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


def serve(spec: RunSpec, host: str, port: int) -> int:
    """Run the service until SIGTERM or SIGINT (exit code 0) or until its engine dies (ROLLOUT_ENGINE_DIED)."""
    from ttrv.store import open_store
    from ttrv.weights import resolve_model

    work = Path(tempfile.mkdtemp(prefix="ttrv-serve-"))
    store = open_store(spec.storage.uri, spec.storage.endpoint)
    engine = choose_engine(spec, resolve_model(spec.model.path), work)
    agent = SyncAgent(store, engine.load, work / "weights")
    service = RolloutService(spec, engine, agent)
    httpd = _Server((host, port), service)

    def stop(signum, _frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise _Stopping(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    http_thread = threading.Thread(target=httpd.serve_forever, name="ttrv-http", daemon=True)
    http_thread.start()
    logger.info("serve_listening", host=host, port=httpd.server_address[1], engine=engine.name, model=spec.model.path,
                store=spec.storage.uri)
    code = exitcodes.OK
    try:
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
        logger.info("serve_stopping", signal=str(stopping))
    finally:
        httpd.shutdown()
        httpd.server_close()
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
