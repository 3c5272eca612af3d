"""The weight store against a local directory and a real S3 server (SeaweedFS): round trips, invisibility of
incomplete versions, corruption, outages, credentials, garbage collection, write errors. Keys and URIs that are
refused (path traversal included) are in the bad-input catalogue (tests/bad_inputs/test_store_keys.py)."""

from __future__ import annotations

import json
import os
import posixpath
import resource
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load as safetensors_load

from ttrv.net import free_port
from ttrv.objectserver import EmbeddedS3
from ttrv.store import (
    CorruptVersionError,
    MiB,
    SetNotFoundError,
    StoreAuthError,
    StoreConfigError,
    StoreError,
    StoreUnavailableError,
    check_key,
    open_store,
    parse_safetensors,
    serialize_safetensors,
)


def sample_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Every dtype a checkpoint carries, odd sizes that break alignment, a non-contiguous tensor, special floats."""
    generator = torch.Generator().manual_seed(seed)
    special = torch.randn(16, generator=generator)
    special[:4] = torch.tensor([float("nan"), float("inf"), -0.0, float("-inf")])
    return {
        "model.embed_tokens.weight": torch.randn(256, 64, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=generator),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(63, generator=generator).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 96, generator=generator).to(torch.bfloat16).t(),
        "model.layers.0.input_layernorm.weight": torch.randn(3, generator=generator).to(torch.bfloat16),
        "model.norm.weight": special,
        "position_ids": torch.arange(7),
        "attention_mask": torch.tensor([True, False, True]),
        "logit_scale": torch.tensor(0.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
    }


def assert_bit_exact(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert got.reshape(-1).view(torch.uint8).tolist() == tensor.reshape(-1).view(torch.uint8).tolist(), name


def publish(store, step: int, tensors: dict[str, torch.Tensor], **kwargs):
    return store.publish_weights(step, tensors, kind="full", base_model="tiny", dtype="bfloat16", **kwargs)


def test_weights_round_trip_bit_exact_across_shards(store, tmp_path):
    tensors = sample_tensors(0)
    manifest = publish(store, 7, tensors, max_shard_bytes=16_000)

    shards = manifest.meta["shards"]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert manifest.meta["step"] == 7 and manifest.meta["kind"] == "full"
    assert_bit_exact(store.load_weights(7), tensors)

    path = store.fetch_weights(7, tmp_path / "cache")
    assert path.name.startswith("v000007-")
    assert sorted(p.name for p in path.iterdir()) == sorted([*shards, "model.safetensors.index.json", "manifest.json"])
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    from_files = {}
    for shard in shards:  # the reference reader, as vLLM and transformers use it
        with safe_open(path / shard, framework="pt") as handle:
            from_files.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    assert_bit_exact(from_files, {name: t.contiguous() for name, t in tensors.items()})

    shard_file = path / shards[0]
    before = shard_file.stat().st_mtime_ns
    assert store.fetch_weights(7, tmp_path / "cache") == path
    assert shard_file.stat().st_mtime_ns == before


def test_a_republished_step_gets_a_new_local_path(store, tmp_path):
    first, second = sample_tensors(1), sample_tensors(2)
    publish(store, 3, first)
    old = store.fetch_weights(3, tmp_path)
    publish(store, 3, second)
    new = store.fetch_weights(3, tmp_path)
    assert new != old
    with safe_open(old / "model.safetensors", framework="pt") as handle:
        assert torch.equal(handle.get_tensor("position_ids"), first["position_ids"])
        assert torch.equal(handle.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                           first["model.layers.0.self_attn.q_proj.weight"])
    assert_bit_exact(store.load_weights(3), second)


def test_lora_version_is_a_peft_adapter_directory(store, tmp_path):
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    store.publish_weights(1, tensors, kind="lora", base_model="tiny", dtype="float32",
                          extra_files={"adapter_config.json": json.dumps(config).encode()},
                          max_shard_bytes=100)

    path = store.fetch_weights(1, tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "manifest.json"]
    assert json.loads((path / "adapter_config.json").read_text()) == config
    with safe_open(path / "adapter_model.safetensors", framework="pt") as handle:
        assert_bit_exact({name: handle.get_tensor(name) for name in handle.keys()}, tensors)  # noqa: SIM118

    with pytest.raises(StoreConfigError, match="extra_files: a LoRA version needs 'adapter_config.json'"):
        store.publish_weights(2, tensors, kind="lora", base_model="tiny", dtype="float32")
    with pytest.raises(StoreConfigError, match="kind: 'qlora'"):
        store.publish_weights(2, tensors, kind="qlora", base_model="tiny", dtype="float32")
    with pytest.raises(StoreConfigError, match="dtype: 'fp8'"):
        store.publish_weights(2, tensors, kind="full", base_model="tiny", dtype="fp8")
    assert store.weight_versions() == [1]


def test_a_version_without_manifest_is_invisible(store, tmp_path):
    publish(store, 1, sample_tensors(1))
    complete_shard = serialize_safetensors(list(sample_tensors(2).items())).tobytes()
    store._backend.put("weights/v000002/model.safetensors", complete_shard)

    assert store.weight_versions() == [1]
    assert store.latest_weights() == 1
    assert store.list_sets("weights") == ["v000001"]
    assert store.read_manifest("weights/v000002") is None
    with pytest.raises(SetNotFoundError, match="no complete set at 'weights/v000002'"):
        store.load_weights(2)
    with pytest.raises(SetNotFoundError):
        store.fetch_weights(2, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_corrupt_truncated_or_missing_shards_are_refused(store, tmp_path):
    good_tensors = sample_tensors(1)
    publish(store, 1, good_tensors)
    manifest = publish(store, 2, sample_tensors(2), max_shard_bytes=16_000)
    shard = manifest.meta["shards"][1]
    key = f"weights/v000002/{shard}"
    original = store._backend.get(key)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    cache = tmp_path / "cache"

    for content, problem in [(bytes(flipped), "does not match its checksum"),
                             (original[:-10], f"{len(original) - 10} bytes instead of {len(original)}"),
                             (original + b"tail", "bytes instead of"),
                             (None, "is missing")]:
        if content is None:
            store._backend.delete([key])
        else:
            store._backend.put(key, content)
        with pytest.raises(CorruptVersionError, match=problem) as refused:
            store.load_weights(2)
        assert f"weights/v000002/{shard}" in str(refused.value)
        with pytest.raises(CorruptVersionError, match=problem):
            store.fetch_weights(2, cache)
        assert list(cache.iterdir()) == []
        assert_bit_exact(store.load_weights(1), good_tensors)

    store._backend.put("weights/v000003/manifest.json", b"{not json")
    with pytest.raises(CorruptVersionError, match="unreadable manifest"):
        store.load_weights(3)


def test_new_sets_use_xxh3_and_sets_published_with_sha256_stay_readable(store, tmp_path):
    """Sets published before the switch to xxh3-128 (format v1, a sha256 per file) load and verify as before, and
    a flipped byte in one of them is still refused; the manifest, not the reader, names the algorithm."""
    import hashlib

    import xxhash

    tensors = sample_tensors(1)
    manifest = publish(store, 1, tensors)
    document = json.loads(manifest.raw)
    assert (document["format"], document["checksum"], manifest.checksum) == ("ttrv.set/v2", "xxh3_128", "xxh3_128")
    shard = store._backend.get("weights/v000001/model.safetensors")
    assert document["files"]["model.safetensors"]["digest"] == xxhash.xxh3_128(shard).hexdigest()

    old = {"format": "ttrv.set/v1", "created": document["created"], "meta": document["meta"],
           "files": {"model.safetensors": {"size": len(shard), "sha256": hashlib.sha256(shard).hexdigest()}}}
    store._backend.put("weights/v000001/manifest.json", json.dumps(old).encode())
    assert store.read_manifest("weights/v000001").checksum == "sha256"
    assert_bit_exact(store.load_weights(1), tensors)
    assert_bit_exact(parse_safetensors_dir(store.fetch_weights(1, tmp_path / "cache")), tensors)

    flipped = bytearray(shard)
    flipped[len(flipped) // 2] ^= 0x01
    store._backend.put("weights/v000001/model.safetensors", bytes(flipped))
    with pytest.raises(CorruptVersionError, match=r"does not match its checksum \(sha256\)"):
        store.load_weights(1)
    old["checksum"], old["format"] = "md5", "ttrv.set/v2"
    store._backend.put("weights/v000001/manifest.json", json.dumps(old).encode())
    with pytest.raises(CorruptVersionError, match="checksum 'md5' is not one of"):
        store.load_weights(1)


def parse_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    tensors = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(parse_safetensors(np.fromfile(shard, dtype=np.uint8), str(shard)))
    return tensors


def test_a_version_being_loaded_survives_gc(store, tmp_path):
    """A reader's lease keeps its version alive even when gc runs in the middle of the download."""
    tensors = sample_tensors(1)
    publish(store, 1, tensors)
    publish(store, 2, sample_tensors(2))
    deleted = []
    original = store._backend.download

    def download_after_gc(*args, **kwargs):
        if not deleted:
            deleted.append(store.gc_weights(keep=1))
        return original(*args, **kwargs)

    store._backend.download = download_after_gc
    assert_bit_exact(store.load_weights(1), tensors)
    assert deleted == [[]]
    assert store.gc_weights(keep=1) == [1]
    assert store.weight_versions() == [2]


