"""`ttrv plan SPEC`: the memory one trainer GPU (and one rollout GPU) will need, from the model's config alone.

No weights are read: the parameter count comes from the config's shapes (`model_shape`: the language model and, for
Qwen2-VL and Qwen2.5-VL, the vision tower, module by module as transformers builds them; another architecture is
built on torch's meta device, which allocates nothing). The hardware is the spec's: `resources.nodes` ×
`gpusPerNode` data-parallel ranks of `resources.gpuMemory` each (`resources.memory`, the pod's, when the trainer runs
on CPU).

Model states (weights, gradients, optimizer) follow DeepSpeed's own accounting, read in deepspeed 0.19.8:
- ZeRO-1/2 (`deepspeed/runtime/zero/stage_1_and_2.py`, `estimate_zero2_model_states_mem_needs`): 16-bit weights on
  every rank (2 bytes a parameter), and "18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
  8_optimizer_states_32bit" bytes a parameter divided over the ranks; with the optimizer offloaded only the 16-bit
  weights stay on the GPU. ZeRO-1 keeps the 16-bit gradients whole on every rank.
- ZeRO-3 (`deepspeed/runtime/zero/stage3.py`, `estimate_zero3_model_states_mem_needs`): the same 18 bytes divided
  over the ranks, plus 4 bytes × the largest layer's parameters for the layer being gathered
  (`largest_layer_memory`); with the optimizer offloaded, the 16-bit weight partition (2 bytes / ranks) and that
  gather. Gradients are reduced into an fp32 partition there (`grad_partitions_flat_buffer`, dtype
  `gradient_accumulation_dtype`, float32), so ZeRO-3 has no 16-bit gradient partition: its 18 bytes are 2 of
  weights, 4 of fp32 gradients and 12 of fp32 master weights and Adam moments.
Only trainable parameters carry gradients and optimizer state (the vision tower is frozen with
`model.trainable: language`; LoRA trains its adapters only), where DeepSpeed's estimators assume every parameter is
trained; with `trainable: all` both agree (tests/test_plan.py checks within 10 %, on the tiny model and on
Qwen2.5-VL-7B's config).

Everything else is an estimate and says so: activations (per micro-batch, sdpa or flash attention, so no L×L scores),
the logits the learner computes, the in-process rollout's own model copy and KV cache, vLLM's share, and a fixed
allowance for the CUDA context and DeepSpeed's communication buckets."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ttrv.spec.run import AdaptationSettings

GIB = 1 << 30
PROMPT_TEXT_TOKENS = 256
"""Text tokens of a prompt besides its image (chat template, question, options): an allowance, not a measurement."""
CONTEXT_BYTES = 1 * GIB
"""CUDA context, cuBLAS workspaces and NCCL buffers: an allowance."""
REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default reduce_bucket_size (deepspeed/runtime/zero/config.py, DeepSpeedZeroConfig.reduce_bucket_size,
5e8 elements): the gradient bucket it fills before a reduce, in the model's dtype."""
HF_ROLLOUT_MAX_BATCH = 256
"""Sequences the in-process engine generates at once (ttrv/rollout/hf.py, HFEngine max_batch_sequences)."""
HEADROOM = 0.9
"""A plan fits when it needs at most this share of the device: the allocator's fragmentation and what the estimate
leaves out take the rest."""


class PlanError(ValueError):
    """The model's config could not be read; the message names the field and the fix."""


