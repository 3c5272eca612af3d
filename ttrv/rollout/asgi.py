"""What uvicorn does not bound for `ttrv serve`, bounded here: the time a connection may take to send its headers
and its body, the body's size whatever Content-Length says (or chunked), a client's disconnect noticed; the
uvicorn server and listening socket `serve` runs the app on; and GET /metrics (`add_metrics_route`)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.request

import h11
import uvicorn
from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from uvicorn.protocols.http.h11_impl import H11Protocol

from ttrv import log
from ttrv.rollout.api import ServiceLimits
from ttrv.rollout.serving import ServiceError, VLLMServingEngine

logger = log.get_logger(__name__)


class BodyRefused(Exception):
    def __init__(self, error: ServiceError):
        super().__init__(error.message)
        self.error = error



async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def read_body(request: Request, limits: ServiceLimits) -> bytes:
    """The request's body, refused (413) as soon as it is over the limit, whatever its Content-Length says or
    without one (chunked), and refused (408) when it does not arrive within limits.body_seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        # h11 already refuses a Content-Length that is not a decimal number (h11/_readers.py, via
        # _headers.normalize_and_validate); another server protocol might not
        if not declared.isdigit():
            raise BodyRefused(ServiceError(400, f"Content-Length: {declared!r} is not a byte count"))
        if int(declared) > limits.max_body_bytes:
            raise BodyRefused(_too_large(limits))
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise BodyRefused(_too_large(limits))
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_seconds)
    except asyncio.TimeoutError:
        raise BodyRefused(ServiceError(408, f"the body did not arrive within {limits.body_seconds:g} s "
                                             "(a Content-Length larger than the body sent?)")) from None
    return b"".join(chunks)


def _too_large(limits: ServiceLimits) -> ServiceError:
    return ServiceError(413, f"the request is over {limits.max_body_bytes >> 20} MiB; send smaller images")


class BodyGuard:
    """ASGI middleware: an answer sent before its request's body was read whole closes the connection, so that
    uvicorn does not go on reading (and dropping) a body of any length (uvicorn/protocols/http/h11_impl.py,
    handle_events: Data after our response are skipped, not refused). h11 closes the connection after an answer
    that says `Connection: close` (h11/_connection.py, _keep_alive)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"read": not _expects_body(scope)}

        async def watched_receive():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["read"] = True
            return message

        async def guarded_send(message):
            if message["type"] == "http.response.start" and not state["read"]:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, watched_receive, guarded_send)


def _expects_body(scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers: uvicorn times out only the idle wait after
    an answer (timeout_keep_alive, armed in on_response_complete and dropped at the first byte received), so a
    connection that sends nothing, or half a request line, would be held for ever (uvicorn/protocols/http/
    h11_impl.py). Malformed headers are answered 400 by uvicorn itself (handle_events, send_400_response)."""

    header_seconds = 30.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_seconds, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
            self._header_deadline = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are in: its body has a deadline of its own
            self._cancel_header_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            logger.info("http_connection_dropped", reason=f"no request within {self.header_seconds:g} s")
            self.transport.close()