def test_gc_keeps_newest_leased_and_in_use_versions(store):
    for step in range(1, 7):
        publish(store, step, {"w": torch.full((4,), float(step))})
    store._backend.put("weights/v000000/model.safetensors", b"crashed publish")
    store._backend.put("weights/v000009/model.safetensors", b"publish in progress")
    deletions: list[list[str]] = []
    delete = store._backend.delete
    store._backend.delete = lambda keys: (deletions.append(list(keys)), delete(keys))[1]

    with store.lease(2):
        assert store.gc_weights(keep=2, in_use={1}) == [3, 4, 0]
    assert store.weight_versions() == [1, 2, 5, 6]
    remaining = store._backend.list("weights")
    assert "weights/v000009/model.safetensors" in remaining
    assert not any(key.startswith(("weights/v000000/", "weights/v000003/", "weights/v000004/")) for key in remaining)
    for step in (3, 4):
        calls = [i for i, keys in enumerate(deletions) if any(k.startswith(f"weights/v{step:06d}/") for k in keys)]
        assert deletions[calls[0]] == [f"weights/v{step:06d}/manifest.json"], "the manifest goes first, alone"
        assert len(calls) == 2

    store.put_json("weights/leases/crashed-reader.json", {"reader": "crashed", "step": 1, "expires": time.time() - 1})
    assert store.gc_weights(keep=2) == [1, 2]
    assert store.weight_versions() == [5, 6]
    assert store._backend.list("weights/leases") == []
    with pytest.raises(StoreConfigError, match="keep: 0 must be an integer >= 1"):
        store.gc_weights(keep=0)