# --- the model's shape ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model, from its config."""

    total: int
    vision: int
    """Parameters of the vision tower (frozen with model.trainable: language)."""
    largest_layer: int
    """The most parameters one module holds itself (DeepSpeed's largest_layer_params: the embedding for Qwen)."""
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int = 0
    vision_layers: int = 0
    vision_intermediate: int = 0
    image_token_pixels: int = 0
    """Pixels behind one visual token after merging ((patch × merge)², 784 for Qwen2-VL and Qwen2.5-VL)."""
    lora_targets: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(in, out) features of each language-layer linear a LoRA adapter can target, by module name."""

    @property
    def language(self) -> int:
        return self.total - self.vision

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """Parameters of rank-`rank` LoRA adapters (A: in×r, B: r×out) on `targets` in every language layer."""
        return self.layers * sum(rank * (i + o) for name, (i, o) in self.lora_targets.items() if name in targets)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _text_modules(text: Any) -> tuple[list[int], dict[str, Any]]:
    """Own-parameter counts of the modules of a Qwen2/Llama-style decoder (transformers' modeling_qwen2.py,
    modeling_qwen2_5_vl.py: q/k/v projections with bias where `attention_bias` or Qwen's fixed True, o_proj without,
    SwiGLU MLP without bias, two RMSNorms a layer, a final norm, an untied lm_head)."""
    h = text.hidden_size
    heads = text.num_attention_heads
    kv = _get(text, "num_key_value_heads", default=heads)
    head_dim = _get(text, "head_dim", default=h // heads)
    inter = text.intermediate_size
    vocab = text.vocab_size
    qwen = "qwen2" in str(getattr(text, "model_type", ""))
    qkv_bias = 1 if (qwen or getattr(text, "attention_bias", False)) else 0
    out_bias = 1 if getattr(text, "attention_bias", False) and not qwen else 0
    mlp_bias = 1 if getattr(text, "mlp_bias", False) else 0
    layer = [
        h * heads * head_dim + qkv_bias * heads * head_dim,          # q_proj
        h * kv * head_dim + qkv_bias * kv * head_dim,                # k_proj
        h * kv * head_dim + qkv_bias * kv * head_dim,                # v_proj
        heads * head_dim * h + out_bias * h,                         # o_proj
        h * inter + mlp_bias * inter,                                # gate_proj
        h * inter + mlp_bias * inter,                                # up_proj
        inter * h + mlp_bias * h,                                    # down_proj
        h, h,                                                        # input / post-attention RMSNorm
    ]
    modules = [vocab * h] + layer * text.num_hidden_layers + [h]
    info = {"hidden": h, "layers": text.num_hidden_layers, "intermediate": inter, "heads": heads, "kv_heads": kv,
            "head_dim": head_dim, "vocab": vocab,
            "lora_targets": {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim),
                             "v_proj": (h, kv * head_dim), "o_proj": (heads * head_dim, h),
                             "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}}
    return modules, info


def _vision_modules(model_type: str, vision: Any) -> tuple[list[int], dict[str, Any]]:
    """Own-parameter counts of the vision tower's modules, as transformers builds them.

    Qwen2.5-VL (modeling_qwen2_5_vl.py): Conv3d patch embedding without bias; per block two RMSNorms, qkv and proj
    with bias, a SwiGLU MLP with bias; the merger's RMSNorm and two linears with bias from hidden·m² to out_hidden.
    Qwen2-VL (modeling_qwen2_vl.py): the same with LayerNorms (weight and bias), a GELU MLP fc1/fc2 of embed_dim ×
    mlp_ratio, and its merger to hidden_size."""
    patch, temporal = vision.patch_size, vision.temporal_patch_size
    channels = _get(vision, "in_channels", "in_chans", default=3)
    merge = vision.spatial_merge_size
    if model_type == "qwen2_5_vl":
        d, inter, out, depth = vision.hidden_size, vision.intermediate_size, vision.out_hidden_size, vision.depth
        block = [d, d, d * 3 * d + 3 * d, d * d + d, d * inter + inter, d * inter + inter, inter * d + d]
        norm = d
    else:
        d, depth, out = vision.embed_dim, vision.depth, vision.hidden_size
        inter = int(d * vision.mlp_ratio)
        block = [2 * d, 2 * d, d * 3 * d + 3 * d, d * d + d, d * inter + inter, inter * d + d]
        norm = 2 * d
    merged = d * merge * merge
    modules = [channels * temporal * patch * patch * d] + block * depth + [norm, merged * merged + merged,
                                                                          merged * out + out]
    info = {"vision_hidden": d, "vision_layers": depth, "vision_intermediate": inter,
            "image_token_pixels": (patch * merge) ** 2}
    return modules, info


def model_shape(config: Any) -> ModelShape:
    """The parameter counts of the model `config` describes (a transformers PretrainedConfig)."""
    model_type = getattr(config, "model_type", "")
    text = getattr(config, "text_config", None) or config
    if model_type in ("qwen2_5_vl", "qwen2_vl") or hasattr(text, "num_hidden_layers") and model_type in (
            "qwen2", "llama", "qwen2_5_vl_text", "qwen2_vl_text", "mistral"):
        modules, info = _text_modules(text)
        tied = bool(_get(config, "tie_word_embeddings", default=False)) or bool(
            getattr(text, "tie_word_embeddings", False))
        if not tied:
            modules.append(info["vocab"] * info["hidden"])
        vision_modules: list[int] = []
        if model_type in ("qwen2_5_vl", "qwen2_vl"):
            vision_modules, vision_info = _vision_modules(model_type, config.vision_config)
            info |= vision_info
        every = modules + vision_modules
        return ModelShape(total=sum(every), vision=sum(vision_modules), largest_layer=max(every), **info)
    return _meta_shape(config)


def _meta_shape(config: Any) -> ModelShape:
    """Another architecture: the model built on torch's meta device (shapes only, no memory) and counted."""
    import torch
    from transformers import AutoModel, AutoModelForImageTextToText

    try:
        with torch.device("meta"):
            try:
                model = AutoModelForImageTextToText.from_config(config)
            except ValueError:
                model = AutoModel.from_config(config)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds for an unknown architecture
        raise PlanError(f"model.path: transformers cannot build model type {config.model_type!r} from its config "
                        f"({error}); give `ttrv plan --model-config` a config transformers knows") from None
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if "visual" in n or "vision" in n)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    text = getattr(config, "text_config", None) or config
    h, heads = text.hidden_size, text.num_attention_heads
    return ModelShape(total=total, vision=vision, largest_layer=largest, hidden=h, layers=text.num_hidden_layers,
                      intermediate=_get(text, "intermediate_size", default=4 * h), heads=heads,
                      kv_heads=_get(text, "num_key_value_heads", default=heads),
                      head_dim=_get(text, "head_dim", default=h // heads), vocab=text.vocab_size)


def load_config(model_path: str, config_path: str | Path | None = None, local_only: bool = False) -> Any:
    """The model's transformers config: from `config_path` (a config.json or its folder) when given, else from
    `model.path` (ttrv://tiny-qwen2vl, a local folder, or a Hugging Face id: its config.json alone is fetched, or
    with `local_only` taken from the local cache only). Weights are never read."""
    from transformers import AutoConfig

    from ttrv.weights import resolve_model

    source = str(config_path) if config_path is not None else resolve_model(model_path)
    source = source.removeprefix("file://")
    if source.startswith("s3://"):
        raise PlanError(f"model.path {model_path!r} is in an object store, which `ttrv plan` does not read; copy its "
                        "config.json here and pass it with --model-config FILE")
    if Path(source).is_file() and Path(source).name != "config.json":
        document = json.loads(Path(source).read_text())
        if "model_type" not in document:
            raise PlanError(f"{source} has no model_type; pass the model's own config.json with --model-config")
        return AutoConfig.for_model(**document)
    if Path(source).is_file():
        source = str(Path(source).parent)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise PlanError(f"model.path {model_path!r}: no config.json could be read ({str(error).splitlines()[0]}); "
                        "pass the model's config.json with --model-config FILE (no weights are needed)") from None


# --- the budget -------------------------------------------------------------------------------------------------

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity ("80Gi", "64G", "1000") in bytes."""
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise PlanError(f"{quantity!r} is not a quantity; write e.g. 80Gi")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    note: str = ""
    model_state: bool = False
    """Part of DeepSpeed's 'model states' (weights, gradients, optimizer), which its estimators cover."""


@dataclass
class Budget:
    """One device's memory: what it holds, line by line, against what it has."""

    device: str
    capacity: int
    lines: list[Line]
    usable: float = HEADROOM
    """Share of `capacity` the lines may take (vLLM's GPU: all of it, its own utilisation share bounds it)."""

    @property
    def total(self) -> int:
        return sum(line.bytes for line in self.lines)

    @property
    def model_states(self) -> int:
        return sum(line.bytes for line in self.lines if line.model_state)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable * self.capacity

    def to_dict(self) -> dict:
        return {"device": self.device, "capacityGiB": _gib(self.capacity), "totalGiB": _gib(self.total),
                "modelStatesGiB": _gib(self.model_states), "fits": self.fits,
                "lines": [{"name": line.name, "GiB": _gib(line.bytes), "note": line.note} for line in self.lines]}


@dataclass
class Plan:
    shape: ModelShape
    trainable: int
    ranks: int
    trainer: Budget
    rollout: Budget | None
    host_offload: int
    """Bytes each trainer node keeps in host memory for the GPUs: optimizer state (ZeRO-Offload) and offloaded
    references."""
    warnings: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.warnings

    @property
    def verdict(self) -> str:
        return "fits" if self.fits else "does not fit"

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "parameters": self.shape.total, "visionParameters": self.shape.vision,
                "trainableParameters": self.trainable, "ranks": self.ranks, "trainer": self.trainer.to_dict(),
                "rollout": self.rollout.to_dict() if self.rollout else None,
                "hostOffloadGiB": _gib(self.host_offload), "warnings": self.warnings}

    def table(self) -> str:
        s = self.shape
        rows = [f"model: {_count(s.total)} parameters ({_count(s.vision)} vision), {_count(self.trainable)} "
                f"trainable; {self.ranks} data-parallel rank(s)"]
        for budget in (self.trainer, self.rollout):
            if budget is None:
                continue
            rows.append(f"{budget.device}: {_gib(budget.total):.2f} of {_gib(budget.capacity):.2f} GiB "
                        f"({'fits' if budget.fits else 'DOES NOT FIT'}; {round(budget.usable * 100)} % usable)")
            width = max(len(line.name) for line in budget.lines)
            for line in budget.lines:
                rows.append(f"  {line.name:<{width}}  {_gib(line.bytes):9.2f} GiB  {line.note}")
        if self.host_offload:
            rows.append(f"host memory per node for what is offloaded: {_gib(self.host_offload):.2f} GiB")
        rows.append(f"verdict: {self.verdict}")
        rows += [f"warning: {w}" for w in self.warnings]
        return "\n".join(rows)


def _count(n: float) -> str:
    """A parameter count for a person: 8.29 B, 862.9 K."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(int(n))


def _gib(value: float) -> float:
    return round(value / GIB, 3)


def image_tokens(shape: ModelShape, max_pixels: int | None) -> int:
    """Visual tokens of one image at most: max_pixels over the pixels behind one merged token."""
    if not shape.image_token_pixels:
        return 0
    return max(1, (max_pixels or 0) // shape.image_token_pixels)


def sequence_tokens(settings: AdaptationSettings, shape: ModelShape) -> int:
    """The longest training sequence: prompt text, its images' tokens at model.maxPixels (the checkpoint's 16384
    tokens where it is null), the longest response."""
    r = settings.rollout
    pixels = settings.model.max_pixels or 16384 * shape.image_token_pixels
    return PROMPT_TEXT_TOKENS + r.limit_mm_per_prompt * image_tokens(shape, pixels) + r.max_new_tokens


def plan(settings: AdaptationSettings, config: Any, colocated: bool = False) -> Plan:
    """The memory budget of one trainer rank (and one rollout GPU) for `settings` on the model `config` describes.
    `colocated`: vLLM shares the trainer's GPU (`ttrv run` with rollout.backend service on one machine) rather than
    running on the rollout service's own GPUs."""
    shape = model_shape(config)
    res, model, rollout, grpo = settings.resources, settings.model, settings.rollout, settings.grpo
    gpu = res.gpus_per_node > 0
    ranks = res.nodes * res.nproc_per_node
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(model.dtype, 2 if gpu else 4)
    mixed = dtype_bytes < 4
    stage = res.zero_stage
    offload = res.offload_optimizer and stage > 0
    if model.lora is not None:
        trainable = shape.lora_params(model.lora.rank, model.lora.target_modules)
    else:
        trainable = shape.total if model.trainable == "all" else shape.language
    P, T, b = shape.total, trainable, dtype_bytes
    lines: list[Line] = []

    weights = b * P / ranks if stage == 3 else b * P
    lines.append(Line("policy weights", int(weights), f"{b} bytes × {_count(P)}" +
                      (f" / {ranks} ranks (ZeRO-3)" if stage == 3 else ""), True))
    if stage == 3:
        lines.append(Line("ZeRO-3 gathered layer", 4 * shape.largest_layer,
                          f"4 bytes × largest layer {shape.largest_layer / 1e6:.0f} M (DeepSpeed's allowance)", True))
    # Gradients: the working ones in the model's dtype and DeepSpeed's fp32 copy, partitioned as the stage says.
    grad16 = b * T if mixed and stage < 3 else 0
    grad32 = 4 * T
    if stage >= 2:
        grad16 /= ranks
    if stage >= 1:
        grad32 /= ranks
    if offload:
        grad32 = 0
        if stage >= 2:
            grad16 = 0
    lines.append(Line("gradients", int(grad16 + grad32), _grad_note(stage, offload, mixed, T), True))
    optimizer = (12 if mixed else 8) * T / (ranks if stage >= 1 else 1)
    host_offload = 0
    if offload:
        host_offload = int(optimizer + 4 * T / ranks) * res.nproc_per_node
        optimizer = 0
    lines.append(Line("optimizer (AdamW)", int(optimizer),
                      "offloaded to host memory" if offload else
                      f"{'fp32 master + ' if mixed else ''}2 moments of {_count(T)} trainable"
                      + (f" / {ranks} ranks" if stage >= 1 else ""), True))
    reference = model.lora is None and grpo.kl_coef > 0
    reference_line = len(lines)

    # Activations of one micro-batch: what autograd keeps per token and layer, with sdpa or flash attention (no
    # L×L scores; eager attention needs more). Frozen towers keep none: nothing in them requires a gradient.
    # Under grpo.microBatchTokens a micro-batch's padded tokens stay within the budget (a longer sequence alone:
    # ttrv/policy.py, pack_micro_batches), however many sequences that is.
    tokens_per_seq = sequence_tokens(settings, shape)
    per_rank = math.ceil(grpo.prompts_per_step * rollout.group_size / ranks)
    micro = min(grpo.micro_batch_size, max(1, per_rank))
    tokens = micro * tokens_per_seq
    budget = grpo.micro_batch_tokens
    budgeted = budget is not None and tokens > max(budget, tokens_per_seq)
    if budgeted:
        tokens = max(budget, tokens_per_seq)
    kvd = shape.kv_heads * shape.head_dim
    per_layer = b * (6 * shape.hidden + 2 * kvd + 4 * shape.intermediate) + 2 * 4 * shape.hidden
    if res.gradient_checkpointing:
        activations = tokens * (shape.layers * b * shape.hidden + per_layer)
        how = "checkpointed: each layer's input, one layer recomputed"
    else:
        activations = tokens * shape.layers * per_layer
        how = "every layer's saved tensors (gradient checkpointing off)"
    if model.trainable == "all" and model.lora is None and shape.vision_layers:
        patches = micro * rollout.limit_mm_per_prompt * image_tokens(shape, model.max_pixels) * 4
        if budgeted:  # the images scale with the sequences the token budget lets in (the text is counted so above)
            patches = patches * tokens // (micro * tokens_per_seq)
        d, i = shape.vision_hidden, shape.vision_intermediate
        vision_layer = b * (6 * d + 4 * i) + 2 * 4 * d
        activations += patches * (b * d * shape.vision_layers + vision_layer if res.gradient_checkpointing
                                  else shape.vision_layers * vision_layer)
    lines.append(Line("activations (estimate)", int(activations),
                      (f"{tokens} tokens (grpo.microBatchTokens) of sequences up to {tokens_per_seq}"
                       if budgeted else f"{micro} sequences × {tokens_per_seq} tokens") + f", {how}"))
    # The learner asks for logits from the first response position on only, and casts them to fp32 in chunks
    # (ttrv/policy.py, token_log_probs); in training every chunk's fp32 copy is kept for the backward pass.
    response = micro * rollout.max_new_tokens
    if budget is not None:
        response = min(response, max(budget, rollout.max_new_tokens))
    lines.append(Line("logits (estimate)", int(response * shape.vocab * (b + 4)),
                      (f"{response} response positions within grpo.microBatchTokens" if response < micro *
                       rollout.max_new_tokens else f"[{micro}, {rollout.max_new_tokens}] response positions")
                      + f" × {shape.vocab}, in the model's dtype and in fp32"))
    if reference:
        if res.offload_reference:
            # in host memory but for its own pass, which runs without gradients: no activations or training
            # logits are held then, so on the GPU it needs only what they leave free
            held = max(0, b * P - int(activations) - int(response * shape.vocab * (b + 4)))
            lines.insert(reference_line, Line("reference model", held, f"offloaded (resources.offloadReference): "
                                              f"{_gib(b * P):.1f} GiB on the GPU only for its pass, in room the "
                                              "activations leave"))
        else:
            lines.insert(reference_line, Line("reference model", b * P,
                                              "a frozen full copy for the KL term (grpo.klCoef > 0)"))
    lines.append(Line("buffers", int((CONTEXT_BYTES if gpu else 0) + (REDUCE_BUCKET_ELEMENTS * b if stage > 0 else 0)),
                      ("CUDA context and NCCL (allowance), " if gpu else "") +
                      ("DeepSpeed's reduce bucket" if stage > 0 else "")))

    kv_per_token = 2 * shape.layers * kvd * b
    longest = rollout_model_len(settings, config)
    if rollout.backend == "inprocess":
        sequences = min(HF_ROLLOUT_MAX_BATCH, math.ceil(grpo.prompts_per_step / ranks) * rollout.votes)
        lines.append(Line("in-process rollout: model copy", b * P, "the Hugging Face engine's own weights"))
        lines.append(Line("in-process rollout: KV cache", int(sequences * longest * kv_per_token),
                          f"{sequences} sequences × {longest} tokens"))

    device = "trainer GPU" if gpu else "trainer CPU (resources.memory)"
    capacity = quantity_bytes(res.gpu_memory) if gpu else quantity_bytes(res.memory)
    rollout_budget = None
    if rollout.backend == "service" and (res.rollout_gpus > 0 or colocated) and gpu:
        share = int(res.rollout_gpu_memory_utilization * quantity_bytes(res.gpu_memory))
        tp = max(1, res.rollout_gpus)
        vllm_weights = b * P // (1 if colocated else tp)
        kv_room = share - vllm_weights - CONTEXT_BYTES
        vllm_lines = [Line("vLLM weights", vllm_weights, f"{b} bytes × {_count(P)}" +
                           ("" if colocated else f" / tensor-parallel {tp}")),
                      Line("vLLM KV cache and activations", max(0, kv_room),
                           f"the rest of rolloutGpuMemoryUtilization {res.rollout_gpu_memory_utilization}"),
                      Line("vLLM context", CONTEXT_BYTES, "allowance")]
        if colocated:
            lines.append(Line("vLLM on this GPU", share, f"rolloutGpuMemoryUtilization × gpuMemory ({share / GIB:.1f} "
                                                          "GiB: weights, KV cache)"))
        else:
            rollout_budget = Budget("rollout GPU", quantity_bytes(res.gpu_memory), vllm_lines, usable=1.0)
        seqs_fit = kv_room * (1 if colocated else tp) / (kv_per_token * longest) if kv_room > 0 else 0
    trainer = Budget(device, capacity, lines)
    if reference and res.offload_reference:
        host_offload += b * P * res.nproc_per_node
    result = Plan(shape, trainable, ranks, trainer, rollout_budget, host_offload)
    _warn(result, settings, gpu, offload, colocated)
    if gpu and host_offload > quantity_bytes(res.memory):
        result.warnings.append(
            f"what is offloaded needs {_gib(host_offload):.1f} GiB of host memory per node, more than "
            f"resources.memory {res.memory}: raise resources.memory, or offload less (offloadReference, "
            "offloadOptimizer)")
    if rollout.backend == "service" and gpu and (res.rollout_gpus > 0 or colocated):
        if seqs_fit < 1:
            result.warnings.append(
                f"vLLM has no room for one {longest}-token sequence's KV cache: raise "
                "resources.rolloutGpuMemoryUtilization or resources.rolloutGpus, or lower rollout.maxModelLen")
        elif rollout.max_num_seqs > seqs_fit:
            result.warnings.append(
                f"vLLM's KV cache holds about {int(seqs_fit)} sequences of {longest} tokens, fewer than "
                f"rollout.maxNumSeqs {rollout.max_num_seqs}: vLLM will preempt and recompute; lower maxNumSeqs or "
                "maxModelLen, or give the rollout more GPU memory")
    return result


