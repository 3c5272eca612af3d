"""JSON over HTTP between ttrv's own processes: the trainer and `ttrv serve` (a loopback port locally, the run's
Service in a cluster), `ttrv serve` and its vLLM server, the tests and benches and the service. One request, one
connection.

http.client, not urllib.request: urllib sends every request through the proxy that HTTP_PROXY/HTTPS_PROXY name,
loopback included, unless NO_PROXY lists the host (CPython 3.11 Lib/urllib/request.py: ProxyHandler.__init__ takes
getproxies(), the environment's, and proxy_bypass_environment answers "don't bypass, if no_proxy isn't specified"),
so a machine with a proxy for the outside world would send 127.0.0.1 and in-cluster names to it. http.client reads
no proxy from the environment (Lib/http/client.py uses one only when set_tunnel is called).
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

TRANSPORT_ERRORS = (OSError, http.client.HTTPException)
"""What a request raises when the other side is not there or went away: a refused, reset or timed-out connection
(OSError), a connection closed before or during the answer (http.client.HTTPException)."""


def request(url: str, method: str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, bytes]:
    """(status, raw answer) of `method` `url`+`path`, with `body` sent as JSON when there is one; raises one of
    TRANSPORT_ERRORS when no answer came."""
    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        connection.request(method, parts.path.rstrip("/") + path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


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
