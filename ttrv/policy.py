"""From prompts and sampled responses to training tensors, and the log-probabilities the GRPO loss needs.

The trainer re-encodes each prompt with the model's own processor and chat template (exactly what the rollout
engines render) and appends the sampled response token ids, as verl does; so any engine, in-process or a vLLM
service, can produce the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ttrv.data import Prompt, load_image
from ttrv.modeling import PER_TOKEN_KEYS, render_prompt


@dataclass(frozen=True)
class EncodedPrompt:
    input_ids: torch.Tensor  # [L] prompt tokens, image placeholders expanded
    per_token: dict[str, torch.Tensor]  # [L] each, e.g. mm_token_type_ids (Qwen-VL's mrope needs it)
    vision: dict[str, torch.Tensor]  # per-image processor outputs (pixel_values, image_grid_thw, ...)


class PromptEncoder:
    """Renders prompts through the processor's chat template; caches by prompt id (a prompt is encoded once per
    run, however often it is sampled)."""

    def __init__(self, processor, cache: bool = True):
        self.processor = processor
        self._cache: dict[str, EncodedPrompt] | None = {} if cache else None

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        if self._cache is not None and prompt.id in self._cache:
            return self._cache[prompt.id]
        image = load_image(prompt.image_path) if prompt.image_path else None
        out = self.processor(text=[render_prompt(self.processor, prompt)],
                             images=[image] if image is not None else None, return_tensors="pt")
        encoded = EncodedPrompt(
            out["input_ids"][0],
            {k: v[0] for k, v in out.items() if k in PER_TOKEN_KEYS},
            {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", *PER_TOKEN_KEYS)},
        )
        if self._cache is not None:
            self._cache[prompt.id] = encoded
        return encoded


@dataclass
class TrainBatch:
    """Right-padded prompt+response sequences. Targets are shifted by one: `target_mask[b, t]` is 1 where token
    t+1 of sequence b is a response token (the tokens the policy is trained on)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    target_mask: torch.Tensor  # [B, L-1] float
    per_token: dict[str, torch.Tensor]  # [B, L] each
    vision: dict[str, torch.Tensor]  # each: the sequences' blocks concatenated along dim 0
    vision_rows: dict[str, torch.Tensor]  # [B] each: how many dim-0 rows of vision[key] each sequence has

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.per_token, **self.vision}

    def to(self, device) -> TrainBatch:
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return TrainBatch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device),
                          move(self.per_token), move(self.vision), self.vision_rows)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def lengths(self) -> list[int]:
        """Each sequence's tokens (prompt with its image tokens, and response), without the right padding."""
        return self.attention_mask.sum(dim=1).tolist()

    def select(self, rows: slice) -> TrainBatch:
        """A micro-batch, as wide as its longest sequence: the columns of right padding that only longer sequences
        of the batch needed are dropped (a sequence's logits never depend on positions after it), so a micro-batch's
        padded size is its rows times its own longest sequence, which the token budget bounds.

        Every vision tensor the processor returned is sliced by the selected sequences' own rows:
        Qwen-VL's pixel_values have one row per patch and image_grid_thw one per image, LLaVA's and InternVL-hf's
        pixel_values one per image or tile, with image_sizes and the like beside them. (Slicing only when
        image_grid_thw existed trained every other family without its image.)"""
        vision = {}
        for key, tensor in self.vision.items():
            counts = self.vision_rows[key]
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            vision[key] = tensor[offsets[rows.start].item():offsets[rows.stop].item()]
        vision_rows = {key: counts[rows] for key, counts in self.vision_rows.items()}
        vision = {key: tensor for key, tensor in vision.items() if len(tensor)}  # a text-only micro-batch
        mask = self.attention_mask[rows]
        width = int(mask.sum(dim=1).max()) if len(mask) else mask.shape[1]
        per_token = {k: v[rows, :width] for k, v in self.per_token.items()}
        return TrainBatch(self.input_ids[rows, :width], self.attention_mask[rows, :width],
                          self.target_mask[rows, : width - 1], per_token, vision,
                          {key: counts for key, counts in vision_rows.items() if key in vision})


