"""How fast does a weight version travel from trainer to rollout through S3, next to what the S3 server can do?

One run, one real S3 server (EmbeddedS3: SeaweedFS on this machine), one model of realistic shapes (~300 MB fp32):

  raw    the same number of bytes, put with the minio client (parallel multipart) and got back (parallel ranged
         GETs into one buffer): what client and server can do, with no format, no checksum, no model.
  ttrv   publish_weights -> load_weights (download + sha256 verify + safetensors views) -> load_state_dict.
  disk   publish_weights -> fetch_weights (verified versioned directory, what vLLM loads) -> load_file ->
         load_state_dict.
  naive  torch.save into one blob, single-stream put, single-stream get, torch.load, load_state_dict.
  lora   the same trip for a rank-16 adapter on q/k/v/o/gate/up/down of the same shapes.

Each row is the median of `--rounds` rounds; every round runs each case once, in a rotated order, and each case
starts on an idle server (deleting the previous case's objects keeps SeaweedFS busy for a while). The last line is
`sync_vs_raw_ratio=raw/ttrv` of those medians: 1.0 means the store adds nothing to the raw transfer.

    python bench/weight_sync.py [--mb 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from minio import Minio
from safetensors.torch import load_file
from torch import nn

from ttrv import log
from ttrv.objectserver import EmbeddedS3
from ttrv.store import DEFAULT_PART_SIZE, open_store

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Layer(nn.Module):
    def __init__(self, hidden: int, kv: int, intermediate: int):
        super().__init__()
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(hidden, hidden), "k_proj": nn.Linear(hidden, kv),
                                        "v_proj": nn.Linear(hidden, kv), "o_proj": nn.Linear(hidden, hidden, False)})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(hidden, intermediate, False),
                                  "up_proj": nn.Linear(hidden, intermediate, False),
                                  "down_proj": nn.Linear(intermediate, hidden, False)})
        self.input_layernorm = nn.LayerNorm(hidden)
        self.post_attention_layernorm = nn.LayerNorm(hidden)


class Model(nn.Module):
    """Qwen2-like shapes (grouped-query attention, gated MLP), sized by the number of layers."""

    def __init__(self, layers: int, hidden: int = 1024, kv: int = 256, intermediate: int = 2816, vocab: int = 16384):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Layer(hidden, kv, intermediate) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)


def build_model(megabytes: int) -> Model:
    per_layer = sum(p.numel() * 4 for p in Layer(1024, 256, 2816).parameters())
    fixed = 2 * 16384 * 1024 * 4
    model = Model(layers=max(1, round((megabytes * 1e6 - fixed) / per_layer)))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model


def lora_tensors(model: Model, rank: int = 16) -> dict[str, torch.Tensor]:
    """peft's naming for an adapter on every projection of every layer."""
    tensors = {}
    for index, layer in enumerate(model.layers):
        for group in (layer.self_attn, layer.mlp):
            for name, linear in group.items():
                base = f"base_model.model.model.layers.{index}.{'self_attn' if group is layer.self_attn else 'mlp'}"
                tensors[f"{base}.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features) * 0.01
                tensors[f"{base}.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank) * 0.01
    return tensors


def adapter_config(rank: int = 16) -> bytes:
    return json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                       "lora_dropout": 0.0, "bias": "none", "target_modules": list(PROJECTIONS),
                       "base_model_name_or_path": "bench"}).encode()


def raw_round_trip(client: Minio, bucket: str, blob: bytes, workers: int, part_size: int) -> tuple[float, float]:
    """Best plain minio usage: parallel multipart put; parallel ranged GETs into one preallocated buffer."""
    started = time.perf_counter()
    client.put_object(bucket, "raw/blob", io.BytesIO(blob), len(blob), part_size=part_size,
                      num_parallel_uploads=workers)
    put = time.perf_counter() - started
    started = time.perf_counter()
    out = bytearray(len(blob))
    view = memoryview(out)

    def get(offset: int) -> None:
        response = client.get_object(bucket, "raw/blob", offset=offset, length=min(part_size, len(blob) - offset))
        try:
            position = offset
            for block in response.stream(1 << 20):
                view[position:position + len(block)] = block
                position += len(block)
        finally:
            response.close()
            response.release_conn()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, range(0, len(blob), part_size)))
    get_seconds = time.perf_counter() - started
    assert out == blob
    return put, get_seconds


def naive_round_trip(client: Minio, bucket: str, model: Model, target: Model) -> float:
    started = time.perf_counter()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    size = buffer.tell()
    buffer.seek(0)
    client.put_object(bucket, "naive/model.pt", buffer, size, part_size=64 << 20, num_parallel_uploads=1)
    response = client.get_object(bucket, "naive/model.pt")
    try:
        data = response.read()
    finally:
        response.close()
        response.release_conn()
    target.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
    return time.perf_counter() - started


