"""The votes come from the distribution the trainer scores: the in-process engine's log-probs of its own samples
equal the trainer's (policy.token_log_probs) within 1e-4, also for a checkpoint whose generation_config carries a
repetition penalty and a no-repeat n-gram rule, which the engine applied while the trainer did not (0.27 nats apart
at repetition_penalty 1.05; issue 16, item 6). The vLLM path sends chat.NEUTRAL_SAMPLING with every request for the
same reason; its engine is tested in tests/test_rollout_service_vllm.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ttrv import benchmark
from ttrv.data import read_dataset, require_images
from ttrv.modeling import load_model, load_processor
from ttrv.policy import PromptEncoder, collate, token_log_probs
from ttrv.rollout.hf import HFEngine
from ttrv.weights import resolve_model


@pytest.mark.parametrize("generation_config", [{}, {"repetition_penalty": 1.05, "no_repeat_ngram_size": 2}])
def test_sampler_and_trainer_log_probs_agree(tmp_path, generation_config):
    checkpoint = tmp_path / "model"
    shutil.copytree(resolve_model("ttrv://tiny-qwen2vl"), checkpoint)
    config_file = checkpoint / "generation_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | generation_config))

    engine = HFEngine(load_model(str(checkpoint)), load_processor(str(checkpoint)))
    trainer_model, processor = load_model(str(checkpoint)), load_processor(str(checkpoint))
    prompts = [e.prompt for e in
               require_images(read_dataset(benchmark.resolve("ttrv://tiny-shapes/test"), "auto", None)).examples[:3]]
    temperature = 0.9
    samples = engine.generate(prompts, n=4, temperature=temperature, top_p=1.0, max_new_tokens=12, seed=3)

    encoder = PromptEncoder(processor)
    pairs = [(prompt, sample) for prompt, group in zip(prompts, samples, strict=True) for sample in group]
    batch = collate([encoder.encode(p) for p, _ in pairs], [s.token_ids for _, s in pairs],
                    processor.tokenizer.pad_token_id)
    with torch.no_grad():
        scored = token_log_probs(trainer_model.eval(), batch, temperature)
    worst = 0.0
    for row, (_, sample) in enumerate(pairs):
        trained = scored[row][batch.target_mask[row].bool()]
        assert len(trained) == len(sample.logprobs)
        worst = max(worst, (trained - torch.tensor(sample.logprobs)).abs().max().item())
    assert worst < 1e-4, f"sampler and trainer log-probs differ by {worst:.4f} nats"