def pack_micro_batches(lengths: Sequence[int], max_rows: int, max_tokens: int | None, start: int = 0) -> list[slice]:
    """Consecutive sequences (row `start` on) packed into micro-batches of at most `max_rows` sequences whose padded
    size, rows x the longest of them (`TrainBatch.select` trims the rest), stays within `max_tokens`
    (grpo.microBatchTokens; None: rows only). A sequence longer than the budget gets a micro-batch of its own: a
    sequence is never split. The order is kept, so without a binding budget these are the fixed-size slices of
    `max_rows`; verl's dynamic batch size (use_dynamic_bsz, ppo_max_token_len_per_gpu) bounds the same padded count.
    The loss is weighted by each micro-batch's share of the step's tokens (`grpo.ttrv_loss`), so how the sequences
    fall into micro-batches does not change the step's loss or gradient."""
    parts: list[slice] = []
    first, longest = start, 0
    for index, length in enumerate(lengths, start):
        wider = max(longest, int(length))
        rows = index - first + 1
        if index > first and (rows > max_rows or (max_tokens is not None and rows * wider > max_tokens)):
            parts.append(slice(first, index))
            first, wider = index, int(length)
        longest = wider
    if len(lengths):
        parts.append(slice(first, start + len(lengths)))
    return parts


def collate(encoded: Sequence[EncodedPrompt], responses: Sequence[Sequence[int]], pad_id: int) -> TrainBatch:
    """One sequence per (prompt, response) pair; `encoded[i]` is the prompt of `responses[i]`."""
    if len(encoded) != len(responses):
        raise ValueError(f"{len(encoded)} prompts for {len(responses)} responses")
    rows = [torch.cat([e.input_ids, torch.tensor(r, dtype=e.input_ids.dtype)]) for e, r in zip(encoded, responses, strict=False)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=rows[0].dtype)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.zeros((len(rows), length - 1))
    per_token = {k: torch.zeros((len(rows), length), dtype=v.dtype) for k, v in encoded[0].per_token.items()}
    for b, (row, e, r) in enumerate(zip(rows, encoded, responses, strict=False)):
        input_ids[b, : len(row)] = row
        attention[b, : len(row)] = 1
        prompt_len = len(e.input_ids)
        targets[b, prompt_len - 1 : prompt_len - 1 + len(r)] = 1.0
        for key, values in e.per_token.items():
            per_token[key][b, :prompt_len] = values
    keys = sorted({key for e in encoded for key in e.vision})  # text-only prompts add no rows
    vision = {key: torch.cat([e.vision[key] for e in encoded if key in e.vision], dim=0) for key in keys}
    vision_rows = {key: torch.tensor([len(e.vision[key]) if key in e.vision else 0 for e in encoded],
                                     dtype=torch.long) for key in keys}
    return TrainBatch(input_ids, attention, targets, per_token, vision, vision_rows)


LOG_PROB_CHUNK = 256
"""Positions whose logits are cast to fp32 together in token_log_probs."""


def token_log_probs(model, batch: TrainBatch, temperature: float = 1.0, chunk: int = LOG_PROB_CHUNK) -> torch.Tensor:
    """log pi(token_{t+1} | tokens_<=t), [B, L-1], at the positions from the batch's first response target on;
    the positions before it (prompt and image tokens, never a target) are 0. Only `batch.target_mask` positions
    matter.

    Logits are divided by the sampling temperature (verl does the same) so the ratio compares the distributions
    the samples were drawn from. Memory: a VLM's sequence is mostly prompt and image tokens, and its full [B, L, V]
    logits in fp32 are the trainer's largest tensor (about 38 GB for 16 sequences of 1.3k tokens at Qwen2.5's
    152k vocabulary). The model is asked for logits from the first response position on only (`logits_to_keep`:
    transformers' Qwen2_5_VLForConditionalGeneration.forward, as its causal LMs, applies the head to
    `hidden_states[:, -logits_to_keep:]`; transformers/models/qwen2_5_vl/modeling_qwen2_5_vl.py), and those are cast
    to fp32 `chunk` positions at a time; logsumexp avoids a second [B, chunk, V] tensor.
    """
    length = batch.input_ids.shape[1]
    targets_at = batch.target_mask.any(dim=0).nonzero()
    first = int(targets_at[0]) if len(targets_at) else length - 2  # no target at all: keep one position
    logits = model(**batch.model_inputs(), logits_to_keep=length - first).logits[:, :-1]  # positions first..L-2
    targets = batch.input_ids[:, first + 1 :]
    parts = []
    for start in range(0, logits.shape[1], chunk):
        part = logits[:, start : start + chunk].float()
        if temperature != 1.0:
            part = part / temperature
        target = targets[:, start : start + chunk].unsqueeze(-1)
        parts.append(part.gather(-1, target).squeeze(-1) - torch.logsumexp(part, dim=-1))
    return torch.nn.functional.pad(torch.cat(parts, dim=1), (first, 0))
