"""Sparse delta weight versions (ttrv/store/delta.py) over a local directory and the real S3 server: bit-exact
rebuilds (NaN payloads, -0.0, both position encodings), when a full version is written instead, a reader never
rebuilding on a base it cannot verify, and gc keeping every base a live version needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ttrv.store import CorruptVersionError, StoreConfigError, parse_safetensors


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(512, 64, generator=generator).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(64, 128, generator=generator).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.ones(64).bfloat16(),
        "model.norm.weight": torch.randn(64, generator=generator),
        "names::with::separators": torch.randn(10, generator=generator).bfloat16(),
    }


def step(tensors: dict[str, torch.Tensor], seed: int, share: float) -> dict[str, torch.Tensor]:
    """`tensors` with about `share` of the embedding's elements changed (and one NaN, one -0.0)."""
    generator = torch.Generator().manual_seed(seed)
    out = {name: tensor.clone() for name, tensor in tensors.items()}
    embed = out["model.embed_tokens.weight"].view(-1)
    changed = torch.rand(embed.numel(), generator=generator) < share
    embed[changed] += 0.5
    out["model.norm.weight"][3] = float("nan")
    out["names::with::separators"][0] = -0.0 if out["names::with::separators"][0] == 0 else 0.0
    out["names::with::separators"][1] = -0.0
    return out


def publish(store, version: int, tensors, **kwargs):
    return store.publish_weights(version, tensors, kind="full", base_model="tiny", dtype="bfloat16", **kwargs)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype and actual[name].shape == expected[name].shape
        assert bits(actual[name]) == bits(expected[name]), name


@pytest.mark.parametrize("share", [0.01, 0.2])  # 1 %: int32 indices; 20 %: the bitmask is smaller
def test_delta_versions_rebuild_bit_exactly_in_memory_and_on_disk(store, tmp_path, share):
    v1 = state()
    full = publish(store, 1, v1, full_every=4)
    v2 = step(v1, 2, share)
    delta = publish(store, 2, v2, full_every=4)
    assert delta.meta["delta"] == {"base": 1, "base_digest": full.digest}
    assert delta.meta["shards"] == ["delta.safetensors"]
    assert delta.total_bytes < 0.5 * full.total_bytes
    stored = parse_safetensors(np.frombuffer(store._backend.get("weights/v000002/delta.safetensors"), np.uint8)
                               .copy(), "delta")
    encoding = "indices" if share < 0.03 else "mask"
    assert f"{encoding}::model.embed_tokens.weight" in stored
    assert "values::model.layers.0.mlp.up_proj.weight" not in stored  # unchanged tensors are not stored

    assert_bit_exact(store.load_weights(2), v2)
    assert_bit_exact(store.load_weights(1), v1)
    path = store.fetch_weights(2, tmp_path / "cache")
    assert (path / "manifest.json").read_bytes() == delta.raw
    assert_bit_exact(load_file(str(path / "model.safetensors")), v2)
    assert store.fetch_weights(2, tmp_path / "cache") == path  # fetched before: returned at once
    # What a full publish of the same tensors would have written, byte for byte.
    publish(store, 5, v2)
    assert (path / "model.safetensors").read_bytes() == store._backend.get("weights/v000005/model.safetensors")


def test_a_full_version_every_k_steps_and_when_the_delta_is_too_large(store):
    current = state()
    kinds = []
    for version in range(1, 8):
        share = 0.9 if version == 3 else 0.01
        current = step(current, version, share) if version > 1 else current
        manifest = publish(store, version, current, full_every=3, delta_max_share=0.3)
        kinds.append(manifest.meta.get("delta", {}).get("base", "full"))
        assert_bit_exact(store.load_weights(version), current)
    # 1 full; 2 delta on 1; 3 too large -> full; 4, 5 delta on 3; 6 is 3 steps after 3 -> full; 7 delta on 6.
    assert kinds == ["full", 1, "full", 3, 3, "full", 6]
    assert publish(store, 8, step(current, 8, 0.01)).meta.get("delta") is None  # full_every=1: always full
    with pytest.raises(StoreConfigError, match="full_every"):
        publish(store, 9, current, full_every=0)
    changed = dict(current, extra=torch.zeros(3).bfloat16())
    publish(store, 10, current, full_every=5)
    assert publish(store, 11, changed, full_every=5).meta.get("delta") is None  # another tensor set: full


