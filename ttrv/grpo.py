"""GRPO as TTRV uses it: group advantages, and the objective (`ttrv_loss`): the clipped policy loss with dual-clip
plus the KL penalty.

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


def ttrv_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    total_tokens: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
    kl_coef: float = 0.0,
    kl_kind: str = "low_var_kl",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The TTRV objective on one micro-batch of [B, T] response tokens: the loss to differentiate and its metrics.

    log_ratio = clamp(log_prob - old_log_prob, -20, 20);  ratio = exp(log_ratio)     (once, for loss and metrics)
    L_t       = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))        (PPO's clipped surrogate)
                and for A < 0, min(L_t, -A * dual_clip)          (Ye et al. 2020: bounds the loss of an unlikely token)
    pg_loss   = token-mean of L_t over the mask
    kl        = token-mean of kl_penalty(log_prob, ref_log_prob, kl_kind)          (0 when ref_log_prob is None)
    objective = pg_loss + kl_coef * kl
    weight    = sum(mask) / total_tokens;   loss = objective * weight

    `total_tokens` is the token count the micro-batch is weighted against, so that the gradients of a step's
    micro-batches add up to the token-mean over all of its tokens (the learner passes the step's response tokens
    over all ranks, per rank). `advantages` is [B, T] or [B] (one per sequence, broadcast over its tokens).

    The metrics are detached scalars of this micro-batch: `loss` (its objective, unweighted), `pg_loss`, `kl`,
    `clipfrac` (share of tokens whose ratio lies outside the clip range), `dual_clipfrac` (share where the dual
    clip binds), `approx_kl` (token-mean of -log_ratio, KL(old || new) by k1) and `weight`. They are verl's
    `compute_policy_loss_vanilla` outputs (verl/trainer/ppo/core_algos.py at 012be9d9: pg_clipfrac_lower is
    dual_clipfrac, ppo_kl is approx_kl), which returns its clip fractions with the loss the same way.
    """
    if dual_clip <= 1.0:
        raise ValueError(f"grpo.dualClip must be > 1, got {dual_clip}")
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1).expand_as(log_prob)
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    dual_bound = -advantages * dual_clip
    negative = advantages < 0
    pg_loss = masked_mean(torch.where(negative, torch.minimum(surrogate, dual_bound), surrogate), mask)
    kl = masked_mean(kl_penalty(log_prob, ref_log_prob, kl_kind), mask) if ref_log_prob is not None \
        else torch.zeros(())
    objective = pg_loss + kl_coef * kl if ref_log_prob is not None else pg_loss
    weight = mask.sum() / total_tokens
    loss = objective * weight.to(objective)
    with torch.no_grad():
        outside = (ratio < 1.0 - clip_low) | (ratio > 1.0 + clip_high)
        metrics = {
            "loss": objective.detach(),
            "pg_loss": pg_loss.detach(),
            "kl": kl.detach(),
            "clipfrac": masked_mean(outside.to(mask.dtype), mask),
            "dual_clipfrac": masked_mean((negative & (surrogate > dual_bound)).to(mask.dtype), mask),
            "approx_kl": masked_mean(-log_ratio, mask),
            "weight": weight.detach(),
        }
    return loss, metrics
