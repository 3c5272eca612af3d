"""`ttrv serve`'s app in this process on a real uvicorn socket, with the real Hugging Face engine on the bundled tiny
model and a real sync agent on a file:// store: what the hostile-request tests and the fuzzing talk to. Small limits,
so that a timeout or a full service is reached in a second."""

from __future__ import annotations

import base64
import io
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ttrv.rollout.api import ServiceLimits
from ttrv.rollout.asgi import HTTPThread, listening_socket
from ttrv.rollout.service import RolloutService, build_app
from ttrv.rollout.serving import HFServingEngine
from ttrv.rollout.sync import SyncAgent
from ttrv.spec import RunSpec
from ttrv.store import open_store
from ttrv.weights import resolve_model

LIMITS = ServiceLimits(max_body_bytes=1 << 20, max_n=8, max_tokens=16, max_image_pixels=128 * 128, max_in_flight=4,
                       header_seconds=1.5, body_seconds=1.5, keep_alive_seconds=1, shutdown_seconds=2)


@dataclass
class Served:
    url: str
    port: int
    service: RolloutService
    engine: HFServingEngine
    work: Path

    def images(self) -> list[str]:
        """The request image files on disk now (each request's own; none must outlive its request)."""
        return sorted(path.name for path in (self.work / "images").iterdir())


@contextmanager
def served_in_process(work: Path, limits: ServiceLimits = LIMITS) -> Iterator[Served]:
    spec = RunSpec.model_validate({"name": "hostile", "data": {"path": "ttrv://tiny-shapes/test"},
                                   "model": {"path": "ttrv://tiny-qwen2vl"},
                                   "rollout": {"engine": "hf", "maxNewTokens": 8},
                                   "storage": {"uri": f"file://{work}/store"}})
    (work / "images").mkdir()
    engine = HFServingEngine(spec, resolve_model(spec.model.path), work / "images", limits.max_image_pixels)
    store = open_store(spec.storage.uri)
    agent = SyncAgent(store, engine.load, work / "weights")
    service = RolloutService(spec, engine, agent, limits, work)
    http = HTTPThread(build_app(service), listening_socket("127.0.0.1", 0), limits).start()
    try:
        engine.start()
        service.started = True
        agent.start()
        assert agent.synced.wait(60), agent.last_error
        yield Served(f"http://127.0.0.1:{http.port}", http.port, service, engine, work)
    finally:
        http.stop(10)
        agent.stop()
        engine.close()
        store.close()


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def chat_body(image: bytes | None = None, **fields) -> dict:
    """A request as the trainer sends it (one user turn, its image inline), with `fields` over it."""
    content = [{"type": "text", "text": "What is shown? Options:\nA. cat\nB. dog"}]
    if image is not None:
        url = f"data:image/png;base64,{base64.b64encode(image).decode()}"
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    body = {"model": "hostile", "messages": [{"role": "user", "content": content}], "n": 2, "temperature": 1.0,
            "top_p": 1.0, "max_tokens": 4, "logprobs": True, "return_token_ids": True}
    return {**body, **fields}


class Raw:
    """A raw TCP connection to the service, to send what no HTTP client would."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> Raw:
        self.sock.sendall(data)
        return self

    def answer(self) -> tuple[int | None, dict[str, str], bytes]:
        """(status, headers, body) of the next answer; status None when the server closed without one."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None, {}, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body

    def closed_within(self, seconds: float) -> float | None:
        """Seconds until the server closed the connection (None: still open after `seconds`)."""
        started = time.monotonic()
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return None
        except ConnectionResetError:
            pass
        return time.monotonic() - started

    def close(self) -> None:
        self.sock.close()


def request_bytes(body: bytes | dict, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None,
                  length: str | None = None) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"POST {path} HTTP/1.1", "Host: test", "Content-Type: application/json",
             f"Content-Length: {len(data) if length is None else length}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data