def test_a_delta_whose_base_cannot_be_verified_is_refused(store, tmp_path):
    v1 = state()
    publish(store, 1, v1, full_every=4)
    v2 = step(v1, 2, 0.01)
    publish(store, 2, v2, full_every=4)
    original = store._backend.get("weights/v000001/model.safetensors")
    corrupt = bytearray(original)
    corrupt[len(corrupt) // 2] ^= 0x01
    store._backend.put("weights/v000001/model.safetensors", bytes(corrupt))
    for read in (lambda: store.load_weights(2), lambda: store.fetch_weights(2, tmp_path / "cache")):
        with pytest.raises(CorruptVersionError, match="its base version 1 cannot be verified.*checksum"):
            read()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())

    # The base republished (a trainer resumed from a checkpoint): intact, but not the bytes the delta was built on.
    publish(store, 1, v2)
    with pytest.raises(CorruptVersionError, match="its base version 1 was replaced"):
        store.load_weights(2)
    store.delete_set("weights/v000001")
    with pytest.raises(CorruptVersionError, match="its base version 1 cannot be verified.*no complete set"):
        store.load_weights(2)
    # A delta on a delta, or a base after the delta, is refused before any transfer.
    document = json.loads(store.read_manifest("weights/v000002").raw)
    document["meta"]["delta"]["base"] = 2
    store._backend.put("weights/v000002/manifest.json", json.dumps(document).encode())
    with pytest.raises(CorruptVersionError, match="meta.delta"):
        store.load_weights(2)


def test_a_delta_that_does_not_fit_its_base_is_refused(store):
    v1 = state()
    publish(store, 1, v1, full_every=4)
    publish(store, 2, step(v1, 2, 0.01), full_every=4)
    delta = {"indices::model.norm.weight": torch.tensor([64], dtype=torch.int32),
             "values::model.norm.weight": torch.tensor([1.0])}
    from ttrv.store.delta import apply_delta

    base = {name: tensor.clone() for name, tensor in v1.items()}
    with pytest.raises(CorruptVersionError, match="leave its 64 elements"):
        apply_delta(base, delta, "here")
    with pytest.raises(CorruptVersionError, match="which its base does not hold"):
        apply_delta(base, {"values::nope": torch.tensor([1.0]), "indices::nope": torch.tensor([0])}, "here")
    assert_bit_exact(base, v1)  # nothing was written


def test_gc_keeps_every_base_a_live_version_needs(store):
    current = state()
    for version in range(1, 6):
        current = step(current, version, 0.01) if version > 1 else current
        publish(store, version, current, full_every=10)
    assert store.gc_weights(keep=2) == [2, 3]  # 4 and 5 are deltas on 1
    assert store.weight_versions() == [1, 4, 5]
    assert_bit_exact(store.load_weights(5), current)
    publish(store, 6, step(current, 6, 0.9), full_every=10, delta_max_share=0.2)  # full
    assert store.read_manifest("weights/v000006").meta.get("delta") is None
    assert store.gc_weights(keep=1) == [1, 4, 5]


def test_a_reader_downloads_each_base_once_and_still_checks_it_is_current(store):
    v1 = state()
    publish(store, 1, v1, full_every=4)
    v2, v3 = step(v1, 2, 0.01), step(v1, 3, 0.01)
    publish(store, 2, v2, full_every=4)
    publish(store, 3, v3, full_every=4)
    assert_bit_exact(store.load_weights(1), v1)  # verified, and kept: the manifest says deltas may follow
    store._backend.delete(["weights/v000001/model.safetensors"])
    assert_bit_exact(store.load_weights(2), v2)  # from the kept copy, which the delta did not alter
    assert_bit_exact(store.load_weights(3), v3)
    publish(store, 1, v1)  # the same tensors republished: another manifest, so not the base the deltas were built on
    with pytest.raises(CorruptVersionError, match="its base version 1 was replaced"):
        store.load_weights(2)


