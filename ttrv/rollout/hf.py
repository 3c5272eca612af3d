"""The in-process Hugging Face rollout engine: batched sampling with the KV cache, all N votes of several prompts
in one `generate` call, each prompt's prefix computed once for its N votes (as vLLM's prefix caching does). Used for
local runs and as the rollout service's serving engine where vLLM is not installed."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from ttrv.data import Prompt
from ttrv.modeling import PER_TOKEN_KEYS, model_inputs
from ttrv.rollout.base import Sample, sample_seed
from ttrv.store.errors import StoreConfigError
from ttrv.weights import merge_lora

if TYPE_CHECKING:
    from ttrv.spec import LoraSpec

VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


class HFEngine:
    """Samples from its own copy of the model. `load_version` replaces its weights with a version from the weight
    store (`load_weights(step) -> (kind, tensors)`), exactly as a separate service would."""

    def __init__(self, model, processor, load_weights: Callable[[int], dict] | None = None,
                 max_batch_sequences: int = 256, update_weights: Callable[[int, dict], list] | None = None):
        self.model = model.eval()
        self.processor = processor
        self.load_weights = load_weights
        self.update_weights = update_weights
        """Store.update_weights, when given: versions are written into the model's tensors in place, a delta only
        where it changes them (full weights only: a LoRA version is merged, so it goes through load_weights)."""
        self._targets: dict | None = None
        self.max_batch_sequences = max_batch_sequences
        self.weight_version: int | None = None
        self.row_adapters: Callable[[list[str]], AbstractContextManager] | None = None
        """Given each row's adapter name, a context in which the model applies them (the shared service's)."""
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        source = model.generation_config
        self.eos_ids = set(_as_list(source.eos_token_id)) or {tokenizer.eos_token_id}
        # Sample from exactly the distribution the trainer scores, softmax(logits / T) (policy.token_log_probs), as
        # the vLLM path does with chat.NEUTRAL_SAMPLING: a checkpoint's generation_config (repetition_penalty,
        # no_repeat_ngram_size, bad words, ...) shaped the votes here, and at repetition_penalty 1.05 the sampler's
        # and the trainer's log-probs of the same tokens were 0.27 nats apart. transformers fills every generate()
        # argument left None from model.generation_config (generation/utils.py, _prepare_generation_config), so the
        # engine's model keeps only the ids that start, end and pad a sequence.
        model.generation_config = GenerationConfig(bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id,
                                                   pad_token_id=source.pad_token_id)
        # a sampled image/video placeholder would make the response unscorable (the model then expects pixels)
        self.suppress = [i for i in (getattr(model.config, name, None) for name in VISION_TOKEN_FIELDS)
                         if i is not None]
        self._forward_params = set(inspect.signature(model.forward).parameters)
        self.shares_prefix = "past_key_values" in self._forward_params
        """A prompt's prefix is computed once for its votes where the model's forward takes a cache (every
        transformers model; a remote-code model may not)."""

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int | None = None,
                 stop: Callable[[], bool] | None = None,
                 adapters: Sequence[str] | None = None) -> list[list[Sample]] | None:
        """`stop`: asked before each chunk of prompts and at each new token; once it answers True nothing further
        is sampled and the call returns None (the rollout service's clients all went away). `adapters`: the LoRA
        adapter of each prompt, "__base__" for the base model, where `row_adapters` serves several (the shared rollout
        service, ttrv.rollout.shared.MultiLora); every vote of a prompt is sampled with that prompt's adapter."""
        greedy = temperature == 0
        if greedy and n != 1:
            raise ValueError("greedy decoding (temperature 0) gives one answer per prompt; set n=1")
        per_call = max(1, self.max_batch_sequences // n)
        results: list[list[Sample]] = []
        for start in range(0, len(prompts), per_call):
            if stop is not None and stop():
                return None
            chunk_adapters = adapters[start : start + per_call] if adapters is not None else None
            results.extend(self._generate_chunk(prompts[start : start + per_call], n, temperature, top_p,
                                                max_new_tokens, seed, stop, chunk_adapters))
        return None if stop is not None and stop() else results

    def _generate_chunk(self, prompts, n, temperature, top_p, max_new_tokens, seed, stop=None,
                        adapters=None) -> list[list[Sample]]:
        sampler = None
        if temperature > 0:
            seeds = [sample_seed(seed, p.id, k) if seed is not None else None for p in prompts for k in range(n)]
            sampler = RowSampler(seeds, temperature, top_p)
        if adapters is not None and self.row_adapters is None:
            raise ValueError("adapters: this engine serves one set of weights; it has no row_adapters")
        share = n > 1 and self.shares_prefix
        repeated = [p for p in prompts for _ in range(n)]
        inputs = model_inputs(self.processor, prompts if share else repeated).to(self.model.device)
        if share and inputs["input_ids"].shape[1] < 2:  # no prefix before the last token (no chat template does this)
            share, inputs = False, model_inputs(self.processor, repeated).to(self.model.device)
        cache = None
        if share:
            # the n votes of a prompt share its prompt: its prefix is computed once and its cache copied n times
            with self._adapter_rows(adapters):
                cache = self._prefill(inputs)
            cache.batch_repeat_interleave(n)
            self._repeat_rope_deltas(len(prompts), n)
            inputs = {key: inputs[key].repeat_interleave(n, dim=0) for key in ("input_ids", "attention_mask")}
        # else each prompt is repeated n times (greedy decoding, which takes RowSampler's draw, has no
        # num_return_sequences)
        with self._adapter_rows(None if adapters is None else [a for a in adapters for _ in range(n)]):
            out = self._generate_rows(inputs, sampler, max_new_tokens, stop, cache)
        return self._samples(inputs, out, sampler, prompts, n)

    def _adapter_rows(self, names: list[str] | None) -> AbstractContextManager:
        return self.row_adapters(names) if names is not None else nullcontext()

    def _prefill(self, inputs) -> DynamicCache:
        """The KV cache of every prompt token but the last (one row per prompt): `generate` continues from it with
        the last token, so the first sampled token's logits are computed as without a cache. The last token is
        text (the chat template's assistant header), so no image is needed after this.

        The positions are the ones generate itself gives a prompt (GenerationMixin.generate calls
        `_prepare_position_ids_for_generation` when none are passed, transformers generation/utils.py): from the
        attention mask, so left padding does not shift a row, and for Qwen-VL its 3-D rotary positions, which also
        leave the per-prompt offsets (`rope_deltas`) on the base model. A forward without them counted positions
        from the first column, padding included."""
        base = self.model.base_model
        if hasattr(base, "rope_deltas"):
            base.rope_deltas = None  # a former batch's; this prefill computes its own
        prefix = {key: value[:, :-1] if key in ("input_ids", "attention_mask", *PER_TOKEN_KEYS) else value
                  for key, value in inputs.items()}
        if "position_ids" in self._forward_params:
            prefix["position_ids"] = self.model._prepare_position_ids_for_generation(prefix["input_ids"], prefix)
        if "logits_to_keep" in self._forward_params:
            prefix["logits_to_keep"] = 1  # the prefix's logits are not used
        cache = DynamicCache(config=self.model.config)
        self.model(**prefix, past_key_values=cache, use_cache=True)
        return cache

    def _repeat_rope_deltas(self, prompts: int, n: int) -> None:
        """Qwen-VL's 3-D rotary positions: the prefill leaves one position offset per prompt on the base model
        (`rope_deltas`, transformers models/qwen2_5_vl/modeling_qwen2_5_vl.py compute_3d_position_ids), and generate
        adds it to every row's text positions once a cache exists (_prepare_position_ids_for_generation), so it
        needs one per row: each prompt's repeated n times, in the rows' order."""
        base = self.model.base_model
        deltas = getattr(base, "rope_deltas", None)
        if isinstance(deltas, torch.Tensor) and deltas.shape[0] == prompts:
            base.rope_deltas = deltas.repeat_interleave(n, dim=0)

    def _generate_rows(self, inputs, sampler, max_new_tokens, stop, cache=None):
        return self.model.generate(
            **inputs, do_sample=False, temperature=None, top_p=None, top_k=None,
            logits_processor=LogitsProcessorList([sampler]) if sampler else None,
            max_new_tokens=max_new_tokens, return_dict_in_generate=True,
            output_scores=sampler is None, pad_token_id=self.pad_id, suppress_tokens=self.suppress or None,
            stopping_criteria=StoppingCriteriaList([StopWhen(stop)]) if stop is not None else None,
            past_key_values=cache,
        )

    def _samples(self, inputs, out, sampler, prompts, n) -> list[list[Sample]]:
        tokenizer = self.processor.tokenizer
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
        if sampler is not None:
            chosen = torch.stack(sampler.logprobs, dim=1)
        else:
            chosen = torch.stack(out.scores, dim=1).float().log_softmax(-1).gather(-1, new_tokens.unsqueeze(-1))
            chosen = chosen.squeeze(-1)
        samples = []
        for row, logprob_row in zip(new_tokens.tolist(), chosen.tolist(), strict=False):
            length = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))
            ids = tuple(row[:length])
            samples.append(Sample(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids,
                                  tuple(logprob_row[:length])))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def load_version(self, step: int) -> None:
        if self.update_weights is not None:
            if self._targets is None:  # one dict for the engine's life: the store knows what it last wrote into it
                self._targets = dict(self.model.state_dict())
            try:
                self.update_weights(step, self._targets)
            except StoreConfigError as error:  # nothing was written: the version does not fit the model
                raise ValueError(f"weight version {step}: {error}") from None
            self.weight_version = step
            return
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


