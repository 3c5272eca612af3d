"""What travels from the learner to a rollout engine: where a model checkpoint comes from, and how an engine
without native LoRA support (the in-process Hugging Face engine) applies a published adapter."""

from __future__ import annotations

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
BUNDLED = {"ttrv://tiny-qwen2vl": ASSETS / "tiny-qwen2vl"}
PEFT_PREFIX = "base_model.model."


def resolve_model(path: str) -> str:
    """ttrv://tiny-qwen2vl -> the checkpoint folder shipped in the package; other paths are returned unchanged
    (a local folder, or a hub id that transformers resolves from its cache)."""
    if path.startswith("ttrv://"):
        if path not in BUNDLED:
            raise ValueError(f"model.path: unknown bundled model {path!r}; known: {sorted(BUNDLED)}")
        return str(BUNDLED[path])
    return path


def merge_lora(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """W = W0 + scale * B @ A for every adapted linear layer (scale = alpha / rank); returns only the merged
    weights, under the base checkpoint's names. Adapter keys are peft's ("base_model.model.<path>.lora_A.weight")."""
    merged = {}
    for key, lora_a in adapter.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        lora_b = adapter.get(f"{PEFT_PREFIX}{module}.lora_B.weight")
        weight = base.get(f"{module}.weight")
        if lora_b is None or weight is None:
            raise ValueError(f"LoRA adapter entry {key!r} has no lora_B or no base weight {module}.weight")
        delta = (lora_b.float() @ lora_a.float()) * scale
        merged[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged
