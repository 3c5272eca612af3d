"""GRPO math against hand-computed values and the formulas in the docstrings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrv.grpo import (
    batch_advantages,
    group_advantages,
    kl_penalty,
    masked_mean,
    ttrv_advantages,
    ttrv_loss,
)
from ttrv.reward import normalized_entropy, vote_rewards

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure


def test_group_advantages_by_hand():
    # row [1, 2, 3]: mean 2, unbiased std 1; row [5, 5, 5]: std 0 -> all 0
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]), eps=1e-6)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-6))
    assert torch.equal(adv[1], torch.zeros(3))


def test_single_column_is_raw_reward_over_one():
    adv = group_advantages(torch.tensor([[0.7], [-2.0]]), eps=1e-6)
    assert torch.allclose(adv, torch.tensor([[0.7], [-2.0]]) / (1 + 1e-6))


def test_shape_is_checked():
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(torch.ones(4))


rows = st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=8)


@settings(max_examples=60)
@given(st.lists(rows, min_size=1, max_size=5).filter(lambda r: len({len(x) for x in r}) == 1),
       st.lists(st.floats(-3, 3), min_size=5, max_size=5))
def test_per_prompt_constant_cancels_under_group_normalisation(table, shifts):
    """Why the reference's entropy term has no effect: r_ij - w*H_i normalises to the same advantages as r_ij."""
    rewards = torch.tensor(table, dtype=torch.float64)
    shifted = rewards - torch.tensor(shifts[: len(table)], dtype=torch.float64).unsqueeze(1)
    assert torch.allclose(group_advantages(rewards), group_advantages(shifted), atol=1e-6)


def test_entropy_acts_in_batch_and_scale_modes():
    # prompt 0: unanimous votes (H = 0); prompt 1: split 3/1 (H_norm = 0.811278)
    votes = [["A", "A", "A", "A"], ["B", "B", "B", "C"]]
    entropies = torch.tensor([normalized_entropy(v) for v in votes], dtype=torch.float64)
    with_entropy = torch.tensor([vote_rewards(v, 0.75) for v in votes], dtype=torch.float64)
    without = torch.tensor([vote_rewards(v, 0.0) for v in votes], dtype=torch.float64)

    reference = ttrv_advantages(with_entropy, entropies, "reference")
    assert torch.allclose(reference, ttrv_advantages(without, entropies, "reference"))

    batch = ttrv_advantages(with_entropy, entropies, "batch")
    assert not torch.allclose(batch, ttrv_advantages(without, entropies, "batch"))
    assert batch[0].mean() > batch[1].mean()  # the confident prompt is favoured as a whole

    scale = ttrv_advantages(with_entropy, entropies, "scale", entropy_weight=0.75)
    expected_row1 = (1 - 0.75 * 0.811278) * group_advantages(with_entropy)[1]
    assert torch.allclose(scale[1], expected_row1, atol=1e-5)
    assert torch.equal(scale[0], torch.zeros(4))


def test_batch_advantages_by_hand():
    adv = batch_advantages(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), eps=0.0)
    std = math.sqrt(((0 - 1.5) ** 2 + (1 - 1.5) ** 2 + (2 - 1.5) ** 2 + (3 - 1.5) ** 2) / 3)
    assert torch.allclose(adv, (torch.tensor([[0.0, 1.0], [2.0, 3.0]]) - 1.5) / std)


def test_unknown_entropy_mode_names_the_field():
    with pytest.raises(ValueError, match="entropyMode"):
        ttrv_advantages(torch.zeros(1, 2), torch.zeros(1), "bogus")


def policy_loss(log_prob, old_log_prob, advantages, mask, **clip):
    """ttrv_loss with no KL term, weighted against the micro-batch's own tokens: the token-mean policy loss."""
    return ttrv_loss(log_prob, old_log_prob, None, advantages, mask, mask.sum().clamp(min=1.0), **clip)[0]


def _loss_of_one_token(advantage: float, ratio: float, **kwargs) -> float:
    log_prob = torch.tensor([[math.log(ratio)]])
    return policy_loss(log_prob, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **kwargs).item()


