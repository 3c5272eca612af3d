"""Loading a vision-language checkpoint and turning data prompts into its inputs.

The trainer, evaluation and the Hugging Face rollout engine all load through here, with the Auto classes that load
Qwen2.5-VL-7B on a GPU; the tiny model of `ttrv.tinymodel` takes the same path. Prompts become chat messages (the
image where the prompt's `<image>` placeholder stood) rendered by the checkpoint's own chat template, so the
trainer and the vLLM rollout service see the same token sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available

from ttrv import log
from ttrv.data import IMAGE_PLACEHOLDER, DataError, Prompt, load_image, placeholder_problem

logger = log.get_logger(__name__)


class _ImageOnly:
    """Writes itself as the checkpoint's standard processor (class name, video entry and image processor type as
    they were), so that a checkpoint saved from it loads in vLLM exactly as the original did."""

    standard_name: str
    checkpoint_config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["processor_class"] = self.standard_name
        original = self.checkpoint_config or {}
        if "video_processor" in original:
            data["video_processor"] = original["video_processor"]
        image_type = (original.get("image_processor") or {}).get("image_processor_type")
        if image_type and isinstance(data.get("image_processor"), dict):
            data["image_processor"]["image_processor_type"] = image_type
        return data


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    """Qwen2VLProcessor without its video slot, for environments without torchvision (see `load_processor`)."""

    standard_name = "Qwen2VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video slot, for environments without torchvision (see `load_processor`)."""

    standard_name = "Qwen2_5_VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


_IMAGE_ONLY = {Qwen2VLProcessor: Qwen2VLImageOnlyProcessor, Qwen2_5_VLProcessor: Qwen2_5_VLImageOnlyProcessor}


def frozen(name: str, trainable: str, model_type: str) -> bool:
    """Whether `model.trainable` freezes the parameter `name` of a `model_type` checkpoint.
    - all: nothing is frozen;
    - language: every vision part (the tower and its projector/merger: names with "visual" or "vision");
    - reference: as the TTRV reference (verl/workers/fsdp_workers.py, Akshit21112002/TTRV): InternVL's vision
      encoder only (its `vision_model`; transformers' -hf conversion calls it `vision_tower`), the projector
      trained; every other family, Qwen-VL included, trains everything."""
    if trainable == "all":
        return False
    if trainable == "language":
        return "visual" in name or "vision" in name
    if trainable == "reference":
        return model_type.startswith("internvl") and ("vision_model" in name or "vision_tower" in name)
    raise ValueError(f"model.trainable: unknown setting {trainable!r}; use language, all or reference")


def torch_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """The parameter dtype for a `model.dtype` setting: auto is bfloat16 on GPU and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"model.dtype {dtype!r} is not one of auto, float32, bfloat16, float16")
    return names[dtype]


def full_numel(param: torch.nn.Parameter) -> int:
    """A parameter's element count, also once ZeRO-3 has partitioned it (its data is then an empty placeholder and
    `ds_numel` the full count: deepspeed/runtime/zero/partition_parameters.py, `_convert_to_deepspeed_param`)."""
    return getattr(param, "ds_numel", param.numel())


def load_model(path: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> PreTrainedModel:
    """The checkpoint's image-text-to-text model (Qwen2.5-VL, Qwen2-VL, ...) on `device`, in eval mode.
    `trust_remote_code` (the spec's model.trustRemoteCode) runs Python code shipped with the checkpoint.

    Each tensor goes straight from the checkpoint to `device`: with a device_map, transformers builds the model on
    the meta device and materialises every tensor read from the safetensors files (memory-mapped) on its mapped
    device (transformers/modeling_utils.py, `_load_pretrained_model`), where loading to CPU and then `.to(device)`
    held a full host copy per rank first. Under a live ZeRO-3 config (`ttrv.learner.load_policy`) transformers
    refuses a device_map and partitions the model itself."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=torch_dtype(dtype, device), attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code, device_map=None if zero3 else {"": torch.device(device)},
    )
    logger.info("model.loaded", path=str(path), architecture=type(model).__name__, dtype=str(model.dtype),
                device=str(device), parameters=sum(full_numel(p) for p in model.parameters()),
                zero3=zero3)
    return (model if zero3 else model.to(device)).eval()


def _processor_class(path: str | Path, config) -> type | None:
    """The processor class the checkpoint names (processor_config.json's processor_class, which a checkpoint with
    its own config class also names), else the one transformers maps its config type to."""
    try:
        named = ProcessorMixin.get_processor_dict(str(path))[0].get("processor_class")
    except (OSError, ValueError):
        named = None
    return {cls.__name__: cls for cls in _IMAGE_ONLY}.get(named) or PROCESSOR_MAPPING.get(type(config), None)


REMOTE_CODE_FIX = ("the checkpoint ships its own Python code (auto_map in config.json). Use its transformers-native "
                   "conversion where there is one (InternVL3: OpenGVLab/InternVL3-2B-hf), or set "
                   "model.trustRemoteCode: true if you trust its authors: that code runs in the trainer and the "
                   "rollout service with their credentials")


