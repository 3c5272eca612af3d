"""Structured logs: one event per line on stderr, secrets redacted before anything is rendered.

Pods, CI and pipes get JSON, one object per line. A person at a terminal (stderr is a TTY) gets structlog's console
renderer, written through tqdm so that a progress bar is redrawn below the line instead of being broken by it.
TTRV_LOG_FORMAT=json or console overrides the choice."""

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


class _LineLogger:
    """One line per event on `stream`, or, when none was given, on whatever sys.stderr is when the line is written: a
    stream bound at configure time may be closed since (a redirected stderr, a test's capture)."""

    def __init__(self, stream=None):
        self._stream = stream

    def msg(self, message: str) -> None:
        print(message, file=self._stream or sys.stderr, flush=True)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


class _BarSafeLogger(_LineLogger):
    """The line through tqdm.write: it goes above any progress bar on the same stream."""

    def msg(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self._stream or sys.stderr)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def for_people(stream) -> bool:
    """Console rendering for a terminal, JSON for everything else (TTRV_LOG_FORMAT decides when set)."""
    chosen = os.environ.get("TTRV_LOG_FORMAT", "").lower()
    if chosen in ("json", "console"):
        return chosen == "console"
    return _isatty(stream)


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def configure(level: str | None = None, stream=None) -> None:
    level_name = (level or os.environ.get("TTRV_LOG_LEVEL", "info")).upper()
    bound, stream = stream, stream or sys.stderr
    console = for_people(stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S" if console else "iso", utc=not console),
            *([] if console else [structlog.processors.format_exc_info]),
            _redact,
            structlog.dev.ConsoleRenderer(colors=_isatty(stream)) if console else
            structlog.processors.JSONRenderer(_strict_line, sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=(lambda *_: _BarSafeLogger(bound)) if console else (lambda *_: _LineLogger(bound)),
        cache_logger_on_first_use=False,
    )


def _strict_line(event: dict, **dumps: Any) -> str:
    """One log line in strict JSON: a NaN or infinite field is written as null and named in `non_finite`."""
    from ttrv.fsutil import strict_json

    return strict_json(event, note="non_finite", **dumps)


def get_logger(name: str):
    return structlog.get_logger(name)