@pytest.mark.parametrize(
    ("advantage", "ratio", "expected"),
    [
        (1.0, 1.0, -1.0),  # on-policy: -A
        (1.0, 1.5, -1.2),  # max(-1.5, -1.2): clipped at 1 + 0.2
        (1.0, 0.5, -0.5),  # max(-0.5, -0.8): the pessimistic unclipped term
        (-1.0, 0.5, 0.8),  # max(0.5, 0.8)
        (-1.0, 1.1, 1.1),  # inside the clip range
        (-1.0, 5.0, 3.0),  # max(5, 1.2) = 5, then dual-clip min(5, 3) = 3
        (-2.0, 2.0, 4.0),  # max(4, 2.4) = 4 < 2*3: dual clip inactive
    ],
)
def test_policy_loss_by_hand(advantage, ratio, expected):
    assert _loss_of_one_token(advantage, ratio) == pytest.approx(expected, rel=1e-5)


def test_policy_loss_is_a_token_mean_over_the_mask():
    # two sequences, the second has one padded token: mean over the 3 real tokens
    log_prob = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    loss = policy_loss(log_prob, torch.zeros(2, 2), adv, mask)
    assert loss.item() == pytest.approx((-1.0 - 1.0 + 2.0) / 3)


def test_policy_loss_gradient_vanishes_where_clipped():
    log_prob = torch.tensor([[math.log(1.5)]], requires_grad=True)
    policy_loss(log_prob, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1)).backward()
    assert log_prob.grad.item() == 0.0


def test_clip_fraction_by_hand():
    log_prob = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]]))
    _, metrics = ttrv_loss(log_prob, torch.zeros(1, 4), None, torch.ones(1), torch.ones(1, 4), torch.tensor(4.0))
    assert metrics["clipfrac"].item() == pytest.approx(0.5)


def test_dual_clip_fraction_and_approx_kl_by_hand():
    # (A, ratio): (-1, 5) the dual clip binds (max(5, 1.2) = 5 > 3); (-2, 2): 4 < 6, it does not; (1, 1.5): A > 0;
    # (-1, 1.1): inside the clip range
    ratios = torch.tensor([[5.0], [2.0], [1.5], [1.1]])
    _, metrics = ttrv_loss(ratios.log(), torch.zeros(4, 1), None, torch.tensor([-1.0, -2.0, 1.0, -1.0]),
                           torch.ones(4, 1), torch.tensor(4.0))
    assert metrics["dual_clipfrac"].item() == pytest.approx(0.25)
    assert metrics["clipfrac"].item() == pytest.approx(0.75)
    # approx_kl = token-mean of log(old/new) (verl's ppo_kl)
    assert metrics["approx_kl"].item() == pytest.approx(-math.log(5.0 * 2.0 * 1.5 * 1.1) / 4, rel=1e-5)
    assert metrics["pg_loss"].item() == pytest.approx((3.0 + 4.0 - 1.2 + 1.1) / 4, rel=1e-5)


def _former_assembly(log_prob, old, ref, adv, mask, total_tokens, clip_low, clip_high, dual_clip, kl_coef, kl_kind):
    """The objective as the learner assembled it before `ttrv_loss` (main at 98d86e0: grpo.policy_loss and
    grpo.clip_fraction, each with its own ratio, plus klCoef * KL and the token weight in Learner.update)."""
    ratio = torch.exp((log_prob - old).clamp(-20.0, 20.0))
    advantages = adv.unsqueeze(1).expand_as(log_prob)
    clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    dual = torch.minimum(clipped, -advantages * dual_clip)
    pg = masked_mean(torch.where(advantages < 0, dual, clipped), mask)
    kl = masked_mean(kl_penalty(log_prob, ref, kl_kind), mask)
    loss = pg + kl_coef * kl
    weight = mask.sum() / total_tokens
    detached = torch.exp((log_prob.detach() - old).clamp(-20.0, 20.0))
    clipfrac = masked_mean(((detached < 1.0 - clip_low) | (detached > 1.0 + clip_high)).to(mask.dtype), mask)
    return loss * weight.to(loss), {"loss": loss, "pg_loss": pg, "kl": kl, "clipfrac": clipfrac, "weight": weight}


