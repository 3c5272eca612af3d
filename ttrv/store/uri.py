"""Opening a store from its URI: `file://` opens a directory, `s3://` a bucket (created when missing)."""

from __future__ import annotations

import os
from pathlib import Path

import urllib3
from minio import Minio
from minio.helpers import check_bucket_name

from ttrv.net import control_character, parse_endpoint
from ttrv.store.credentials import refuse_credentials_in, s3_credentials
from ttrv.store.errors import StoreConfigError
from ttrv.store.file_backend import FileBackend
from ttrv.store.keys import check_key, join_key
from ttrv.store.s3_backend import DEFAULT_PART_SIZE, DEFAULT_RETRY_SECONDS, S3_MIN_PART, S3Backend
from ttrv.store.weights import Store


def _endpoint(endpoint: str | None) -> tuple[str, str]:
    """The S3 endpoint to use and the setting it comes from (for messages): `endpoint`, else AWS_ENDPOINT_URL, else
    AWS."""
    if endpoint:
        return endpoint, "storage.endpoint"
    if os.environ.get("AWS_ENDPOINT_URL"):
        return os.environ["AWS_ENDPOINT_URL"], "AWS_ENDPOINT_URL"
    return "https://s3.amazonaws.com", "storage.endpoint"


def _parse_endpoint(endpoint: str, field: str) -> tuple[str, bool]:
    """(host[:port], use TLS): a URL's scheme decides; a bare host:port gets TLS (ttrv.net.parse_endpoint)."""
    try:
        return parse_endpoint(endpoint)
    except ValueError as error:
        raise StoreConfigError(f"{field}: {error}") from None


def open_store(uri: str, endpoint: str | None = None, *, retry_seconds: float = DEFAULT_RETRY_SECONDS,
               workers: int | None = None, part_size: int = DEFAULT_PART_SIZE) -> Store:
    """A store at `file:///abs/dir`, `file://rel/dir` (relative to the working directory) or
    `s3://bucket/prefix`. For S3 the endpoint is `endpoint` or AWS_ENDPOINT_URL (AWS when neither is set; an
    http:// URL means no TLS), credentials come from TTRV_S3_SECRET_DIR or AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, and the bucket is created when missing."""
    if not isinstance(uri, str):
        raise StoreConfigError(f"storage.uri: expected a string, got {type(uri).__name__}")
    if (bad := control_character(uri)) is not None:
        raise StoreConfigError(f"storage.uri: {uri!r} holds the control character {bad}; write the URI without it")
    workers = workers or min(16, 2 * (os.cpu_count() or 2))
    if part_size < S3_MIN_PART:
        raise StoreConfigError(f"part_size: {part_size} is below S3's minimum part of {S3_MIN_PART} bytes")
    scheme, sep, rest = uri.partition("://")
    if sep and scheme == "file":
        if not rest or any(part == ".." for part in rest.split("/")):
            raise StoreConfigError(f"storage.uri: {uri!r} needs a directory without '..' steps, e.g. "
                                   "file:///data/store or file://runs/store")
        root = Path(rest) if rest.startswith("/") else Path.cwd() / rest
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreConfigError(f"storage.uri: cannot create {root} ({error.strerror}); "
                                   "choose a writable directory") from None
        return Store(FileBackend(root, f"file://{root}"), workers)
    if sep and scheme == "s3":
        bucket, _, prefix = rest.partition("/")
        endpoint, endpoint_field = _endpoint(endpoint)
        refuse_credentials_in(bucket, "storage.uri")
        refuse_credentials_in(endpoint, endpoint_field)
        if not bucket:
            raise StoreConfigError(f"storage.uri: {uri!r} names no bucket; write s3://bucket/prefix")
        prefix = prefix.strip("/")
        check_key(prefix, "storage.uri prefix", allow_empty=True)
        host, secure = _parse_endpoint(endpoint, endpoint_field)
        access, secret, token, source = s3_credentials(uri)
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                  or (None if host.endswith("amazonaws.com") else "us-east-1"))
        # No retries inside urllib3: `S3Backend._retry` owns the policy and its time budget. TLS trusts the
        # system store, which OpenSSL extends with SSL_CERT_FILE / SSL_CERT_DIR (for a private CA).
        http = urllib3.PoolManager(num_pools=4, maxsize=workers + 4, retries=False, cert_reqs="CERT_REQUIRED",
                                   timeout=urllib3.Timeout(connect=5.0, read=60.0))
        client = Minio(host, access_key=access, secret_key=secret, session_token=token, secure=secure,
                       region=region, http_client=http)
        try:
            check_bucket_name(bucket, strict=True, s3_check=host.endswith("amazonaws.com"))
        except ValueError as error:
            raise StoreConfigError(f"storage.uri: {uri!r}: {error}; bucket names are 3-63 lowercase letters, "
                                   "digits, '-' and '.'") from None
        url = f"s3://{join_key(bucket, prefix)}"
        backend = S3Backend(client, f"{'https' if secure else 'http'}://{host}", bucket, prefix, url, part_size,
                            retry_seconds, source)
        backend.ensure_bucket()
        return Store(backend, workers)
    raise StoreConfigError(f"storage.uri: {uri!r} has no known scheme; use file:///abs/path, file://rel/path or "
                           "s3://bucket/prefix")