def settle(pid: int, timeout: float = 10.0) -> None:
    """Waits until the S3 server is idle (under 5% of a CPU for 0.3 s): deleting or overwriting 300 MB leaves it
    busy in the background, and that work must not land in whichever case is timed next."""
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds()
        time.sleep(0.3)
        if cpu_seconds() - before < 0.015:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=300, help="model size in MB (fp32)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running every case once; rows are medians")
    parser.add_argument("--workers", type=int, default=None, help="transfer threads (default: the store's)")
    parser.add_argument("--part-mb", type=int, default=DEFAULT_PART_SIZE >> 20, help="multipart/range size in MiB")
    args = parser.parse_args()
    log.configure(os.environ.get("TTRV_LOG_LEVEL", "warning"))
    torch.manual_seed(0)
    model = build_model(args.mb)
    target = Model(layers=len(model.layers))
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    lora = lora_tensors(model)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora.values())
    part_size = args.part_mb << 20
    blob = os.urandom(nbytes)
    times: dict[str, list[float]] = defaultdict(list)

    with EmbeddedS3() as server, tempfile.TemporaryDirectory() as scratch:
        os.environ.update(server.env())
        store = open_store("s3://bench/run", workers=args.workers, part_size=part_size)
        workers = store._pool._max_workers
        client = Minio(server.endpoint.split("://")[1], server.access_key, server.secret_key, secure=False,
                       region="us-east-1")
        steps = iter(range(1, 1_000_000))

        def raw() -> None:
            put, get = raw_round_trip(client, "bench", blob, workers, part_size)
            times["raw put"].append(put)
            times["raw get"].append(get)
            times["raw"].append(put + get)

        def ttrv() -> None:
            step = next(steps)
            started = time.perf_counter()
            store.publish_weights(step, state, kind="full", base_model="bench", dtype="float32")
            published = time.perf_counter()
            target.load_state_dict(store.load_weights(step))
            finished = time.perf_counter()
            times["ttrv publish"].append(published - started)
            times["ttrv load"].append(finished - published)
            times["ttrv"].append(finished - started)
            assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), state.values(), strict=True))

        def disk() -> None:
            step = next(steps)
            started = time.perf_counter()
            store.publish_weights(step, state, kind="full", base_model="bench", dtype="float32")
            path = store.fetch_weights(step, Path(scratch))
            loaded = {}
            for shard in sorted(path.glob("*.safetensors")):
                loaded.update(load_file(shard))
            target.load_state_dict(loaded)
            times["disk"].append(time.perf_counter() - started)

        def naive() -> None:
            times["naive"].append(naive_round_trip(client, "bench", model, target))

        def adapter() -> None:
            step = next(steps)
            started = time.perf_counter()
            store.publish_weights(step, lora, kind="lora", base_model="bench", dtype="float32",
                                  extra_files={"adapter_config.json": adapter_config()})
            fetched = store.fetch_weights(step, Path(scratch))
            load_file(fetched / "adapter_model.safetensors")
            times["lora"].append(time.perf_counter() - started)

        cases = [raw, ttrv, disk, naive, adapter]
        for round_ in range(args.rounds):
            # Each round starts with a different case, so no case always follows the same one.
            for case in cases[round_ % len(cases):] + cases[:round_ % len(cases)]:
                store.gc_weights(keep=1)
                client.remove_object("bench", "raw/blob")
                client.remove_object("bench", "naive/model.pt")
                settle(server._process.pid)
                case()
        store.close()

    median = {name: statistics.median(values) for name, values in times.items()}
    mb = nbytes / 1e6
    print(f"model {mb:.0f} MB fp32 ({len(state)} tensors, {len(model.layers)} layers); LoRA {lora_bytes / 1e6:.1f} MB; "
          f"{workers} threads, {args.part_mb} MiB parts, {args.rounds} rounds, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'path':<34}{'seconds':>9}{'MB/s':>9}")
    rows = [("raw put (minio, parallel multipart)", "raw put"), ("raw get (minio, parallel ranges)", "raw get"),
            ("raw put + get", "raw"), ("ttrv publish_weights", "ttrv publish"),
            ("ttrv load_weights + load_state_dict", "ttrv load"), ("ttrv sync (publish+load)", "ttrv"),
            ("ttrv publish + fetch_weights (disk)", "disk"), ("naive torch.save, single stream", "naive")]
    for label, key in rows:
        print(f"{label:<34}{median[key]:>9.3f}{mb / median[key]:>9.0f}")
    print(f"{'lora publish + fetch_weights':<34}{median['lora']:>9.3f}{lora_bytes / 1e6 / median['lora']:>9.0f}")
    print(f"naive_vs_ttrv_speedup={median['naive'] / median['ttrv']:.2f}")
    print(f"lora_sync_seconds={median['lora']:.3f}")
    print(f"sync_vs_raw_ratio={median['raw'] / median['ttrv']:.3f}")


if __name__ == "__main__":
    main()
