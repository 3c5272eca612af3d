"""Structured logs: one JSON event per line on stderr, secrets redacted before anything is rendered."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

import structlog

_SECRET_KEYS = re.compile(r"secret|password|token|credential|access_key|authorization", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MINIO_ROOT_PASSWORD")


def _masked(value: Any, known: list[str]) -> Any:
    """`value` with secret-looking keys and known credentials masked, at any depth. Other objects are masked in
    the repr that the JSON renderer would write for them (an exception's message may hold a credential)."""
    if isinstance(value, dict):
        return {key: "***" if _SECRET_KEYS.search(str(key)) and value[key] not in (None, "") else
                _masked(value[key], known) for key in value}
    if isinstance(value, (list, tuple, set)):
        return [_masked(item, known) for item in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value if isinstance(value, str) else repr(value)
    for secret in known:
        text = text.replace(secret, "***")
    return text


def _redact(_, __, event: dict) -> dict:
    """Masks values of secret-looking keys and any occurrence of a credential held in the environment."""
    known = [os.environ[name] for name in _SECRET_ENV if len(os.environ.get(name, "")) >= 4]
    return _masked(event, known)


def configure(level: str | None = None, stream=None) -> None:
    level_name = (level or os.environ.get("TTRV_LOG_LEVEL", "info")).upper()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str):
    return structlog.get_logger(name)