def test_checkpoint_set_from_files_and_bytes(store, tmp_path):
    optimizer = tmp_path / "optimizer.pt"
    optimizer.write_bytes(os.urandom(12 * MiB + 3))
    files = {"optimizer.pt": optimizer, "state/rng.json": b'{"seed": 1}', "empty.bin": b""}
    manifest = store.publish_set("checkpoints/step-000010", files, {"step": 10})
    assert manifest.files["optimizer.pt"].size == 12 * MiB + 3 and manifest.files["empty.bin"].size == 0

    read, contents = store.read_set("checkpoints/step-000010")
    assert read.meta == {"step": 10} and read.digest == manifest.digest
    assert bytes(contents["optimizer.pt"]) == optimizer.read_bytes()
    assert bytes(contents["state/rng.json"]) == b'{"seed": 1}' and bytes(contents["empty.bin"]) == b""

    dest = tmp_path / "restored"
    store.fetch_set("checkpoints/step-000010", dest)
    assert (dest / "optimizer.pt").read_bytes() == optimizer.read_bytes()
    assert (dest / "state" / "rng.json").read_bytes() == b'{"seed": 1}'
    store.fetch_set("checkpoints/step-000010", dest)
    with pytest.raises(StoreConfigError, match="dest_dir: .* exists and does not hold"):
        store.fetch_set("checkpoints/step-000010", tmp_path)

    assert store.list_sets("checkpoints") == ["step-000010"]
    store.delete_set("checkpoints/step-000010")
    assert store.list_sets("checkpoints") == []
    assert store.read_manifest("checkpoints/step-000010") is None


