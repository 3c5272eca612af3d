"""The s3:// backend: an S3 bucket through the minio client, every call retried with exponential backoff and jitter
up to a time budget (then `StoreUnavailableError`); credential errors fail at once (`StoreAuthError`)."""

from __future__ import annotations

import errno
import http.client
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError

from ttrv import log
from ttrv.store.backend import Backend, MiB, Missing, Range, SizeMismatch, Source, wait_all
from ttrv.store.errors import StoreAuthError, StoreConfigError, StoreError, StoreUnavailableError
from ttrv.store.keys import join_key

logger = log.get_logger(__name__)

DEFAULT_PART_SIZE = 16 * MiB
DEFAULT_RETRY_SECONDS = float(os.environ.get("TTRV_STORE_RETRY_SECONDS", 90.0))
_S3_MAX_PARTS = 10_000
S3_MIN_PART = 5 * MiB
_READ_CHUNK = 1 * MiB
_AUTH_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "InvalidSecurity", "AuthorizationHeaderMalformed", "MissingSecurityHeader",
})
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "OperationAborted",
    "XMinioServerNotInitialized",
})
_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                               errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


class _UploadLost(Exception):
    """The server no longer knows a multipart upload (it restarted without it): upload the object again."""


class S3Backend(Backend):
    """An S3 bucket through the minio client. Multipart uploads use the client's part-level calls so that each
    part is a zero-copy slice of the source buffer and is retried on its own."""

    def __init__(self, client: Minio, endpoint: str, bucket: str, root: str, url: str, part_size: int,
                 retry_seconds: float, credential_source: str):
        self.client, self.endpoint, self.bucket, self.root, self.url = client, endpoint, bucket, root, url
        self.part_size, self.retry_seconds = part_size, retry_seconds
        self.credential_source = credential_source

    def _key(self, key: str) -> str:
        return join_key(self.root, key)

    def _classify(self, error: BaseException, action: str, key: str) -> StoreError | None:
        """The error to raise now, or None when `error` is transient and worth retrying."""
        where = f"{self.url}: cannot {action} {key!r}"
        if isinstance(error, S3Error):
            if error.code in _AUTH_CODES:
                return StoreAuthError(
                    f"{where}: the object store refused the credentials ({error.code}); check AWS_ACCESS_KEY_ID / "
                    f"AWS_SECRET_ACCESS_KEY of {self.credential_source} and that they may read and write bucket "
                    f"{self.bucket!r}"
                )
            if error.code in _TRANSIENT_CODES:
                return None
            return StoreError(f"{where}: {error.code}: {error.message}")
        if isinstance(error, ServerError):
            return None if error.status_code >= 500 else StoreError(f"{where}: HTTP {error.status_code}")
        if isinstance(error, InvalidResponseError):
            # Non-XML answers come from proxies and load balancers; their 5xx are as transient as the server's.
            return None if getattr(error, "_code", 0) >= 500 else StoreError(f"{where}: {error}")
        reason = getattr(error, "reason", None)
        if isinstance(error, urllib3.exceptions.SSLError) or isinstance(reason, urllib3.exceptions.SSLError):
            return StoreConfigError(
                f"{where}: TLS failed ({reason or error}); for a plain-HTTP endpoint write http://host:port, "
                "for a private CA set SSL_CERT_FILE"
            )
        if isinstance(error, (urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError,
                              TimeoutError)):
            return None
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return None
        return StoreError(f"{where}: {type(error).__name__}: {error}")

    def _retry(self, action: str, key: str, call: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.2
        attempt = 0
        while True:
            try:
                return call()
            except (Missing, SizeMismatch, _UploadLost, StoreError):
                raise
            except Exception as error:
                fatal = self._classify(error, action, key)
                if fatal is not None:
                    raise fatal from None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StoreUnavailableError(
                        f"{self.url}: cannot {action} {key!r}: the object store at {self.endpoint} did not "
                        f"answer for {self.retry_seconds:g} s ({type(error).__name__}: {error}); check "
                        "storage.endpoint / AWS_ENDPOINT_URL and that the server is up"
                    ) from None
                attempt += 1
                pause = min(random.uniform(delay / 2, delay), left)
                logger.warning("store_retry", action=action, key=key, attempt=attempt, pause_s=round(pause, 2),
                               error=f"{type(error).__name__}: {str(error)[:200]}")
                time.sleep(pause)
                delay = min(delay * 2, 2.0)

    def ensure_bucket(self) -> None:
        """Creates the bucket when missing. Probes with a GET (ListObjects), not a HEAD: a HEAD answer has no
        body, so a wrong secret would be reported as a bare AccessDenied instead of SignatureDoesNotMatch."""

        def create() -> None:
            try:
                next(iter(self.client.list_objects(self.bucket, prefix=self.root or None)), None)
                return
            except S3Error as error:
                if error.code != "NoSuchBucket":
                    raise
            try:
                self.client.make_bucket(self.bucket)
                logger.info("bucket_created", store=self.url)
            except S3Error as error:
                if error.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._retry("open bucket of", "", create)

    def put(self, key: str, data: bytes) -> None:
        self._retry("write", key, lambda: self.client._put_object(
            self.bucket, self._key(key), data, {"Content-Type": "application/octet-stream"}))

    def get(self, key: str) -> bytes | None:
        def call() -> bytes | None:
            try:
                response = self.client.get_object(self.bucket, self._key(key))
            except S3Error as error:
                if error.code in ("NoSuchKey", "NoSuchObject"):
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._retry("read", key, call)

    def upload(self, key: str, source: Source, pool: ThreadPoolExecutor) -> Callable[[], None]:
        if source.size <= self.part_size:
            future = pool.submit(
                self._retry, "write", key,
                lambda: self.client._put_object(self.bucket, self._key(key), source.chunk(0, source.size),
                                                {"Content-Type": "application/octet-stream"}))
            return future.result
        part_size = max(self.part_size, -(-source.size // _S3_MAX_PARTS))
        state = {"id": None, "futures": []}

        def start() -> None:
            state["id"] = self._retry("start upload of", key, lambda: self.client._create_multipart_upload(
                self.bucket, self._key(key), {"Content-Type": "application/octet-stream"}))
            state["futures"] = [
                pool.submit(self._upload_part, key, state["id"], number, source, offset,
                            min(part_size, source.size - offset))
                for number, offset in enumerate(range(0, source.size, part_size), start=1)
            ]

        def complete(parts: list[Part]) -> None:
            try:
                self.client._complete_multipart_upload(self.bucket, self._key(key), state["id"], parts)
            except S3Error as error:
                if error.code == "NoSuchUpload":
                    raise _UploadLost(key) from None
                raise

        def finish() -> None:
            for _attempt in range(3):
                try:
                    wait_all(state["futures"])
                    parts = [Part(number, future.result()) for number, future in enumerate(state["futures"], 1)]
                    self._retry("finish upload of", key, lambda parts=parts: complete(parts))
                    return
                except _UploadLost:
                    # The server forgot the upload (e.g. it restarted without it): start over with a new one.
                    logger.warning("multipart_upload_lost", key=key, action="uploading the object again")
                    start()
                except BaseException:
                    self._abort(key, state["id"])
                    raise
            raise StoreUnavailableError(f"{self.url}: cannot write {key!r}: the server kept losing the upload")

        start()
        return finish

    def _upload_part(self, key: str, upload_id: str, number: int, source: Source, offset: int, length: int) -> str:
        def call() -> str:
            try:
                return self.client._upload_part(self.bucket, self._key(key), source.chunk(offset, length), None,
                                                upload_id, number)
            except S3Error as error:
                if error.code == "NoSuchUpload":
                    raise _UploadLost(key) from None
                raise

        return self._retry("write", key, call)

    def _abort(self, key: str, upload_id: str | None) -> None:
        if upload_id is None:
            return
        try:
            self.client._abort_multipart_upload(self.bucket, self._key(key), upload_id)
        except Exception as error:  # the upload is garbage either way; the server expires it
            logger.info("upload_abort_failed", key=key, error=type(error).__name__)

    def _get_range(self, key: str, size: int, offset: int, length: int, write: Callable[[int, bytes], None],
                   ranged: bool) -> None:
        def call() -> None:
            try:
                response = self.client.get_object(self.bucket, self._key(key), offset=offset,
                                                  length=length if ranged else 0)
            except S3Error as error:
                if error.code in ("NoSuchKey", "NoSuchObject"):
                    raise Missing(key) from None
                if error.code == "InvalidRange":
                    raise SizeMismatch(key, None) from None
                raise
            try:
                if ranged and response.status != 206:
                    raise StoreError(f"{self.url}: the server ignored a Range request for {key!r}; it is not an "
                                     "S3-compatible endpoint")
                total = _object_size(response.headers)
                if total != size:
                    raise SizeMismatch(key, total)
                position = offset
                for block in response.stream(_READ_CHUNK):
                    write(position, block)
                    position += len(block)
                if position != offset + length:
                    raise http.client.IncompleteRead(b"", offset + length - position)
            finally:
                response.close()
                response.release_conn()

        self._retry("read", key, call)

    def _ranges(self, size: int) -> list[tuple[int, int]]:
        return [(offset, min(self.part_size, size - offset)) for offset in range(0, size, self.part_size)] or [(0, 0)]

    def download(self, key: str, size: int, out: memoryview, pool: ThreadPoolExecutor) -> list[Range]:
        def write(position: int, block: bytes) -> None:
            out[position:position + len(block)] = block

        ranges = self._ranges(size)
        return [(pool.submit(self._get_range, key, size, offset, length, write, len(ranges) > 1), offset, length)
                for offset, length in ranges]

    def fetch_file(self, key: str, size: int, path: Path, pool: ThreadPoolExecutor) -> list[Range]:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.ftruncate(descriptor, size)

        def write(position: int, block: bytes) -> None:
            os.pwrite(descriptor, block, position)

        ranges = self._ranges(size)
        transfers = [(pool.submit(self._get_range, key, size, offset, length, write, len(ranges) > 1), offset,
                      length) for offset, length in ranges]
        remaining = [len(transfers)]
        lock = threading.Lock()

        def close_when_done(_future: Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    os.close(descriptor)

        for future, _, _ in transfers:
            future.add_done_callback(close_when_done)
        return transfers

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix)
        strip = len(self.root) + 1 if self.root else 0

        def call() -> list[str]:
            objects = self.client.list_objects(self.bucket, prefix=f"{base}/" if base else None, recursive=True)
            return [obj.object_name[strip:] for obj in objects if not obj.is_dir]

        return self._retry("list", prefix or "/", call)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [DeleteObject(self._key(key)) for key in keys[start:start + 1000]]

            def call(batch=batch) -> None:
                errors = list(self.client.remove_objects(self.bucket, batch))
                if errors:
                    raise StoreError(f"{self.url}: cannot delete {errors[0].name!r}: {errors[0].code}: "
                                     f"{errors[0].message}")

            self._retry("delete", keys[start], call)


def _object_size(headers) -> int | None:
    content_range = headers.get("Content-Range")
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = headers.get("Content-Length")
    return int(length) if length is not None else None