def uvicorn_server(app, limits: ServiceLimits) -> uvicorn.Server:
    """uvicorn set up as vLLM sets it up (vllm/entrypoints/launchers/launcher.py, serve_http; timeout_keep_alive
    from api_server/entry.py), with the h11 protocol and the limits of `limits`; no signal handlers of its own
    (it runs beside the thread that handles them, as vLLM's NoSignalServer does)."""
    protocol = type("Protocol", (_Protocol,), {"header_seconds": limits.header_seconds})
    config = uvicorn.Config(BodyGuard(app), http=protocol, lifespan="off", log_config=None, access_log=False,
                            timeout_keep_alive=max(1, round(limits.keep_alive_seconds)),
                            limit_concurrency=limits.max_connections,
                            timeout_graceful_shutdown=max(1, round(limits.shutdown_seconds)),
                            h11_max_incomplete_event_size=64 * 1024, backlog=2048)
    return uvicorn.Server(config)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the engine starts, as vLLM binds its port before the engine is set up
    (launcher.py, setup_server): a port in use fails at once, in this thread."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class HTTPThread:
    """uvicorn serving `app` on `sock` in a thread of its own (its own event loop); `stop` is the graceful shutdown
    SIGTERM asks for: no new connections, the requests in flight answered (up to limits.shutdown_seconds)."""

    def __init__(self, app, sock: socket.socket, limits: ServiceLimits):
        self.server = uvicorn_server(app, limits)
        self.sock = sock
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="ttrv-http",
                                       daemon=True)

    def start(self, timeout: float = 30.0) -> HTTPThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def stop(self, timeout: float | None = None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()



# ----------------------------------------------------------------------------------------------------- /metrics
# `ttrv serve`'s Prometheus metrics: its own (ttrv_rollout_*), and, when vLLM is the engine, vLLM's own from the
# vLLM server's /metrics on its loopback port (vllm/entrypoints/serve/instrumentator/metrics.py, attach_router:
# prometheus_client's exposition of vLLM's registry, mounted on every vLLM OpenAI server), appended as they come:
# one scrape of the rollout Service gets both. The families' names cannot clash (vLLM's are vllm:*).
VLLM_METRICS_SECONDS = 5.0
METRICS_PATH = "/metrics"


class PrometheusResponse(Response):
    """Prometheus' text format, as its media type (so the OpenAPI description says so too): version 0.0.4, which
    every Prometheus reads and generate_latest writes for names that need no escaping (ttrv_*, vllm:*); newer
    prometheus_client releases label the same text 1.0.0."""

    media_type = "text/plain; version=0.0.4; charset=utf-8"


class _ServiceCollector:
    """What the service knows at scrape time, read when Prometheus asks (nothing to keep up to date)."""

    def __init__(self, service, engine_metrics: dict):
        self.service = service
        self.engine_metrics = engine_metrics

    def collect(self):
        service = self.service
        status, _ = service.health()
        yield GaugeMetricFamily("ttrv_rollout_up", "1 when the service answers (GET /health is 200), else 0",
                                value=1 if status == 200 else 0)
        versions = GaugeMetricFamily("ttrv_rollout_weight_version", "The weight version served (-1: the base model)",
                                     labels=list(service.version_labels))
        for labels, version in service.served_versions().items():
            versions.add_metric(list(labels), -1 if version is None else version)
        yield versions
        yield GaugeMetricFamily("ttrv_rollout_chat_requests_in_flight", "Chat requests held now",
                                value=service.in_flight)
        yield GaugeMetricFamily("ttrv_rollout_refused_versions", "Weight versions refused (GET /weight_version "
                                "says why)", value=service.refused_count())
        info = GaugeMetricFamily("ttrv_rollout_engine", "The serving engine (value 1)", labels=["engine"])
        info.add_metric([service.engine.name], 1)
        yield info
        if "url" in self.engine_metrics:
            yield GaugeMetricFamily("ttrv_rollout_engine_metrics_up", "1 when the engine's own /metrics answered "
                                    "the last scrape, else 0", value=self.engine_metrics.get("up", 0))


class _RequestMetrics:
    """ASGI middleware: each answer counted by route and status, and timed by route. Paths that are no route count
    as "other", so a client cannot grow the label set."""

    def __init__(self, app, counter, seconds, routes: frozenset[str]):
        self.app, self.counter, self.seconds, self.routes = app, counter, seconds, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.routes else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted_send)
        finally:
            self.counter.labels(path, str(status["code"])).inc()
            self.seconds.labels(path).observe(time.perf_counter() - started)


def engine_metrics_url(engine) -> str | None:
    """The engine's own Prometheus endpoint: vLLM's server's /metrics; None for the Hugging Face engine."""
    return f"{engine.server.url}/metrics" if isinstance(engine, VLLMServingEngine) else None


def _fetch(url: str) -> bytes:
    # The vLLM server is on 127.0.0.1: no proxy, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=VLLM_METRICS_SECONDS) as answer:
        return answer.read()


def add_metrics_route(app, service) -> None:
    """GET /metrics on `app` (Prometheus text format 0.0.4), and the request metrics it reports. Called last when
    the app is built: requests to paths that are not routes by then count as "other"."""
    registry = CollectorRegistry()
    engine_metrics: dict = {}
    url = engine_metrics_url(service.engine)
    if url is not None:
        engine_metrics["url"] = url
    registry.register(_ServiceCollector(service, engine_metrics))
    counter = Counter("ttrv_rollout_requests", "HTTP requests answered, by route and status code",
                      ["path", "code"], registry=registry)
    seconds = Histogram("ttrv_rollout_request_duration_seconds", "Time to answer an HTTP request, by route",
                        ["path"], registry=registry,
                        buckets=(0.005, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 60.0, 300.0))

    @app.get(METRICS_PATH, summary="Prometheus metrics: the service's own, and vLLM's when vLLM serves",
             response_class=PrometheusResponse)
    async def metrics() -> PrometheusResponse:
        body = b""
        if url is not None:
            try:
                body = await asyncio.get_running_loop().run_in_executor(None, _fetch, url)
                engine_metrics["up"] = 1
            except (OSError, ValueError) as error:  # urllib's URLError and HTTPError are OSErrors
                engine_metrics["up"] = 0
                logger.warning("engine_metrics_unavailable", url=url, error=str(error))
        return PrometheusResponse(generate_latest(registry) + body)

    routes = frozenset(route.path for route in app.routes if hasattr(route, "path"))
    app.add_middleware(_RequestMetrics, counter=counter, seconds=seconds, routes=routes | {METRICS_PATH})
