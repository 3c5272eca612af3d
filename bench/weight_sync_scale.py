"""What a weight version costs at 7B scale through object storage: sparse deltas against full versions and raw S3.

One run, one real S3 server (EmbeddedS3: SeaweedFS on this machine), one synthetic bf16 state with the layer layout
of Qwen2-7B scaled down (hidden 3584 -> 1792, intermediate 18944 -> 9472, 4 KV heads of 128 -> 2, vocab 152064 ->
38016, untied lm_head; as many layers as the target size holds: --gb 1.5 gives ~11).

Training is simulated as mixed-precision AdamW: fp32 master weights (init N(0, 0.02), norms 1), the served bf16
state is master.to(bf16). Gradients are N(mu, sigma_t) per element with a per-tensor scale sigma_t (log-normal
across tensors; Adam divides it out) and a small per-element drift mu = 0.1 sigma_t (the signal that makes Adam's
normalised step |m_hat / sqrt(v_hat)| about 0.25 instead of 1, as in a warmed-up optimizer; m and v start at
their stationary values). beta = (0.9, 0.999), weight decay 0.01, m and v held in bf16 to fit the machine's RAM.

For each learning rate (5e-7, 1e-5): version 1 is full; then --steps optimizer steps, each published as a delta
on version 1 (storage.fullEvery > steps) and loaded back the way the in-process engine does (Store.update_weights
into the served model's tensors: ranged GETs into memory, xxh3 verification of the delta, a check that its base is
still the one the model and the reader's verified copy hold, then only the elements the deltas change are written).
Measured: the fraction of bf16 values whose bits changed since the previous step and since the base, the bytes of
each version, how many tensors a version writes, and publish / verified+loaded seconds. Then a full version
through the same path, and the raw S3 round trip of
the same number of bytes (minio multipart put + parallel ranged GETs, no format, no checksum).

Printed last: delta_bytes_fraction (lr 5e-7, one step after the base: delta bytes / full bytes),
delta_sync_vs_raw_full_ratio (that delta's publish+load seconds / raw full put+get seconds) and
full_sync_vs_raw_ratio (raw seconds / full publish+load seconds), then a table extrapolating to 7B and 32B.

    python bench/weight_sync_scale.py [--gb 1.5] [--steps 3]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minio import Minio  # noqa: E402
from weight_sync import raw_round_trip, settle  # noqa: E402

from ttrv import log  # noqa: E402
from ttrv.objectserver import EmbeddedS3  # noqa: E402
from ttrv.store import open_store  # noqa: E402

HIDDEN, INTERMEDIATE, KV, VOCAB = 1792, 9472, 256, 38016


def layout(gb: float) -> dict[str, tuple[int, ...]]:
    def layer(i: int) -> dict[str, tuple[int, ...]]:
        p = f"model.layers.{i}."
        return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.q_proj.bias": (HIDDEN,),
                p + "self_attn.k_proj.weight": (KV, HIDDEN), p + "self_attn.k_proj.bias": (KV,),
                p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.v_proj.bias": (KV,),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
                p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,)}

    per_layer = sum(math.prod(s) for s in layer(0).values()) * 2
    fixed = 2 * VOCAB * HIDDEN * 2
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(max(1, round((gb * 1e9 - fixed) / per_layer))):
        shapes |= layer(i)
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


class Trainer:
    """fp32 master weights and AdamW state for the layout; `step()` updates in place, `served()` is the bf16 view."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.master, self.m, self.v, self.sigma, self.seeds = {}, {}, {}, {}, {}
        for name, shape in shapes.items():
            weight = torch.ones(shape) if name.endswith("norm.weight") else torch.empty(shape).normal_(
                0, 0.02, generator=self.generator)
            self.master[name] = weight
            sigma = float(torch.empty(1).log_normal_(math.log(1e-3), 1.0, generator=self.generator))
            self.sigma[name] = sigma
            self.seeds[name] = len(self.seeds) + 1
            # stationary Adam moments for N(drift, sigma) gradients: E m = drift, sd m = sigma sqrt(0.1 / 1.9)
            self.m[name] = (self.drift(name, shape) + torch.empty(shape).normal_(
                0, sigma * math.sqrt(0.1 / 1.9), generator=self.generator)).bfloat16()
            self.v[name] = torch.full(shape, sigma ** 2).bfloat16()
        self.t = 1000

    def drift(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The per-element mean of the gradient: the same every step (regenerated from its seed, not stored)."""
        generator = torch.Generator().manual_seed(self.seeds[name])
        return torch.empty(shape).normal_(0, 0.1 * self.sigma[name], generator=generator)

    def step(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, wd: float = 0.01
             ) -> float:
        """One AdamW step; returns the fraction of served (bf16) values whose bits it changed."""
        self.t += 1
        changed = total = 0
        c1, c2 = 1 - beta1 ** self.t, 1 - beta2 ** self.t
        for name, weight in self.master.items():
            grad = torch.empty_like(weight).normal_(0, self.sigma[name], generator=self.generator)
            grad += self.drift(name, weight.shape)
            before = weight.bfloat16()
            m = self.m[name].float().mul_(beta1).add_(grad, alpha=1 - beta1)
            v = self.v[name].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            self.m[name].copy_(m)
            self.v[name].copy_(v)
            weight.mul_(1 - lr * wd)
            weight.addcdiv_(m / c1, (v / c2).sqrt_().add_(eps), value=-lr)
            changed += int(torch.count_nonzero(weight.bfloat16().view(torch.int16) != before.view(torch.int16)))
            total += weight.numel()
        return changed / total

    def served(self) -> dict[str, torch.Tensor]:
        return {name: weight.bfloat16() for name, weight in self.master.items()}


def changed_fraction(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    changed = sum(int((a[n].view(torch.int16) != b[n].view(torch.int16)).sum()) for n in a)
    return changed / sum(t.numel() for t in a.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.5, help="size of the bf16 state in GB")
    parser.add_argument("--steps", type=int, default=3, help="delta versions per learning rate")
    parser.add_argument("--lrs", default="5e-7,1e-5")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--part-mb", type=int, default=16)
    args = parser.parse_args()
    log.configure("warning")

    shapes = layout(args.gb)
    nbytes = sum(math.prod(s) for s in shapes.values()) * 2
    layers = sum(1 for n in shapes if n.endswith("input_layernorm.weight"))
    print(f"state: {nbytes / 1e9:.2f} GB bf16, {len(shapes)} tensors, {layers} layers (Qwen2-7B layout scaled: "
          f"hidden {HIDDEN}, intermediate {INTERMEDIATE}, kv {KV}, vocab {VOCAB}); {os.cpu_count()} CPUs", flush=True)
    part_size = args.part_mb << 20
    rows: dict[float, list[dict]] = {}
    results: dict[str, float] = {}
    with EmbeddedS3() as server:
        os.environ.update(server.env())
        store = open_store("s3://bench/scale", workers=args.workers, part_size=part_size)
        workers = store._pool._max_workers
        client = Minio(server.endpoint.split("://")[1], server.access_key, server.secret_key, secure=False,
                       region="us-east-1")
        version = 0
        served_model = {name: torch.empty(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}

        def sync(state: dict[str, torch.Tensor], full_every: int) -> dict:
            nonlocal version
            version += 1
            settle(server._process.pid)
            started = time.perf_counter()
            manifest = store.publish_weights(version, state, kind="full", base_model="bench", dtype="bfloat16",
                                             full_every=full_every, delta_max_share=1.0)
            published = time.perf_counter()
            changed = store.update_weights(version, served_model)
            done = time.perf_counter()
            assert all(torch.equal(served_model[n].view(torch.int16), state[n].view(torch.int16)) for n in state)
            return {"delta": "delta" in manifest.meta, "bytes": manifest.total_bytes, "publish": published - started,
                    "loaded": done - published, "total": done - started, "tensors": len(changed)}

        for lr in (float(x) for x in args.lrs.split(",")):
            trainer = Trainer(shapes)
            store.gc_weights(keep=1)
            current = trainer.served()
            first = sync(current, full_every=args.steps + 1)
            rows[lr] = [first | {"step": 0, "vs_prev": 1.0, "vs_base": 1.0}]
            for k in range(1, args.steps + 1):
                del current
                started = time.perf_counter()
                vs_prev = trainer.step(lr)
                current = trainer.served()
                update = time.perf_counter() - started
                row = sync(current, full_every=args.steps + 1)
                row |= {"step": k, "vs_prev": vs_prev, "update": update,
                        "vs_base": changed_fraction(current, store._delta_base.tensors)}
                rows[lr].append(row)
                print(f"lr {lr:g} step {k}: changed {row['vs_prev']:.4%} of values since the previous step, "
                      f"{row['vs_base']:.4%} since the base; delta {row['bytes'] / 1e6:.1f} MB "
                      f"({row['bytes'] / nbytes:.4f} of full), {row['tensors']} of {len(shapes)} tensors written; "
                      f"publish {row['publish']:.2f} s, verified and loaded {row['loaded']:.2f} s", flush=True)
            del trainer, current

        # a full version through the store, then the same bytes raw
        state = {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02) for name, shape in shapes.items()}
        store.gc_weights(keep=1)
        full = sync(state, full_every=1)
        del state
        store.gc_weights(keep=1)
        blob = os.urandom(nbytes)
        settle(server._process.pid)
        put, get = raw_round_trip(client, "bench", blob, workers, part_size)
        del blob
        store.close()

    raw = put + get
    print(f"\nfull version: {full['bytes'] / 1e9:.2f} GB, publish {full['publish']:.2f} s, verified and loaded "
          f"{full['loaded']:.2f} s (total {full['total']:.2f} s)")
    print(f"raw S3: put {put:.2f} s ({nbytes / put / 1e9:.2f} GB/s), get {get:.2f} s ({nbytes / get / 1e9:.2f} GB/s)"
          f" ({workers} threads, {args.part_mb} MiB parts)")
    print("\n| lr | step | changed vs previous | changed vs base | version bytes / full | tensors written | publish s "
          "| verified + loaded s | total s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for lr, lr_rows in rows.items():
        for row in lr_rows:
            print(f"| {lr:g} | {row['step']} {'delta' if row['delta'] else 'full'} | {row['vs_prev']:.4%} | "
                  f"{row['vs_base']:.4%} | {row['bytes'] / nbytes:.4f} | {row['tensors']}/{len(shapes)} | "
                  f"{row['publish']:.2f} | {row['loaded']:.2f} | {row['total']:.2f} |")

    low = rows[min(rows)][1]
    results["delta_bytes_fraction"] = low["bytes"] / nbytes
    results["delta_sync_vs_raw_full_ratio"] = low["total"] / raw
    results["full_sync_vs_raw_ratio"] = raw / full["total"]

    # Extrapolation: bytes scale with the parameter count; time = the bytes put and got at the stated store
    # bandwidth, plus this machine's CPU time beyond the transfer (serialising, xxh3, comparing against the base,
    # rebuilding, copying into the model), which scales with the full state's size for both kinds of version.
    raw_rate = 2 * nbytes / raw
    cpu_full = max(full["total"] - raw, 0.0) / nbytes
    print("\nextrapolated (assumptions: bf16, 2 bytes/param, 7.6B and 32.8B params; the changed fraction measured "
          "above holds at scale; put and get each at the stated bandwidth; delta = one step after a full version; "
          f"CPU time beyond the transfer as measured here per byte of the full state (full {cpu_full * 1e9:.2f} s/GB, "
          "delta its measured total less its transfer at the raw rate): an upper bound from 2 busy cores)")
    print("| model | lr | bandwidth | full bytes | full s | delta bytes | delta transfer s | delta CPU s (here) "
          "| delta s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for params, label in ((7.6e9, "7B"), (32.8e9, "32B")):
        scale = params * 2 / nbytes
        for lr, lr_rows in rows.items():
            row = lr_rows[1]
            for gbps in (1.0, 5.0):
                full_bytes = params * 2
                full_s = 2 * full_bytes / (gbps * 1e9) + cpu_full * full_bytes
                delta_bytes = row["bytes"] * scale
                delta_cpu = max(row["total"] - 2 * row["bytes"] / raw_rate, 0.0) * scale
                delta_s = 2 * delta_bytes / (gbps * 1e9) + delta_cpu
                print(f"| {label} | {lr:g} | {gbps:g} GB/s | {full_bytes / 1e9:.1f} GB | {full_s:.1f} | "
                      f"{delta_bytes / 1e9:.2f} GB | {2 * delta_bytes / (gbps * 1e9):.2f} | {delta_cpu:.1f} | "
                      f"{delta_s:.1f} |")
    print()
    for key, value in results.items():
        print(f"{key}={value:.4f}")


if __name__ == "__main__":
    main()
