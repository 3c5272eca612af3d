"""The in-process Hugging Face rollout engine: batched sampling with the KV cache, all N votes of several prompts
in one `generate` call. Used for local runs and as the rollout service's backend where vLLM is not installed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ttrv.data import Prompt
from ttrv.modeling import model_inputs
from ttrv.rollout.base import Sample

VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class HFEngine:
    """Samples from its own copy of the model. `load_version` replaces its weights with a version from the weight
    store (`load_weights(step) -> (kind, tensors)`), exactly as a separate service would."""

    def __init__(self, model, processor, load_weights: Callable[[int], dict] | None = None,
                 max_batch_sequences: int = 256):
        self.model = model.eval()
        self.processor = processor
        self.load_weights = load_weights
        self.max_batch_sequences = max_batch_sequences
        self.weight_version: int | None = None
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(_as_list(model.generation_config.eos_token_id)) or {tokenizer.eos_token_id}
        # a sampled image/video placeholder would make the response unscorable (the model then expects pixels)
        self.suppress = [i for i in (getattr(model.config, name, None) for name in VISION_TOKEN_FIELDS)
                         if i is not None]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], n: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[Sample]]:
        greedy = temperature == 0
        if greedy and n != 1:
            raise ValueError("greedy decoding (temperature 0) gives one answer per prompt; set n=1")
        per_call = max(1, self.max_batch_sequences // n)
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), per_call):
            results.extend(self._generate_chunk(prompts[start : start + per_call], n, temperature, top_p,
                                                max_new_tokens))
        return results

    def _generate_chunk(self, prompts, n, temperature, top_p, max_new_tokens) -> list[list[Sample]]:
        tokenizer = self.processor.tokenizer
        inputs = model_inputs(self.processor, list(prompts)).to(self.model.device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(
            **inputs, **sampling, max_new_tokens=max_new_tokens, num_return_sequences=n,
            return_dict_in_generate=True, output_scores=True, pad_token_id=self.pad_id,
            suppress_tokens=self.suppress or None,
        )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        # the sampler's log-prob of each chosen token under its processed (temperature, top-p) distribution
        scores = torch.stack(out.scores, dim=1).float().log_softmax(-1)
        chosen = scores.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, logprob_row in zip(new_tokens.tolist(), chosen.tolist()):
            length = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))
            ids = tuple(row[:length])
            samples.append(Sample(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids,
                                  tuple(logprob_row[:length])))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def load_version(self, step: int) -> None:
        if self.load_weights is None:
            raise RuntimeError("this engine has no weight store to load versions from")
        self.load_tensors(step, self.load_weights(step))

    def load_tensors(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """Serve `tensors` (a subset of the model's state, under its names) as weight version `step`. Checked
        before anything is copied, so a version that does not fit leaves the served weights as they were."""
        state = self.model.state_dict()
        missing = set(tensors) - set(state)
        if missing:
            raise ValueError(f"weight version {step} has tensors the model lacks: {sorted(missing)[:3]}")
        misshapen = sorted(name for name, tensor in tensors.items() if tensor.shape != state[name].shape)
        if misshapen:
            name = misshapen[0]
            raise ValueError(f"weight version {step}: {len(misshapen)} tensors do not fit the model, e.g. {name} "
                             f"{tuple(tensors[name].shape)} vs {tuple(state[name].shape)}")
        self.model.load_state_dict(tensors, strict=False)
        self.weight_version = step

    def close(self) -> None:
        self.model = None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
