"""Keys, prefixes and URIs a caller of the store API can get wrong, on a local directory and on the real S3 server:
every operation refuses them with a StoreConfigError naming the argument and the fix, before anything reaches the
disk or the server, so nothing is written anywhere (inside the store or, through '..', beside it)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bad_inputs.catalogue import CREDENTIAL, Case, cases, check, files_under, s3_objects
from ttrv.store import StoreConfigError, open_store

LEAVES = "keys cannot leave their prefix"
KEYS = cases("store key", [
    ("parent-step", "../escape", ("'../escape'",), LEAVES),
    ("parent-steps-inside", "runs/../../escape", ("'runs/../../escape'",), LEAVES),
    ("dot-segment", "a/./b", ("'a/./b'",), LEAVES),
    ("leading-dot", "./a", ("'./a'",), LEAVES),
    ("empty-segment", "a//b", ("'a//b'",), LEAVES),
    ("absolute", "/etc/passwd", ("'/etc/passwd'",), "drop the leading '/'"),
    ("empty", "", ("empty",), "name the object"),
    ("backslash", "..\\escape", ("backslash",), "use '/' between parts"),
    ("nul", "a\x00b", ("NUL",), "use '/' between parts"),
])


def operations(store, key: str):
    """(the argument the message must name, the call) for every store operation that takes a key or a prefix."""
    return [
        ("key", lambda: store.put_json(key, {"step": 1})),
        ("key", lambda: store.get_json(key)),
        ("prefix", lambda: store.publish_set(key, {"f": b"x"})),
        ("files[", lambda: store.publish_set("ok", {key: b"x"})),
        ("prefix", lambda: store.read_set(key)),
        ("prefix", lambda: store.delete_set(key)),
        ("extra_files[", lambda: store.publish_weights(1, {"w": torch.ones(1)}, kind="full", base_model="m",
                                                        dtype="float32", extra_files={key: b"x"})),
    ]


def refused(call) -> tuple[int, str]:
    try:
        call()
    except StoreConfigError as error:
        return 1, str(error)
    return 0, ""


@pytest.fixture
def world(request, tmp_path):
    """What a refused call must leave unchanged: every file beside the store root, and every object on the S3
    server (the store fixture's `file` param writes below tmp_path/store, its `s3` param to the server)."""
    if request.node.callspec.params["store"] == "s3":
        server = request.getfixturevalue("s3_env")
        return lambda: s3_objects(server)
    return lambda: files_under(tmp_path)


@pytest.mark.parametrize("case", KEYS)
def test_every_operation_refuses_the_key(case: Case, store, world):
    before = world()
    for field, call in operations(store, case.input):
        check(replace(case, names=(*case.names, field)), *refused(call))
    assert sorted(set(world()) - set(before)) == [], "a refused call wrote something"


URIS = cases("store URI", [
    ("s3-without-bucket", ("s3:///prefix", None), ("storage.uri", "'s3:///prefix'"), "write s3://bucket/prefix"),
    ("parent-step-in-s3-prefix", ("s3://bucket/team-a/../team-b", None), ("storage.uri prefix",), LEAVES),
    ("bad-bucket-name", ("s3://Not_A_Bucket/x", None), ("storage.uri", "'s3://Not_A_Bucket/x'"),
     "bucket names are 3-63 lowercase letters"),
    ("credential-in-uri", (f"s3://key:{CREDENTIAL}@bucket/x", None), ("storage.uri",),
     "remove them and set AWS_ACCESS_KEY_ID"),
    ("credential-in-endpoint", ("s3://bucket/x", f"http://key:{CREDENTIAL}@127.0.0.1:1"), ("storage.endpoint",),
     "remove them and set AWS_ACCESS_KEY_ID"),
    ("endpoint-not-http", ("s3://bucket/x", "ftp://127.0.0.1:1"), ("storage.endpoint", "'ftp://127.0.0.1:1'"),
     "is not http(s)://host[:port] or host:port"),
    ("parent-step-in-file-uri", ("file://{tmp}/runs/../../etc", None), ("storage.uri",),
     "needs a directory without '..' steps"),
    ("file-without-path", ("file://", None), ("storage.uri", "'file://'"), "e.g. file:///data/store"),
    ("nul-in-uri", ("file:///tmp/store\x00x", None), ("storage.uri", "'\\x00'"), "write the URI without it"),
    ("endpoint-bad-port", ("s3://bucket/x", "127.0.0.1:0"), ("storage.endpoint", "port '0'"),
     "is not a number from 1 to 65535"),
    ("unknown-scheme", ("gs://bucket/x", None), ("storage.uri", "'gs://bucket/x'"),
     "use file:///abs/path, file://rel/path or s3://bucket/prefix"),
    ("no-scheme", ("runs/store", None), ("storage.uri", "'runs/store'"), "use file:///abs/path"),
    ("not-a-string", (None, None), ("storage.uri",), "expected a string"),
])


@pytest.mark.parametrize("case", URIS)
def test_open_store_refuses_the_uri(case: Case, tmp_path: Path, monkeypatch):
    """Nothing is created: no directory, no connection (the endpoint is a closed port)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.chdir(tmp_path)
    uri, endpoint = case.input
    uri = uri.format(tmp=tmp_path) if uri else uri
    code, message = refused(lambda: open_store(uri, endpoint or "http://127.0.0.1:1"))
    check(case, code, message, [name for name in files_under(tmp_path) if name != tmp_path.name])


ENDPOINT_VARIABLE = cases("AWS_ENDPOINT_URL", [
    ("credential-in-userinfo", f"http://key:{CREDENTIAL}@127.0.0.1:1", ("AWS_ENDPOINT_URL",),
     "remove them and set AWS_ACCESS_KEY_ID"),
    # An AWS secret key may hold a '/', which ends a URL's authority early: the rest must not pass as a path.
    ("credential-with-slash", f"http://key:{CREDENTIAL[:8]}/{CREDENTIAL[8:]}@127.0.0.1:1", ("AWS_ENDPOINT_URL",),
     "remove them and set AWS_ACCESS_KEY_ID"),
    ("not-http", "ftp://127.0.0.1:1", ("AWS_ENDPOINT_URL", "'ftp://127.0.0.1:1'"),
     "is not http(s)://host[:port] or host:port"),
    ("port-out-of-range", "http://127.0.0.1:70000", ("AWS_ENDPOINT_URL", "port '70000'"),
     "is not a number from 1 to 65535"),
    ("odd-character", "http://127.0.0.1:9000%", ("AWS_ENDPOINT_URL", "port '9000%'"),
     "write http(s)://host[:port] or host:port"),
])


@pytest.mark.parametrize("case", ENDPOINT_VARIABLE)
def test_open_store_refuses_the_endpoint_from_the_environment(case: Case, tmp_path: Path, monkeypatch):
    """Without storage.endpoint the endpoint comes from AWS_ENDPOINT_URL: it is checked as strictly, and the
    message names the variable (the spec never held the value)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", case.input)
    monkeypatch.chdir(tmp_path)
    check(case, *refused(lambda: open_store("s3://bucket/x", retry_seconds=1)), files_under(tmp_path / "bucket"))