@pytest.mark.parametrize("kl_kind", ["low_var_kl", "kl", "mse"])
@pytest.mark.parametrize("seed", range(8))
def test_ttrv_loss_is_the_former_assembly_bit_for_bit(kl_kind, seed):
    """The numerics of training are unchanged: the same loss, gradient and metrics to the last bit, on batches
    whose ratios fall inside, above and below the clip range and into the dual clip (several seeds, since a
    reordered sum can round the same way on one batch by chance)."""
    generator = torch.Generator().manual_seed(seed)
    log_prob = (-torch.rand(6, 9, generator=generator) * 4).requires_grad_()
    shift = torch.randn(6, 9, generator=generator)
    shift[:, 0], shift[:, 1] = -2.0, 0.0  # ratio e^2 (the dual clip binds where A < 0) and 1 (inside the range)
    old = log_prob.detach() + shift
    ref = log_prob.detach() + 0.3 * torch.randn(6, 9, generator=generator)
    adv = torch.tensor([1.5, -0.7, 0.0, -2.0, 0.4, -0.1])
    mask = (torch.arange(9) < torch.tensor([9, 4, 7, 1, 9, 5]).unsqueeze(1)).float()
    total_tokens = torch.tensor(97.0) / 3  # the step's tokens over three ranks, per rank
    settings = (0.2, 0.28, 3.0, 0.01, kl_kind)

    loss, metrics = ttrv_loss(log_prob, old, ref, adv, mask, total_tokens, *settings)
    (grad,) = torch.autograd.grad(loss, log_prob)
    former_loss, former = _former_assembly(log_prob, old, ref, adv, mask, total_tokens, *settings)
    (former_grad,) = torch.autograd.grad(former_loss, log_prob)

    assert torch.equal(loss, former_loss)
    assert torch.equal(grad, former_grad)
    for name, value in former.items():
        assert torch.equal(metrics[name], value.detach()), name
    assert 0 < metrics["clipfrac"] < 1 and metrics["dual_clipfrac"] > 0  # every branch of the loss was taken


def test_micro_batches_add_up_to_the_step_token_mean():
    """Weighted against the step's tokens, the micro-batches' losses (and gradients) sum to the token-mean
    objective of the whole batch; a padding pass (no tokens) adds nothing."""
    generator = torch.Generator().manual_seed(1)
    log_prob = (-torch.rand(4, 5, generator=generator) * 3).requires_grad_()
    old = log_prob.detach() + 0.5 * torch.randn(4, 5, generator=generator)
    ref = log_prob.detach() + 0.5 * torch.randn(4, 5, generator=generator)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0])
    mask = (torch.arange(5) < torch.tensor([5, 2, 4, 3]).unsqueeze(1)).float()
    tokens = mask.sum()

    def loss_of(rows, rows_mask):
        return ttrv_loss(log_prob[rows], old[rows], ref[rows], adv[rows], rows_mask, tokens, kl_coef=0.1)[0]

    whole = loss_of(slice(0, 4), mask)
    parts = [loss_of(slice(0, 1), mask[0:1]), loss_of(slice(1, 4), mask[1:4])]
    padding = loss_of(slice(0, 1), torch.zeros(1, 5))
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-6)
    assert padding.item() == 0.0
    (whole_grad,) = torch.autograd.grad(whole, log_prob)
    (parts_grad,) = torch.autograd.grad(sum(parts) + padding, log_prob)
    assert torch.allclose(parts_grad, whole_grad, atol=1e-7)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dualClip"):
        ttrv_loss(torch.zeros(1, 1), torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1), torch.tensor(1.0),
                  dual_clip=1.0)


def test_kl_estimators_by_hand():
    log_p, log_q = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(log_p, log_q, "kl").item() == pytest.approx(1.0)
    assert kl_penalty(log_p, log_q, "mse").item() == pytest.approx(0.5)
    # k3: q/p - log(q/p) - 1 with log(q/p) = -1
    assert kl_penalty(log_p, log_q, "low_var_kl").item() == pytest.approx(math.exp(-1) + 1 - 1)


def test_low_var_kl_is_clamped():
    assert kl_penalty(torch.tensor([-20.0]), torch.tensor([0.0]), "low_var_kl").item() == 10.0


@given(st.floats(-8, 0), st.floats(-8, 0))
def test_low_var_kl_is_non_negative_and_zero_on_policy(log_p, log_q):
    value = kl_penalty(torch.tensor([log_p]), torch.tensor([log_q]), "low_var_kl").item()
    assert value >= -1e-7
    assert kl_penalty(torch.tensor([log_p]), torch.tensor([log_p]), "low_var_kl").item() == pytest.approx(0.0)


def test_unknown_kl_names_the_field():
    with pytest.raises(ValueError, match="klKind"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "bogus")