def lora_merger(model, lora: LoraSpec | None) -> Callable[[dict], dict] | None:
    """How a Hugging Face engine serves a LoRA version (model.lora; None without): the adapter's tensors (peft's)
    merged into a copy of the model's weights taken now, the base, so that each version replaces the one before
    instead of adding to it. The merged weights come back under the model's names, for `HFEngine.load_tensors`."""
    if lora is None:
        return None
    base = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    scale = lora.alpha / lora.rank
    return lambda adapter: merge_lora(base, adapter, scale)


class StopWhen(StoppingCriteria):
    """Ends generation for every row once `stop()` answers True (transformers asks after each new token:
    generation/utils.py, _sample, `unfinished_sequences & ~stopping_criteria(...)`)."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop(), dtype=torch.bool, device=input_ids.device)


class RowSampler(LogitsProcessor):
    """Temperature and nucleus sampling with one generator per row (seeded per prompt and vote), so a prompt's
    votes do not depend on what else shares the batch. The drawn token becomes the only finite logit and greedy
    decoding takes it; the sampling distribution's log-prob of each drawn token is kept."""

    def __init__(self, seeds: list[int | None], temperature: float, top_p: float):
        self.generators = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            outside = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) >= self.top_p
            logits = logits.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        log_probs = logits.log_softmax(-1)
        probs = log_probs.exp().cpu()
        tokens = torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)])
        tokens = tokens.to(scores.device)
        self.logprobs.append(log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).cpu())
        return torch.full_like(scores, float("-inf")).scatter(-1, tokens.unsqueeze(-1), 0.0)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
