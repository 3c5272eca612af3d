"""Every tensor a processor returns reaches each micro-batch of the learner, for processors of several families,
built offline: the bundled tiny Qwen2-VL's, and a LLaVA processor (CLIP image processor, one pixel_values row per
image instead of Qwen's one per patch and no image_grid_thw) over the same tokenizer. Micro-batches used to keep
vision tensors only when the processor returned image_grid_thw, so LLaVA, InternVL-hf, Gemma3 and similar models
were trained without their image while the rollout saw it (issue 16, item 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPImageProcessor, LlavaProcessor

from ttrv import benchmark
from ttrv.data import Prompt, read_dataset, require_images
from ttrv.modeling import frozen, load_model, load_processor
from ttrv.policy import PromptEncoder, collate
from ttrv.weights import resolve_model

pytestmark = pytest.mark.pure

LLAVA_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                  "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def qwen2vl():
    return load_processor(resolve_model("ttrv://tiny-qwen2vl"))


def llava():
    tokenizer = copy.deepcopy(qwen2vl().tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE)


@pytest.mark.parametrize("family", [qwen2vl, llava])
def test_each_micro_batch_carries_exactly_its_sequences_vision_rows(family):
    processor = family()
    examples = require_images(read_dataset(benchmark.resolve("ttrv://tiny-shapes/test"), "auto", None)).examples
    prompts = [e.prompt for e in examples[:3]]
    prompts.insert(1, Prompt(id="text-only", text="Which letter comes after A?\nA. B\nB. C", image_path=None))
    encoder = PromptEncoder(processor, cache=False)
    encoded = [encoder.encode(p) for p in prompts]
    batch = collate(encoded, [[5, 6], [7], [8, 9, 10], [11]], pad_id=0)
    keys = set(encoded[0].vision)
    assert keys and set(batch.vision) == keys  # every key the processor returned

    for start, stop in [(0, 1), (1, 2), (1, 3), (2, 4), (0, 4)]:
        part = batch.select(slice(start, stop))
        with_image = [e for e in encoded[start:stop] if e.vision]
        if not with_image:
            assert part.vision == {}
            continue
        assert set(part.vision) == keys
        for key in keys:
            expected = torch.cat([e.vision[key] for e in with_image])
            assert torch.equal(part.vision[key], expected), (family.__name__, key, start, stop)


@pytest.mark.parametrize(("trainable", "model_type", "name", "is_frozen"), [
    ("language", "qwen2_5_vl", "model.visual.blocks.0.attn.qkv.weight", True),
    ("language", "qwen2_5_vl", "model.visual.merger.mlp.0.weight", True),
    ("language", "qwen2_5_vl", "model.language_model.layers.0.mlp.up_proj.weight", False),
    ("reference", "qwen2_5_vl", "model.visual.blocks.0.attn.qkv.weight", False),  # the reference trains all
    ("reference", "internvl", "model.vision_tower.encoder.layer.0.attention.q_proj.weight", True),
    ("reference", "internvl_chat", "vision_model.encoder.layers.0.attn.qkv.weight", True),
    ("reference", "internvl", "model.multi_modal_projector.linear_1.weight", False),  # mlp1 trains there
    ("all", "internvl", "model.vision_tower.encoder.layer.0.attention.q_proj.weight", False),
])
def test_trainable_presets(trainable, model_type, name, is_frozen):
    """model.trainable: reference freezes what the reference's fsdp_workers.py freezes (InternVL's vision_model)."""
    assert frozen(name, trainable, model_type) is is_frozen


def test_the_tiny_models_parameters_under_each_preset():
    model = load_model(resolve_model("ttrv://tiny-qwen2vl"))
    names = [name for name, _ in model.named_parameters()]
    language = [n for n in names if not frozen(n, "language", model.config.model_type)]
    assert 0 < len(language) < len(names)
    assert all(not frozen(n, "reference", model.config.model_type) for n in names)
