"""Pure parts of the adaptation loop: the data cursor, label-free scoring, the collapse guard, LoRA merging."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttrv.data import Prompt
from ttrv.guard import CollapseGuard, dominant_share
from ttrv.loop import Cursor, score, steps_per_epoch
from ttrv.rollout.base import Sample
from ttrv.rollout.hf import lora_merger
from ttrv.spec import GuardSpec, LoraSpec, RunSpec
from ttrv.weights import merge_lora

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure


def prompts(n):
    return [Prompt(f"p{i}", "<image>\nQ? Options:\nA. x\nB. y", None) for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 8), st.integers(1, 3), st.integers(0, 5))
def test_every_prompt_once_per_epoch(count, per_step, epochs, seed):
    data = prompts(count)
    cursor = Cursor()
    seen: dict[int, list[str]] = {}
    steps = 0
    while cursor.epoch < epochs:
        batch = cursor.next_batch(data, per_step, seed)
        seen.setdefault(cursor.epoch, []).extend(p.id for p in batch)
        cursor.advance(len(batch), count)
        steps += 1
    assert steps == epochs * steps_per_epoch(count, per_step)
    for ids in seen.values():
        assert sorted(ids) == sorted(p.id for p in data)


def test_epochs_are_shuffled_differently_and_reproducibly():
    data = prompts(20)
    first = Cursor(0, 0).next_batch(data, 20, seed=1)
    assert first == Cursor(0, 0).next_batch(data, 20, seed=1)
    assert first != Cursor(1, 0).next_batch(data, 20, seed=1)


def test_cursor_resumes_mid_epoch():
    data = prompts(10)
    whole = Cursor(0, 0).next_batch(data, 10, seed=3)
    assert Cursor(0, 4).next_batch(data, 4, seed=3) == whole[4:8]


def test_score_is_label_free():
    spec = RunSpec.model_validate({"data": {"path": "x"}, "reward": {"entropyWeight": 0.0}})
    texts = [["A", "A", "blue", "B"]]
    scored = score(prompts(1), [[Sample(t, (1,)) for t in row] for row in texts], spec)
    assert scored.answers == [["A", "A", None, "B"]]
    assert scored.rewards == [[0.5, 0.5, -1.0, 0.25]]


def test_answers_are_read_against_each_prompts_own_options():
    """An E is an answer where the prompt offers it, and reward.choices is only the fallback (the reference's
    MathVista file mixes four- and five-option prompts; ttrv refused it)."""
    spec = RunSpec.model_validate({"data": {"path": "x"}, "reward": {"entropyWeight": 0.0}})
    five = Prompt("five", "Which?\nA. a\nB. b\nC. c\nD. d\nE. e", None)
    two = Prompt("two", "Which?\nA. yes\nB. no", None)
    bare = Prompt("bare", "Which letter?", None)
    scored = score([five, two, bare], [[Sample(t, (1,)) for t in ("E", "C")]] * 3, spec)
    assert scored.answers == [["E", "C"], [None, None], [None, "C"]]


def test_dominant_share_counts_all_votes():
    assert dominant_share([["A", "A"], ["A", None]]) == 0.75
    assert dominant_share([[None]]) == 0.0


def test_guard_fires_on_entropy_collapse_with_one_answer_everywhere():
    guard = CollapseGuard(GuardSpec(patience=2, window=1))
    assert not guard.observe(1, entropy=0.5, dominant_share=0.3, length=4.0, prompts=4)
    assert not guard.observe(2, entropy=0.0, dominant_share=0.4, length=4.0, prompts=4)  # confident, diverse
    assert not guard.observe(3, entropy=0.0, dominant_share=0.95, length=4.0, prompts=4)
    assert guard.observe(4, entropy=0.0, dominant_share=0.97, length=4.0, prompts=4)
    assert guard.healthy_version == 2


def test_guard_fires_on_length_collapse():
    guard = CollapseGuard(GuardSpec(patience=1, length_ratio=0.5, window=1))
    assert not guard.observe(1, entropy=0.3, dominant_share=0.3, length=10.0, prompts=4)
    assert guard.observe(2, entropy=0.0, dominant_share=0.3, length=1.0, prompts=4)
    assert guard.healthy_version == 1


def test_guard_disabled_never_fires_and_single_prompt_steps_are_not_one_answer_collapses():
    guard = CollapseGuard(GuardSpec(enabled=False, patience=1))
    assert not guard.observe(1, entropy=0.0, dominant_share=1.0, length=1.0, prompts=4)
    single = CollapseGuard(GuardSpec(patience=1))
    assert not single.observe(1, entropy=0.0, dominant_share=1.0, length=3.0, prompts=1)


def test_merge_lora_by_hand():
    base = {"model.layers.0.q_proj.weight": torch.eye(2), "model.other.weight": torch.ones(1)}
    adapter = {
        "base_model.model.model.layers.0.q_proj.lora_A.weight": torch.tensor([[1.0, 0.0]]),  # [r=1, in=2]
        "base_model.model.model.layers.0.q_proj.lora_B.weight": torch.tensor([[2.0], [0.0]]),  # [out=2, r=1]
    }
    merged = merge_lora(base, adapter, scale=0.5)
    assert list(merged) == ["model.layers.0.q_proj.weight"]
    assert torch.equal(merged["model.layers.0.q_proj.weight"], torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="no lora_B"):
        merge_lora(base, {"base_model.model.model.x.lora_A.weight": torch.ones(1, 2)}, 1.0)


def test_each_lora_version_is_merged_into_the_base_not_into_the_last_version():
    """What the in-process engine and `ttrv serve`'s Hugging Face engine share (`lora_merger`): version 2 served
    after version 1 is base + adapter 2, with nothing of adapter 1 left in it."""
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model.q_proj.weight.copy_(torch.eye(2))
    assert lora_merger(model, None) is None
    merge = lora_merger(model, LoraSpec(rank=1, alpha=2))

    def adapter(value: float) -> dict:
        return {"base_model.model.q_proj.lora_A.weight": torch.tensor([[1.0, 0.0]]),
                "base_model.model.q_proj.lora_B.weight": torch.tensor([[value], [0.0]])}

    model.load_state_dict(merge(adapter(1.0)), strict=False)
    assert torch.equal(model.q_proj.weight, torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    model.load_state_dict(merge(adapter(0.5)), strict=False)
    assert torch.equal(model.q_proj.weight, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
