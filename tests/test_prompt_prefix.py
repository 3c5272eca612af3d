"""The Hugging Face engine computes a prompt's prefix once for its n votes (its KV cache copied n times) instead of
once per vote. The votes must be exactly those of the prompt repeated n times through transformers' own generate:
the same tokens, the same log-probs. Checked on the bundled tiny Qwen2.5-VL (3-D rotary positions, whose per-prompt
offsets must follow the copies), with image and text-only prompts in turn (a former batch's offsets must not leak),
and on a tiny LLaVA built offline (1-D positions, one pixel_values row per image)."""

from __future__ import annotations

import pytest
import torch
from test_policy_batches import llava
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from ttrv import benchmark
from ttrv.data import Prompt, read_dataset
from ttrv.modeling import load_model, load_processor, model_inputs
from ttrv.rollout.base import sample_seed
from ttrv.rollout.hf import HFEngine, RowSampler
from ttrv.weights import resolve_model

VOTES = 6
TOKENS = 5


def repeated(engine: HFEngine, prompts: list[Prompt], seed: int):
    """Token ids and log-probs of each prompt's votes, every prompt repeated VOTES times (no shared prefix)."""
    rows = [p for p in prompts for _ in range(VOTES)]
    inputs = model_inputs(engine.processor, rows)
    sampler = RowSampler([sample_seed(seed, p.id, k) for p in prompts for k in range(VOTES)], 1.0, 1.0)
    with torch.no_grad():
        out = engine._generate_rows(inputs, sampler, TOKENS, None)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(sampler.logprobs, dim=1)


def assert_same_votes(engine: HFEngine, prompts: list[Prompt], seed: int) -> None:
    tokens, logprobs = repeated(engine, prompts, seed)
    votes = [s for votes in engine.generate(prompts, VOTES, 1.0, 1.0, TOKENS, seed=seed) for s in votes]
    for row, sample in enumerate(votes):
        length = len(sample.token_ids)
        assert list(sample.token_ids) == tokens[row, :length].tolist(), row
        assert torch.allclose(torch.tensor(sample.logprobs), logprobs[row, :length], atol=1e-4), row
    assert any(len(set(s.token_ids for s in votes[i:i + VOTES])) > 1 for i in range(0, len(votes), VOTES))


def shapes(count: int) -> list[Prompt]:
    return [e.prompt for e in read_dataset(benchmark.resolve("ttrv://tiny-shapes/test")).examples[:count]]


TEXT_ONLY = [Prompt(id="text-a", text="Which letter comes after A?\nA. B\nB. C", image_path=None),
             Prompt(id="text-b", text="Name a shape.", image_path=None)]


def test_qwen_votes_from_a_shared_prefix_are_the_repeated_prompts_votes():
    path = resolve_model("ttrv://tiny-qwen2vl")
    engine = HFEngine(load_model(path), load_processor(path))
    for seed, prompts in enumerate([shapes(3), TEXT_ONLY, shapes(2)]):  # image, text-only after image, image again
        assert_same_votes(engine, prompts, seed)
    engine.shares_prefix = False  # a model whose forward takes no cache: each prompt repeated, the same votes
    assert_same_votes(engine, shapes(2), 5)


@pytest.fixture(scope="module")
def tiny_llava():
    processor = llava()
    processor.num_additional_image_tokens = 1  # CLIP's CLS token, which the "default" strategy then drops
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return HFEngine(model, processor)


def test_llava_votes_from_a_shared_prefix_are_the_repeated_prompts_votes(tiny_llava):
    for seed, prompts in enumerate([shapes(3), TEXT_ONLY]):
        assert_same_votes(tiny_llava, prompts, seed)
