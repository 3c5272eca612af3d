"""What uvicorn does not bound for `ttrv serve`, bounded here: the time a connection may take to send its headers
and its body, the body's size whatever Content-Length says (or chunked), a client's disconnect noticed; and the
uvicorn server and listening socket `serve` runs the app on."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import h11
import uvicorn
from fastapi import Request
from uvicorn.protocols.http.h11_impl import H11Protocol

from ttrv import log
from ttrv.rollout.api import ServiceLimits
from ttrv.rollout.serving import ServiceError

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

