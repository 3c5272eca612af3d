"""GRPO as TTRV uses it: group advantages, the clipped policy loss with dual-clip, and the KL penalty.

Shapes: P prompts, G trained responses per prompt, T response tokens; `mask` is 1 on response tokens and 0 on
padding. Definitions follow verl (`core_algos.py`), which the TTRV reference runs.
"""

from __future__ import annotations

from typing import Literal

import torch

EntropyMode = Literal["reference", "batch", "scale"]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps), per row i, unbiased std (verl's GRPO outcome advantage).

    A row of one column has no group: verl uses mean 0 and std 1 there, so A = r / (1 + eps).
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] == 1:
        return rewards / (1.0 + eps)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + eps)


def batch_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_ij = (r_ij - mean r) / (std r + eps) over the whole [P, G] batch: a per-prompt constant (such as the
    entropy penalty -w*H_norm_i) shifts that prompt's advantages instead of cancelling."""
    flat = rewards.flatten()
    std = flat.std(unbiased=True) if flat.numel() > 1 else torch.ones((), dtype=rewards.dtype)
    return (rewards - flat.mean()) / (std + eps)


def ttrv_advantages(
    rewards: torch.Tensor,
    entropies: torch.Tensor,
    mode: EntropyMode = "scale",
    entropy_weight: float = 0.75,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages of TTRV's vote rewards, with the entropy term acting as `mode` says.

    rewards:   [P, G] vote rewards r_ij = count/N - w*H_norm_i (see `ttrv.reward.vote_rewards`).
    entropies: [P] normalised vote entropy H_norm_i of each prompt.

    - reference: `group_advantages(r)`. The entropy penalty is the same for every response of a prompt, so it
      cancels exactly (the reference's behaviour: its entropy term has no effect on training).
    - batch: `batch_advantages(r)`; confident prompts (low H) get larger advantages than uncertain ones.
    - scale: (1 - w*H_norm_i)^+ * group_advantages(r)_i; each prompt keeps its within-group ranking, but the
      update from a prompt whose votes disagree is damped (its majority is less trustworthy).
    """
    if mode == "reference":
        return group_advantages(rewards, eps)
    if mode == "batch":
        return batch_advantages(rewards, eps)
    if mode == "scale":
        trust = (1.0 - entropy_weight * entropies).clamp(min=0.0).to(rewards.dtype)
        return trust.unsqueeze(1) * group_advantages(rewards, eps)
    raise ValueError(f"reward.entropyMode: unknown mode {mode!r}; use reference, batch or scale")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean: sum(values * mask) / sum(mask), over every token of the batch."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
) -> torch.Tensor:
    """PPO's clipped surrogate with dual-clip, token-mean.

    ratio = exp(log_prob - old_log_prob)   (log-ratio clamped to [-20, 20])
    L1 = -A * ratio;  L2 = -A * clip(ratio, 1 - clip_low, 1 + clip_high);  L = max(L1, L2)
    for A < 0 also L = min(L, -A * dual_clip)     (Ye et al. 2020: bounds the loss of a very unlikely token)
    loss = sum(L * mask) / sum(mask)

    `advantages` is [B, T] or [B] (one per sequence, broadcast over its tokens).
    """
    if dual_clip <= 1.0:
        raise ValueError(f"grpo.dualClip must be > 1, got {dual_clip}")
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1).expand_as(log_prob)
    ratio = torch.exp((log_prob - old_log_prob).clamp(-20.0, 20.0))
    clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    dual = torch.minimum(clipped, -advantages * dual_clip)
    losses = torch.where(advantages < 0, dual, clipped)
    return masked_mean(losses, mask)


def clip_fraction(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, mask: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """Share of response tokens whose ratio lies outside [1 - clip_low, 1 + clip_high] (monitoring)."""
    ratio = torch.exp((log_prob - old_log_prob).clamp(-20.0, 20.0))
    outside = ((ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)).to(mask.dtype)
    return masked_mean(outside, mask)


def kl_penalty(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kind: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3).

    kl (k1):          log p - log q
    mse (k2):         (log p - log q)^2 / 2
    low_var_kl (k3):  q/p - log(q/p) - 1, with log(q/p) clamped to [-20, 20] and the result to [-10, 10]
    """
    if kind == "kl":
        return log_prob - ref_log_prob
    if kind == "mse":
        return 0.5 * (log_prob - ref_log_prob).square()
    if kind == "low_var_kl":
        log_ratio = (ref_log_prob - log_prob).clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"grpo.klKind: unknown estimator {kind!r}; use low_var_kl, kl or mse")
