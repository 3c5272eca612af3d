"""One bad input = one `Case`: what it is, what the rejection must name, and the words that say how to fix it.

Every case is held to the same contract (`check`): a non-zero exit (or a rejected resource), a message that names
the field or file and says how to fix it, no traceback, no credential repeated, and nothing half-written. The
conftest counts the cases and prints `bad inputs rejected: X/Y`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from minio import Minio

# Stands in for a credential a user pasted where it does not belong; no message may repeat it.
CREDENTIAL = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@dataclass(frozen=True)
class Case:
    kind: str
    """What is bad: run spec, experiment, chart values, data file, store key, model folder, ..."""
    input: Any
    names: tuple[str, ...]
    """What the message must name: the field, the file, the record."""
    fix: str
    """The words of the message that say what to do."""


def cases(kind: str, table: Iterable[tuple[str, Any, tuple[str, ...], str]]) -> list:
    """pytest params, one a row of (id, input, names, fix)."""
    return [pytest.param(Case(kind, value, names, fix), id=name) for name, value, names, fix in table]


def check(case: Case, code: int, message: str, leftovers: Iterable[str] = ()) -> None:
    assert code != 0, f"{case.kind} accepted: {case.input!r}"
    assert message.strip(), "rejected without a message"
    assert "Traceback" not in message, message
    for name in case.names:
        assert name in message, f"the message does not name {name!r}:\n{message}"
    assert case.fix in message, f"the message does not say {case.fix!r}:\n{message}"
    assert CREDENTIAL not in message, f"the message repeats a credential:\n{message}"
    assert list(leftovers) == [], f"left behind: {list(leftovers)}"


def files_under(folder: Path) -> list[str]:
    """Every file and folder below `folder` (and `folder` itself when it exists), relative names."""
    if not folder.exists():
        return []
    return [str(path.relative_to(folder.parent)) for path in [folder, *sorted(folder.rglob("*"))]]


def s3_client(server) -> Minio:
    """A client of the embedded S3 server with its own credentials, to look at what the code under test wrote."""
    return Minio(server.endpoint.removeprefix("http://"), server.access_key, server.secret_key, secure=False)


def s3_objects(server) -> list[str]:
    """Every object on the server, as bucket/key."""
    client = s3_client(server)
    return sorted(f"{bucket.name}/{obj.object_name}" for bucket in client.list_buckets()
                  for obj in client.list_objects(bucket.name, recursive=True))