def test_json_documents(store):
    assert store.get_json("progress.json") is None
    store.put_json("progress.json", {"step": 1})
    store.put_json("progress.json", {"step": 2, "reward": 0.5})
    assert store.get_json("progress.json") == {"step": 2, "reward": 0.5}
    with pytest.raises(StoreConfigError, match="not JSON-serialisable"):
        store.put_json("progress.json", {"when": object()})


def test_missing_credentials_name_the_variables(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TTRV_S3_SECRET_DIR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(StoreConfigError, match="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        open_store("s3://bucket/x", endpoint="http://127.0.0.1:1")
    monkeypatch.setenv("TTRV_S3_SECRET_DIR", str(tmp_path))
    (tmp_path / "AWS_ACCESS_KEY_ID").write_text("id")
    with pytest.raises(StoreConfigError, match="TTRV_S3_SECRET_DIR=.*AWS_SECRET_ACCESS_KEY"):
        open_store("s3://bucket/x", endpoint="http://127.0.0.1:1")


def test_credentials_from_a_mounted_secret_directory(s3_env, s3_uri, monkeypatch, tmp_path):
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "AWS_ACCESS_KEY_ID").write_text(s3_env.access_key + "\n")
    (secret_dir / "AWS_SECRET_ACCESS_KEY").write_text(s3_env.secret_key + "\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ignored")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ignored")
    monkeypatch.setenv("TTRV_S3_SECRET_DIR", str(secret_dir))
    with open_store(s3_uri) as store:
        store.put_json("hello.json", {"ok": True})
        assert store.get_json("hello.json") == {"ok": True}


def test_wrong_credentials_fail_at_once_without_leaking_secrets(s3_env, monkeypatch, log_stream):
    wrong = "wrong-" + secrets.token_urlsafe(24)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    started = time.monotonic()
    with pytest.raises(StoreAuthError, match="SignatureDoesNotMatch.*check AWS_ACCESS_KEY_ID / "
                                             "AWS_SECRET_ACCESS_KEY of the environment") as refused:
        open_store("s3://ttrv-test/auth", retry_seconds=30)
    assert time.monotonic() - started < 5, "credential errors are not retried"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-" + secrets.token_hex(8))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    with pytest.raises(StoreAuthError, match="InvalidAccessKeyId") as unknown:
        open_store("s3://ttrv-test/auth", retry_seconds=30)
    for text in (str(refused.value), str(unknown.value), log_stream.getvalue()):
        assert wrong not in text and s3_env.secret_key not in text


def test_unreachable_store_gives_up_after_its_budget(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"store at http://127.0.0.1:{port} did not answer for 1.5 s"):
        open_store("s3://bucket/x", endpoint=f"http://127.0.0.1:{port}", retry_seconds=1.5)
    assert 1.4 < time.monotonic() - started < 4


def test_large_objects_move_in_parallel_parts(s3_uri):
    store = open_store(s3_uri, part_size=5 * MiB, workers=4)
    client = store._backend.client
    active, peak, calls = [0], {"_upload_part": 0, "get_object": 0}, {"_upload_part": 0, "get_object": 0}
    lock = threading.Lock()

    def counted(name):
        original = getattr(client, name)

        def call(*args, **kwargs):
            with lock:
                active[0] += 1
                calls[name] += 1
                peak[name] = max(peak[name], active[0])
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1
        return call

    client._upload_part, client.get_object = counted("_upload_part"), counted("get_object")
    data = os.urandom(30 * MiB)
    store.publish_set("blob", {"data": data})
    _, files = store.read_set("blob")
    assert bytes(files["data"]) == data
    assert calls == {"_upload_part": 6, "get_object": 7}  # 6 ranges + the manifest
    assert peak["_upload_part"] > 1 and peak["get_object"] > 1


def test_an_upload_the_server_forgot_is_started_again(s3_uri):
    """The multipart upload is aborted behind the store's back after its first part: the store uploads the object
    again under a new upload instead of failing or completing a broken one."""
    store = open_store(s3_uri, part_size=5 * MiB, workers=2)
    client = store._backend.client
    upload_part, uploads = client._upload_part, []

    def upload_part_then_abort(bucket, key, data, headers, upload_id, number):
        etag = upload_part(bucket, key, data, headers, upload_id, number)
        if not uploads:
            client._abort_multipart_upload(bucket, key, upload_id)
        uploads.append(upload_id)
        return etag

    client._upload_part = upload_part_then_abort
    data = os.urandom(12 * MiB)
    store.publish_set("blob", {"data": data})
    assert len(set(uploads)) == 2, "a second upload replaced the aborted one"
    assert bytes(store.read_set("blob")[1]["data"]) == data


def test_publish_survives_a_server_outage_and_readers_never_see_partial_versions(s3_env, s3_uri):
    """The server dies after the first part of version 2 lands and comes back 2 s later: the publish retries and
    completes, and a reader polling meanwhile only ever loads complete, bit-exact versions."""
    server = s3_env
    writer = open_store(s3_uri, retry_seconds=60, part_size=5 * MiB)
    reader = open_store(s3_uri, retry_seconds=60)
    versions = {1: {"w": torch.randn(256, 256)}, 2: {f"w{i}": torch.randn(1024, 1024) for i in range(8)}}
    publish(writer, 1, versions[1])
    outage, restarted = threading.Event(), threading.Event()
    upload_part = writer._backend.client._upload_part

    def upload_part_then_crash(*args, **kwargs):
        result = upload_part(*args, **kwargs)
        if not outage.is_set():
            outage.set()
            server.kill()
            threading.Timer(2.0, lambda: (server.start(), restarted.set())).start()
        return result

    writer._backend.client._upload_part = upload_part_then_crash
    loads, failures, done = [], [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                step = reader.latest_weights()
                tensors = reader.load_weights(step)
                loads.append(step)
                assert_bit_exact(tensors, versions[step])
            except (StoreError, AssertionError) as error:
                failures.append(error)
            time.sleep(0.05)

    polling = threading.Thread(target=poll)
    polling.start()
    try:
        publish(writer, 2, versions[2])
    finally:
        done.set()
        polling.join()
    assert outage.is_set() and restarted.wait(30) and server.running
    assert failures == []
    assert loads and set(loads) <= {1, 2}
    assert_bit_exact(reader.load_weights(2), versions[2])
    assert reader.weight_versions() == [1, 2]


_WRITER_AND_DELETER = """
import os, sys
from ttrv.store import open_store
store = open_store(sys.argv[1])
for i in range(200):
    with store.lease(i, 60):  # what every rank that loads weights does
        pass
    key = f"sets/shared/{os.getpid()}-{i}.json"  # a directory that others empty and remove meanwhile
    store._backend.put(key, b"{}")
    store._backend.delete([key])
"""


def test_file_store_writers_and_deleters_in_several_processes_do_not_trip_on_each_other(tmp_path):
    """`delete` removes the directories it empties; a rank writing its lease (or any object) into one of them at
    that moment must still succeed. Four processes, 400 writes and deletes each, in two shared directories (a lost
    race here once failed a trainer with exit 1)."""
    url = f"file://{tmp_path / 'store'}"
    processes = [subprocess.Popen([sys.executable, "-c", _WRITER_AND_DELETER, url], stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
    failures = [error for process in processes if process.wait(timeout=120) != 0
                for error in [process.stderr.read()[-800:]]]
    for process in processes:
        process.stderr.close()
    assert failures == []


def test_file_write_error_leaves_the_previous_version_intact(tmp_path):
    store = open_store(f"file://{tmp_path / 'store'}")
    previous = sample_tensors(1)
    publish(store, 1, previous)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # A real write error from the kernel: files may not grow past 1 MiB while version 2 (4 MiB) is written.
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, hard))
    try:
        with pytest.raises(StoreError, match="cannot write 'weights/v000002/model.safetensors': File too large"):
            publish(store, 2, {"w": torch.randn(1024, 1024)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert store.weight_versions() == [1]
    assert_bit_exact(store.load_weights(1), previous)
    assert sorted(p.name for p in Path(tmp_path / "store").rglob("*") if p.is_file()) == ["manifest.json",
                                                                                       "model.safetensors"]


def _listening(pid: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of the TCP sockets process `pid` listens on."""
    inodes = set()
    for descriptor in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(descriptor)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addresses.add(fields[1].rsplit(":", 1)[0])
    return addresses


def test_embedded_server_binds_localhost_restarts_in_place_and_leaves_no_process(tmp_path, monkeypatch):
    server = EmbeddedS3(tmp_path / "s3")
    taken = server._ports["filer"][0]
    with socket.socket() as squatter:  # another process grabs a drawn port before weed binds it
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        server.start()
    assert server._ports["filer"][0] != taken
    with server:
        assert server.endpoint == f"http://127.0.0.1:{server.port}"
        assert set(server.env()) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert _listening(server._process.pid) == {"0100007F"}, "every listening socket is on 127.0.0.1"
        assert oct((tmp_path / "s3" / "s3.json").stat().st_mode & 0o777) == "0o600"
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        with open_store("s3://ttrv-restart/run") as store:
            store.put_json("progress.json", {"step": 3})
            endpoint, first_pid = server.endpoint, server._process.pid
            server.restart()
            assert server.endpoint == endpoint and server._process.pid != first_pid
            assert store.get_json("progress.json") == {"step": 3}
        pid = server._process.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(first_pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with socket.socket() as again:  # nothing listens on the S3 port any more
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int8,
           torch.uint8, torch.bool]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1,
                max_size=8))
def test_safetensors_writer_matches_the_reference_reader(specs):
    """Any mix of dtypes and odd shapes: our reader returns the same bits as the safetensors library does."""
    tensors = {f"t{i}": (torch.randint(0, 2, shape) if dtype is torch.bool else torch.randn(shape) * 100).to(dtype)
               for i, (dtype, shape) in enumerate(specs)}
    buffer = serialize_safetensors(list(tensors.items()))
    assert_bit_exact(parse_safetensors(buffer, "test"), tensors)
    assert_bit_exact(safetensors_load(buffer.tobytes()), tensors)


@given(st.lists(st.sampled_from(["a", "b1", ".", "..", "", "...", ".x", "x."]), min_size=1, max_size=5))
def test_an_accepted_key_never_leaves_its_root(parts):
    key = "/".join(parts)
    try:
        check_key(key)
    except StoreConfigError:
        return
    assert posixpath.normpath(key) == key and not key.startswith(("/", "../")) and key != ".."
