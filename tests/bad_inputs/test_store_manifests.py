"""Hostile and inconsistent weight versions, on a local directory and on the real S3 server: a `manifest.json` is
whatever anyone with write access to the store prefix wrote, so every reader (`fetch_weights`, as `ttrv serve`
fetches, `load_weights`, as the trainer loads, `fetch_set`, `read_set`) refuses a manifest whose file names leave
the version or whose metadata disagrees with its files, with a CorruptVersionError naming the version and the fix,
and writes nothing outside its fetch folder (and nothing left inside it)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from bad_inputs.catalogue import Case, cases, check, files_under, s3_client
from ttrv.store import MANIFEST, StoreError
from ttrv.store.keys import join_key

REPUBLISH = "publish it again"
# A file name of the version, as the hostile manifest lists it; {outside} is a folder beside the fetch folder.
NAMES = cases("manifest file name", [
    ("absolute", "{outside}/absolute.safetensors", ("weights/v000001", "absolute"), REPUBLISH),
    ("parent-steps", "../../outside/parent.safetensors", ("weights/v000001", "'..'"), REPUBLISH),
    ("parent-step-inside", "a/../../escape.safetensors", ("weights/v000001", "'..'"), REPUBLISH),
    ("dot-segment", "./model.safetensors", ("weights/v000001", "'.'"), REPUBLISH),
    ("empty-segment", "a//model.safetensors", ("weights/v000001", "empty"), REPUBLISH),
    ("backslash", "..\\..\\escape.safetensors", ("weights/v000001", "backslash"), REPUBLISH),
    ("nul", "model\x00.safetensors", ("weights/v000001", "NUL"), REPUBLISH),
    ("too-long", "a" * 300 + ".safetensors", ("weights/v000001", "too long"), REPUBLISH),
    ("the-manifest-itself", MANIFEST, ("weights/v000001", "manifest's own name"), REPUBLISH),
    ("file-and-folder", ["model.safetensors", "model.safetensors/x"], ("weights/v000001", "as a folder"),
     REPUBLISH),
])

# (what the hostile publisher changes in the manifest's meta, and in its files)
METAS = cases("weight version metadata", [
    ("full-without-shards", ({"shards": []}, {}), ("weights/v000001", "meta.shards", "at least one"), REPUBLISH),
    ("shard-not-held", ({"shards": ["model-00001-of-00002.safetensors"]}, {}),
     ("weights/v000001", "do not hold"), REPUBLISH),
    ("shard-not-safetensors", ({"shards": ["config.json"]}, {"config.json": b"{}"}),
     ("weights/v000001", "not all .safetensors"), REPUBLISH),
    ("step-disagrees", ({"step": 7}, {}), ("weights/v000001", "meta.step is 7"), REPUBLISH),
    ("unknown-kind", ({"kind": "delta"}, {}), ("weights/v000001", "meta.kind is 'delta'"), REPUBLISH),
    ("lora-without-config", ({"kind": "lora", "shards": ["model.safetensors"]}, {}),
     ("weights/v000001", "peft's layout"), REPUBLISH),
    ("sizes-not-numbers", ({}, {"model.safetensors": None}), ("weights/v000001", "size 'many'"), REPUBLISH),
])


@pytest.fixture
def planted(store, request, tmp_path):
    """Writes raw objects into the store, below its prefix, under keys the store API itself refuses (as another
    tool or a hand with write access to the bucket would)."""
    if request.node.callspec.params["store"] == "s3":
        client = s3_client(request.getfixturevalue("s3_env"))
        bucket, _, root = store.url.removeprefix("s3://").partition("/")

        def put(key: str, data: bytes) -> None:
            try:
                client.put_object(bucket, f"{root}/{key}", io.BytesIO(data), len(data))
            except Exception:  # noqa: BLE001 - a key the server itself refuses cannot be planted there
                pass
    else:
        root = tmp_path / "store"

        def put(key: str, data: bytes) -> None:
            # Joined as text, as a naive reader would: '..' and absolute parts act on the real file system.
            path = Path(f"{root}/{key}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            except (OSError, ValueError):
                pass
    return put


def readers(store, fetch: Path):
    return {
        "fetch_weights": lambda: store.fetch_weights(1, fetch),
        "load_weights": lambda: store.load_weights(1),
        "fetch_set": lambda: store.fetch_set("weights/v000001", fetch / "set"),
        "read_set": lambda: store.read_set("weights/v000001"),
    }


def rewrite_manifest(store, planted, files: dict[str, dict | None], meta: dict, file_bytes: bytes) -> None:
    document = json.loads(store.read_manifest("weights/v000001").raw)
    document["meta"] |= meta
    entry = document["files"]["model.safetensors"]
    listed = {}
    for name, data in files.items():
        listed[name] = {"size": "many", "digest": entry["digest"]} if data is None else \
            {"size": len(data or file_bytes), "digest": entry["digest"]}
        planted(join_key("weights/v000001", name), data or file_bytes)
    document["files"] = listed
    planted(join_key("weights/v000001", MANIFEST), json.dumps(document).encode())


def outcomes(store, tmp_path: Path) -> list[tuple[str, int, str, list[str]]]:
    """Each reader run against the planted version: (reader, code, message, what it left outside its folder or
    inside it)."""
    fetch = tmp_path / "fetch"
    fetch.mkdir()
    (tmp_path / "outside").mkdir(exist_ok=True)
    before = [name for name in files_under(tmp_path) if not name.startswith(f"{tmp_path.name}/store")]
    results = []
    for reader, call in readers(store, fetch).items():
        try:
            call()
            code, message = 0, ""
        except StoreError as error:
            code, message = 1, str(error)
        after = [name for name in files_under(tmp_path) if not name.startswith(f"{tmp_path.name}/store")]
        results.append((reader, code, message, sorted(set(after) - set(before))))
    return results


@pytest.mark.parametrize("case", NAMES)
def test_readers_refuse_a_manifest_whose_names_leave_the_version(case: Case, store, planted, tmp_path):
    store.publish_weights(1, {"w": torch.ones(4)}, kind="full", base_model="m", dtype="float32")
    file_bytes = store.read_set("weights/v000001")[1]["model.safetensors"].tobytes()
    outside = tmp_path / "outside"
    names = case.input if isinstance(case.input, list) else [case.input.format(outside=outside)]
    rewrite_manifest(store, planted, {name: b"" for name in names}, {"shards": names}, file_bytes)
    for reader, code, message, left in outcomes(store, tmp_path):
        check(case, code, f"{reader}: {message}", left)


@pytest.mark.parametrize("case", METAS)
def test_readers_refuse_a_version_whose_metadata_disagrees_with_its_files(case: Case, store, planted, tmp_path):
    store.publish_weights(1, {"w": torch.ones(4)}, kind="full", base_model="m", dtype="float32")
    file_bytes = store.read_set("weights/v000001")[1]["model.safetensors"].tobytes()
    meta, extra = case.input
    files = {"model.safetensors": b""} | extra
    rewrite_manifest(store, planted, files, meta, file_bytes)
    for reader, code, message, left in outcomes(store, tmp_path):
        if reader in ("fetch_set", "read_set") and "size" not in case.names[-1]:
            continue  # a set has no weight metadata: only the weight readers hold a version to its meta
        check(case, code, f"{reader}: {message}", left)
