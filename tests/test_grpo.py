"""GRPO math against hand-computed values and the formulas in the docstrings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrv.grpo import (
    batch_advantages,
    clip_fraction,
    group_advantages,
    kl_penalty,
    policy_loss,
    ttrv_advantages,
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
    assert clip_fraction(log_prob, torch.zeros(1, 4), torch.ones(1, 4), 0.2, 0.2).item() == pytest.approx(0.5)


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