def rollout_model_len(settings: AdaptationSettings, config: Any) -> int:
    """vLLM's max_model_len as `vllm_flags` passes it, or where it passes none, the checkpoint's own
    (max_position_embeddings), which vLLM then takes."""
    from ttrv.rollout.vllm_process import model_len

    length = model_len(settings)
    if length is None:
        text = getattr(config, "text_config", None) or config
        length = _get(text, "max_position_embeddings", default=32768)
    return length


def _grad_note(stage: int, offload: bool, mixed: bool, T: int) -> str:
    if offload:
        return "reduced in buckets and offloaded with the optimizer" if stage >= 2 else \
            "16-bit gradients whole on every rank; fp32 copy offloaded"
    parts = {0: "whole on every rank", 1: "16-bit whole, fp32 partitioned", 2: "partitioned over the ranks",
             3: "fp32 partition only (stage3.py grad_partitions_flat_buffer)"}
    return f"{_count(T)} trainable, {parts[stage]}" + ("" if mixed else " (fp32 model)")


def _warn(result: Plan, settings: AdaptationSettings, gpu: bool, offload: bool, colocated: bool) -> None:
    trainer, res = result.trainer, settings.resources
    if trainer.fits:
        return
    need, have = _gib(trainer.total), _gib(HEADROOM * trainer.capacity)
    fixes = []
    by = {line.name: line.bytes for line in trainer.lines}
    if not res.gradient_checkpointing and by.get("activations (estimate)", 0) > 0.1 * trainer.capacity:
        fixes.append("resources.gradientCheckpointing: true (activations)")
    if res.zero_stage < 3 and result.ranks > 1:
        fixes.append("resources.zeroStage: 3 (partitions the weights too)")
    if not offload and gpu:
        fixes.append("resources.offloadOptimizer: true (optimizer state to host memory"
                     + (", with zeroStage >= 1" if res.zero_stage == 0 else "") + ")")
    if by.get("reference model", 0) > 0 and not res.offload_reference:
        fixes.append("resources.offloadReference: true (the reference in host memory between its passes)")
    if settings.model.lora is None:
        fixes.append("model.lora (train adapters: no reference copy, almost no optimizer state)")
    if gpu:
        fixes.append(f"more GPUs (resources.nodes × gpusPerNode, now {result.ranks}) to divide the partitioned state")
    if by.get("logits (estimate)", 0) + by.get("activations (estimate)", 0) > 0.1 * trainer.capacity:
        fixes.append("a smaller grpo.microBatchTokens, grpo.microBatchSize, rollout.maxNewTokens or model.maxPixels")
    if settings.rollout.backend == "inprocess" and gpu:
        fixes.append("rollout.backend: service (vLLM on its own GPUs instead of a third model copy here)")
    if colocated:
        fixes.append("a lower resources.rolloutGpuMemoryUtilization (vLLM's share of this GPU)")
    where = "GPU" if gpu else "the pod's memory (resources.memory)"
    result.warnings.append(f"needs {need:.1f} GiB per {where}, {have:.1f} GiB usable of "
                           f"{_gib(trainer.capacity):.1f}: it will not fit. Fix: " + "; or ".join(fixes))