def load_config(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's config. A checkpoint with remote code and trust_remote_code off is refused by transformers
    (its dynamic_module_utils asks for trust_remote_code=True); the message then names the spec field."""
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error) and not trust_remote_code:
            raise ValueError(f"{path}: {REMOTE_CODE_FIX}") from None
        raise


def load_processor(path: str | Path, trust_remote_code: bool = False, max_pixels: int | None = None) -> ProcessorMixin:
    """The checkpoint's processor (tokenizer, image processor, chat template) through AutoProcessor.

    Qwen-VL processors insist on a video processor, and transformers' video processors need torchvision. Where
    torchvision is absent (CPU machines: PyPI's torchvision is a CUDA build that cannot load beside the CPU torch),
    a Qwen2-VL / Qwen2.5-VL processor is swapped for its image-only twin; the files are the same, ttrv never sends
    videos, and tokenisation and image preprocessing are unchanged. Other processors load through AutoProcessor.

    `max_pixels` (the spec's model.maxPixels) caps the image size exactly as the vLLM rollout does (`cap_pixels`).

    Raises ValueError for a folder that is no image-text-to-text checkpoint, or whose tokenizer does not know the
    processor's image token: transformers builds an empty tokenizer when the tokenizer files are missing, and the
    first prompt would fail deep inside the processor."""
    config = load_config(path, trust_remote_code)
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING and not trust_remote_code:
        raise ValueError(f"{path}: model_type {config.model_type!r} is not an image-text-to-text architecture "
                         "(e.g. qwen2_5_vl, qwen2_vl, internvl, llava)")
    image_only = None if is_torchvision_available() else _IMAGE_ONLY.get(_processor_class(path, config))
    if image_only is not None:
        processor = image_only.from_pretrained(str(path))
        processor.checkpoint_config = ProcessorMixin.get_processor_dict(str(path))[0]
    else:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    image_token = getattr(processor, "image_token", None)
    if image_token is not None and image_token not in processor.tokenizer.get_vocab():
        raise ValueError(f"{path}: the tokenizer has no {image_token} token (tokenizer.json / tokenizer_config.json "
                         "missing or from another model)")
    if max_pixels is not None and not cap_pixels(processor, max_pixels):
        logger.warning("model.max_pixels_not_applied", path=str(path), processor=type(processor).__name__,
                       reason="its image processor has no pixel-count size (size.longest_edge)")
    return processor


def cap_pixels(processor: ProcessorMixin, max_pixels: int) -> bool:
    """Resize every image to at most `max_pixels`, as vLLM does with --mm-processor-kwargs {"max_pixels": N}
    (`ttrv.rollout.vllm_process.vllm_flags`), so the trainer re-encodes a prompt into the same image tokens the
    rollout sampled from. vLLM passes the kwarg to the Hugging Face processor's call, after completing it with
    its alias size["longest_edge"] (vllm/model_executor/models/qwen2_vl.py, `_complete_mm_processor_size_aliases`
    and `_get_vision_size`; vllm/multimodal/processing/context.py, `call_hf_processor`), and the Qwen-VL image
    processors resize to smart_resize(..., max_pixels=size["longest_edge"])
    (transformers/models/qwen2_vl/image_processing_qwen2_vl.py, whose __init__ maps max_pixels onto the same key).
    Setting that key on the image processor is the same cap for every later call. Returns False, changing
    nothing, for an image processor without Qwen-VL's pixel-count sizing (LLaVA's, InternVL's resize to a fixed
    size or tiles, and vLLM drops the kwarg for them too: `get_allowed_kwarg_only_overrides` keeps only what the
    processor takes)."""
    images = getattr(processor, "image_processor", None)
    size = getattr(images, "size", None)
    keys = set(size) if isinstance(size, dict) else set(vars(size)) if size is not None else set()
    if not {"longest_edge", "shortest_edge"} <= keys:
        return False
    capped = {key: size[key] for key in keys} if isinstance(size, dict) else dict(vars(size))
    capped["longest_edge"] = max_pixels
    images.size = type(size)(**capped) if not isinstance(size, dict) else capped
    return True


def chat_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """One user turn whose content is the prompt's text with an image part where `<image>` stood."""
    if (problem := placeholder_problem(prompt)) is not None:
        raise DataError(f"prompt {prompt.id}: {problem}")
    count = prompt.text.count(IMAGE_PLACEHOLDER)
    before, _, after = prompt.text.partition(IMAGE_PLACEHOLDER)
    parts: list[dict[str, Any]] = [{"type": "text", "text": before}] if before else []
    if count:
        parts.append({"type": "image"})
    if after:
        parts.append({"type": "text", "text": after})
    return [{"role": "user", "content": parts}]


def render_prompt(processor: ProcessorMixin, prompt: Prompt) -> str:
    """The prompt as the chat template renders it, ending with the assistant turn's opening."""
    return processor.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=False)


PER_TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")
"""Processor outputs with one entry per token beside input_ids and attention_mask (padded with 0 like the ids);
every other output is per image."""


def model_inputs(processor: ProcessorMixin, prompts: list[Prompt], padding_side: str = "left") -> BatchFeature:
    """A padded batch (input_ids, attention_mask, pixel_values, image_grid_thw, ...) for `prompts`; left padding
    by default so that generation continues every row at the same position."""
    texts = [render_prompt(processor, p) for p in prompts]
    # each file decoded once, however many rows repeat its prompt (a rollout repeats it once per vote)
    decoded = {path: load_image(path) for path in dict.fromkeys(p.image_path for p in prompts) if path is not None}
    images = [decoded[p.image_path] for p in prompts if p.image_path is not None]
    if images and len(images) != len(prompts):
        raise DataError("a batch mixes prompts with and without images; batch them separately")
    return processor(text=texts, images=images or None, padding=True, padding_side=padding_side,
                     return_tensors="pt")
