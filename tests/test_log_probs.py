"""The trainer's log-probabilities (ttrv.policy.token_log_probs) on the bundled tiny model: computed from the first
response position on and cast to fp32 a chunk of positions at a time, never as the full fp32 [B, L, V] logits, and
equal to the full computation."""

from __future__ import annotations

import pytest
import torch

from ttrv import benchmark
from ttrv.data import read_dataset, require_images
from ttrv.modeling import load_model, load_processor
from ttrv.policy import PromptEncoder, collate, token_log_probs
from ttrv.weights import resolve_model


def full_log_probs(model, batch, temperature: float = 1.0) -> torch.Tensor:
    """The former computation: every position's logits, cast to fp32 at once."""
    logits = model(**batch.model_inputs()).logits[:, :-1].float() / temperature
    targets = batch.input_ids[:, 1:].unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@pytest.fixture(scope="module")
def tiny():
    path = resolve_model("ttrv://tiny-qwen2vl")
    model = load_model(path)
    model.eval()
    examples = require_images(read_dataset(benchmark.resolve("ttrv://tiny-shapes/test"), "auto", None)).examples
    encoder = PromptEncoder(load_processor(path))
    # responses of different lengths (one empty) after prompts of the batch: ragged ends, right padding
    responses = [[10, 11, 12], [13], [14, 15, 16, 17, 18], [], [19, 20]]
    batch = collate([encoder.encode(e.prompt) for e in examples[:5]], responses, pad_id=46)
    return model, batch


@pytest.mark.parametrize(("temperature", "chunk"), [(1.0, 2), (0.7, 3), (1.0, 1024)])
def test_chunked_response_log_probs_equal_the_full_computation(tiny, temperature, chunk):
    model, batch = tiny
    with torch.no_grad():
        expected = full_log_probs(model, batch, temperature)
        chunked = token_log_probs(model, batch, temperature, chunk=chunk)
    mask = batch.target_mask.bool()
    assert chunked.shape == expected.shape == batch.target_mask.shape
    assert mask.sum() == 11
    torch.testing.assert_close(chunked[mask], expected[mask], rtol=0, atol=1e-5)


def test_logits_are_computed_from_the_first_response_position_only(tiny):
    """The language-model head sees only the positions from the first response token on: the prompt and image
    positions (most of a VLM's sequence) never become logits."""
    model, batch = tiny
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: shapes.append(out.shape))
    try:
        with torch.no_grad():
            token_log_probs(model, batch)
    finally:
        hook.remove()
    first = int(batch.target_mask.any(dim=0).nonzero()[0])
    length = batch.input_ids.shape[1]
    assert shapes == [torch.Size([len(batch), length - first, model.config.get_text_config().vocab_size])]
    assert length - first < length / 2  # the prompts (with their image tokens) are the larger part


def test_gradients_flow_through_the_chunks(tiny):
    model, batch = tiny
    model.zero_grad()
    (token_log_probs(model, batch, chunk=2) * batch.target_mask).sum().backward()
    chunked = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    (full_log_probs(model, batch) * batch.target_mask).sum().backward()
    full = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    assert len(chunked) == len(full) > 0
    for a, b in zip(chunked, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