def test_changed_positions_across_chunk_borders_on_threads_match_a_full_comparison(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from ttrv.store import delta

    monkeypatch.setattr(delta, "CHUNK", 1000)  # many chunks, positions on and next to their borders
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(10_007, generator=generator).bfloat16()
    current = base.clone()
    changed = torch.tensor([0, 1, 999, 1000, 1001, 4999, 5000, 10_006])
    current[changed] += 1.0
    current[7] = -0.0 if base[7] == 0 else 0.0  # equal as numbers, different bits: -0.0 vs +0.0 is a change
    current[8] = -current[8]
    expected = torch.nonzero(current.view(torch.int16) != base.view(torch.int16)).flatten().numpy()
    with ThreadPoolExecutor(2) as pool:
        found = delta.changed_positions(current.view(torch.int16).numpy(), base.view(torch.int16).numpy(), pool)
    assert np.array_equal(found, expected) and found.dtype == np.int64
    assert np.array_equal(delta.changed_positions(base.view(torch.int16).numpy(), base.view(torch.int16).numpy()),
                          np.empty(0, dtype=np.int64))


def test_update_weights_writes_only_what_deltas_change_into_a_served_model(store):
    """An engine's served tensors brought from version to version in place: a full version is copied in, then each
    delta on it writes only its own elements and puts the base's values back where the previous delta had
    changed them (v3 is built from v1, not v2), bit-exact; a version that does not fit is refused untouched."""
    v1 = state()
    publish(store, 1, v1, full_every=10)
    target = {name: torch.empty_like(tensor) for name, tensor in v1.items()}
    target["frozen.vision.weight"] = torch.full((4,), 7.0)  # the engine holds more than the version
    storages = {name: tensor.data_ptr() for name, tensor in target.items()}
    assert sorted(store.update_weights(1, target)) == sorted(v1)
    assert_bit_exact({n: target[n] for n in v1}, v1)

    # A value no delta touches, changed behind the store's back: only a full copy would overwrite it.
    embed = "model.embed_tokens.weight"
    versions = {2: step(v1, 2, 0.01), 3: step(v1, 3, 0.01), 4: step(v1, 4, 0.2)}
    same = torch.ones(v1[embed].numel(), dtype=torch.bool)
    for tensors in versions.values():
        same &= tensors[embed].view(-1).view(torch.int16) == v1[embed].view(-1).view(torch.int16)
    untouched = int(torch.nonzero(same)[0])
    target[embed].view(-1)[untouched] = 1234.0
    for version, tensors in versions.items():
        assert publish(store, version, tensors, full_every=10).meta["delta"]["base"] == 1
        changed = store.update_weights(version, target)
        assert "model.layers.0.mlp.up_proj.weight" not in changed  # no delta changes it
        assert target[embed].view(-1)[untouched] == 1234.0  # sparse: the elements outside the deltas are not rewritten
        target[embed].view(-1)[untouched] = v1[embed].view(-1)[untouched]
        assert_bit_exact({n: target[n] for n in v1}, tensors)
        target[embed].view(-1)[untouched] = 1234.0
    assert {name: tensor.data_ptr() for name, tensor in target.items()} == storages  # in place
    assert bits(target["frozen.vision.weight"]) == bits(torch.full((4,), 7.0))

    # Another target (a fresh engine) gets the whole version, rebuilt from its base.
    fresh = {name: torch.zeros_like(tensor) for name, tensor in v1.items()}
    store.update_weights(4, fresh)
    assert_bit_exact(fresh, versions[4])
    # A target that cannot take the version is refused before anything is written.
    small = {name: torch.zeros_like(tensor) for name, tensor in v1.items()}
    small[embed] = torch.zeros(3, 3).bfloat16()
    with pytest.raises(StoreConfigError, match=r"target\['model.embed_tokens.weight'\]"):
        store.update_weights(4, small)
    assert all(not tensor.any() for name, tensor in small.items() if name != "model.norm.weight")
