"""Writing local files so that a reader or a crash never sees half of one, and JSON that every reader accepts."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def finite(value: Any, path: str = "") -> tuple[Any, list[str]]:
    """`value` with every NaN or infinite float (at any depth) replaced by None, and the paths (`a.b[2]`) of
    those replaced."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [path or "."]
    if isinstance(value, dict):
        pairs = [(key, finite(item, f"{path}.{key}" if path else str(key))) for key, item in value.items()]
        return {key: item for key, (item, _) in pairs}, [name for _, (_, names) in pairs for name in names]
    if isinstance(value, (list, tuple)):
        items = [finite(item, f"{path}[{i}]") for i, item in enumerate(value)]
        return [item for item, _ in items], [name for _, names in items for name in names]
    return value, []


def strict_json(value: Any, *, where: str | None = None, note: str | None = None, **dumps: Any) -> str:
    """`json.dumps(value, **dumps)` that is strict JSON (RFC 8259 has no NaN or Infinity: Python's `json.dumps`
    writes them by default, and jq, Go, JavaScript's JSON.parse and `json.loads(parse_constant=...)` refuse the
    document). A non-finite float becomes null instead of ending the run that writes it; `where` (the file) logs
    which fields were nulled, `note` (a key) records them in the document itself (a log line cannot log)."""
    try:
        return json.dumps(value, allow_nan=False, **dumps)
    except ValueError:
        pass  # a NaN or infinity somewhere (a circular reference raises ValueError again below)
    clean, replaced = finite(value)
    if note is not None and isinstance(clean, dict):
        clean[note] = replaced
    if where is not None:
        # structlog's own logger, configured by ttrv.log: ttrv.log renders its lines with this function, so an
        # import of ttrv.log here would make the two modules need each other
        import structlog

        structlog.get_logger(__name__).warning("non_finite_written_as_null", file=where, fields=replaced,
                                         action="a metric was NaN or infinite; look for the step that produced it")
    return json.dumps(clean, allow_nan=False, **dumps)


def atomic_write(path: Path, data: bytes) -> None:
    """Replaces `path` with `data` all at once: written to a temporary sibling, fsynced, renamed over `path`; a
    crash leaves the old content or the new, and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
