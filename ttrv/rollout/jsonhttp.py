"""JSON over HTTP between ttrv's own processes: the trainer and `ttrv serve` (a loopback port locally, the run's
Service in a cluster), `ttrv serve` and its vLLM server, the tests and benches and the service.

httpx, with a pool of kept-alive connections per server (one `httpx.Client` per scheme, host and port and process)
and explicit timeouts. Never through a proxy: httpx reads HTTP_PROXY/HTTPS_PROXY/ALL_PROXY from the environment
unless trust_env is False (httpx/_client.py, BaseClient._get_proxy_map: `if self.trust_env` ... get_environment_
proxies()), and a machine with a proxy for the outside world would send 127.0.0.1 and in-cluster names to it.

Pooled connections stay idle for at most KEEPALIVE_SECONDS, less than the 5 s after which `ttrv serve` (uvicorn's
timeout_keep_alive) and vLLM close an idle connection, so a request is rarely sent on a connection the server is
closing; when it is, the caller sees one of TRANSPORT_ERRORS and retries as for any lost connection.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any
from urllib.parse import urlsplit

import httpx

TRANSPORT_ERRORS = (OSError, httpx.TransportError)
"""What a request raises when the other side is not there or went away: a refused, reset or timed-out connection,
or one closed during the answer (httpx.TransportError: ConnectError, ReadTimeout, RemoteProtocolError, ...)."""

KEEPALIVE_SECONDS = 2.0
CONNECT_SECONDS = 10.0

_clients: dict[tuple[int, str, str, int | None], httpx.Client] = {}
_clients_lock = threading.Lock()


def client(max_connections: int = 64) -> httpx.Client:
    """A pooled client that never uses a proxy, with this module's keep-alive; the caller closes it."""
    return httpx.Client(trust_env=False, timeout=timeout(60.0),
                        limits=httpx.Limits(max_connections=max_connections,
                                            max_keepalive_connections=max_connections,
                                            keepalive_expiry=KEEPALIVE_SECONDS))


def timeout(seconds: float) -> httpx.Timeout:
    """Every phase of a request bounded: connecting within CONNECT_SECONDS (or `seconds`, when less), and each of
    sending, waiting for a pooled connection and each read of the answer within `seconds`."""
    return httpx.Timeout(seconds, connect=min(seconds, CONNECT_SECONDS))


def _shared(url: str) -> httpx.Client:
    parts = urlsplit(url)
    # per process: a pool's sockets must not be shared with a forked child
    key = (os.getpid(), parts.scheme, parts.hostname or "", parts.port)
    with _clients_lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = client()
        return found


def send(http: httpx.Client, url: str, method: str, path: str, body: Any = None,
         seconds: float = 60.0) -> tuple[int, bytes]:
    """(status, raw answer) of `method` `url`+`path` on `http`, with `body` sent as JSON when there is one; raises
    one of TRANSPORT_ERRORS when no answer came."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    response = http.request(method, url.rstrip("/") + path, content=data, headers=headers, timeout=timeout(seconds))
    return response.status_code, response.content


def request(url: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """`send` on this process's shared pool for the server at `url`."""
    return send(_shared(url), url, method, path, body, timeout)


def request_json(url: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    """(status, decoded JSON answer, {} for an empty one); ValueError when the answer is not JSON (cut short)."""
    status, payload = request(url, method, path, body, timeout)
    return status, json.loads(payload) if payload else {}


def healthy(url: str, timeout: float = 5.0) -> bool:
    """Whether GET /health answers 200."""
    try:
        return request(url, "GET", "/health", timeout=timeout)[0] == 200
    except TRANSPORT_ERRORS:
        return False
