"""Structured logs: one JSON event per line on stderr, secrets redacted before anything is rendered."""

from __future__ import annotations

import logging
import os
import re
import sys

import structlog

_SECRET_KEYS = re.compile(r"secret|password|token|credential|access_key|authorization", re.IGNORECASE)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MINIO_ROOT_PASSWORD")


def _redact(_, __, event: dict) -> dict:
    """Masks values of secret-looking keys and any occurrence of a credential held in the environment."""
    known = [os.environ[name] for name in _SECRET_ENV if len(os.environ.get(name, "")) >= 4]
    for key, value in list(event.items()):
        if _SECRET_KEYS.search(key) and value not in (None, ""):
            event[key] = "***"
        elif isinstance(value, str):
            for secret in known:
                value = value.replace(secret, "***")
            event[key] = value
    return event


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
