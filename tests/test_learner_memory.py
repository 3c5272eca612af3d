"""The trainer's GPU-memory paths, shown on CPU (issue 15, "Memory on GPU, by default"): micro-batches sized by a
token budget whose step equals the unsplit one, the reference model offloaded between its passes, images capped by
model.maxPixels in the trainer exactly as in vLLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ttrv.modeling import load_processor
from ttrv.policy import PromptEncoder, TrainBatch, collate, pack_micro_batches
from ttrv.spec import RunSpec
from ttrv.weights import resolve_model

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "whole": {"grpo": {"microBatchSize": 64, "microBatchTokens": None}},
    "budget": {"grpo": {"microBatchSize": 3, "microBatchTokens": 160}},
    "offloaded_reference": {"grpo": {"microBatchSize": 64, "microBatchTokens": None},
                            "resources": {"offloadReference": True}},
}
"""The whole batch in one micro-batch; the same batch packed under a 160-token budget; the first with the reference
offloaded."""


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict:
    """One update of the real Learner per variant, in a process of its own (tests/learner_probe.py)."""
    out = tmp_path_factory.mktemp("probe") / "probe.pt"
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "learner_probe.py"), str(out), json.dumps(VARIANTS)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


# --------------------------------------------------------------------------------------------------- token budget
def test_packing_keeps_order_and_the_padded_size_within_the_budget():
    lengths = [64, 53, 58, 55, 62, 56, 300, 10]
    parts = pack_micro_batches(lengths, max_rows=3, max_tokens=160)
    assert [(p.start, p.stop) for p in parts] == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 8)]
    for part in parts:  # rows x longest within the budget, but for a sequence longer than it, alone
        assert len(lengths[part]) * max(lengths[part]) <= 160 or len(lengths[part]) == 1
    # without a binding budget: the fixed-size slices of microBatchSize, as before the budget existed
    assert pack_micro_batches(lengths, 3, None) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert pack_micro_batches(lengths, 3, 10**6) == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert pack_micro_batches(lengths[2:5], 3, 160, start=2) == [slice(2, 4), slice(4, 5)]


def test_a_micro_batch_is_as_wide_as_its_longest_sequence():
    """The padded size the budget bounds is the micro-batch's own: the batch's longer sequences' padding is
    dropped, and the remaining tensors line up (targets one shorter)."""
    ids = torch.arange(1, 21).reshape(2, 10)
    attention = torch.tensor([[1] * 4 + [0] * 6, [1] * 6 + [0] * 4])
    targets = torch.zeros(2, 9)
    targets[0, 1:3] = 1
    targets[1, 2:5] = 1
    batch = TrainBatch(ids, attention, targets, {"mm_token_type_ids": torch.zeros(2, 10, dtype=torch.long)}, {}, {})
    assert batch.lengths() == [4, 6]
    first = batch.select(slice(0, 1))
    assert first.input_ids.shape == (1, 4) and first.target_mask.shape == (1, 3)
    assert first.per_token["mm_token_type_ids"].shape == (1, 4) and first.target_mask.sum() == 2
    both = batch.select(slice(0, 2))
    assert both.input_ids.shape == (2, 6) and both.target_mask.sum() == 5


def test_the_token_budget_is_a_spec_field_verl_s_default():
    spec = RunSpec.model_validate({"data": {"path": "ttrv://tiny-shapes/test"}})
    assert spec.grpo.micro_batch_tokens == 16384
    with pytest.raises(ValueError, match="microBatchTokens"):
        RunSpec.model_validate({"data": {"path": "ttrv://tiny-shapes/test"}, "grpo": {"microBatchTokens": 0}})


@pytest.mark.timeout(1200)
def test_a_token_budget_step_equals_the_unsplit_step(probed):
    """The same batch as one micro-batch and packed under a 160-token budget (three micro-batches, every padded
    size within it): the step's loss, metrics and accumulated gradient are the unsplit ones."""
    whole, budget = probed["whole"], probed["budget"]
    assert whole["micro_batches"] == [(0, 6)]
    assert len(budget["micro_batches"]) == 3 and max(budget["padded"]) <= 160
    for key in ("loss", "pg_loss", "kl", "grad_norm"):
        assert budget["stats"][key] == pytest.approx(whole["stats"][key], rel=1e-5, abs=1e-7), key
    assert budget["stats"]["optimizer_steps"] == whole["stats"]["optimizer_steps"] == 1
    assert whole["grad"].norm() > 1  # a real gradient, not zeros
    # equal up to fp32 summation order (a lost micro-batch or a weight off by the accumulation count is >= 0.3)
    assert (budget["grad"] - whole["grad"]).norm() / whole["grad"].norm() < 1e-4
    torch.testing.assert_close(budget["grad"], whole["grad"], rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------- reference
@pytest.mark.timeout(1200)
def test_an_offloaded_reference_gives_the_same_log_probs_and_step(probed):
    """resources.offloadReference: the reference waits in host memory after its pass, and its log-probs, the KL
    and the step are those of the resident reference."""
    resident, offloaded = probed["whole"], probed["offloaded_reference"]
    assert offloaded["reference_device"] == "cpu"
    assert torch.equal(offloaded["ref"], resident["ref"])
    assert offloaded["stats"] == resident["stats"]
    assert torch.equal(offloaded["grad"], resident["grad"])


# --------------------------------------------------------------------------------------------------- max_pixels
VLLM_PROCESSOR = """
import json, sys
from PIL import Image
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
path, kwargs, text, image = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
config = ModelConfig(model=path, mm_processor_kwargs=kwargs, limit_mm_per_prompt={"image": 1, "video": 0},
                     dtype="float32")
processor = MULTIMODAL_REGISTRY.create_processor(config)
out = processor._call_hf_processor({"text": [text], "images": [Image.open(image)]}, {})
print(json.dumps({"image_grid_thw": out["image_grid_thw"].tolist(), "pixel_values": list(out["pixel_values"].shape),
                  "input_ids": out["input_ids"].tolist()}))
"""
"""vLLM's own multimodal processor for the model, configured as `ttrv serve` configures vLLM
(--mm-processor-kwargs), applied the way vLLM applies it to a request's image
(vllm/multimodal/processing/processor.py, `_call_hf_processor`)."""


@pytest.mark.timeout(600)
def test_the_trainer_caps_images_exactly_as_the_vllm_rollout(tmp_path):
    """A 1600x1200 image under model.maxPixels 50176: the trainer's processor (as `ttrv.train` loads it) gives the
    same image_grid_thw, pixel_values shape and tokens as vLLM's processor configured with the flags `ttrv serve`
    passes, and both differ from the checkpoint's own cap (which the trainer used to keep)."""
    from ttrv.data import Prompt
    from ttrv.modeling import render_prompt
    from ttrv.rollout.vllm_process import REPO_VENV_PYTHON, vllm_flags

    path = resolve_model("ttrv://tiny-qwen2vl")
    spec = RunSpec.model_validate({"data": {"path": "ttrv://tiny-shapes/test"},
                                   "model": {"path": path, "maxPixels": 50176}})
    flags = vllm_flags(spec, gpu=True)
    kwargs = json.loads(flags[flags.index("--mm-processor-kwargs") + 1])
    image = tmp_path / "large.png"
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(image)
    prompt = Prompt(id="big", text="<image>Which colour?", image_path=str(image))

    trainer = load_processor(path, spec.model.trust_remote_code, spec.model.max_pixels)
    encoded = PromptEncoder(trainer).encode(prompt)
    text = render_prompt(trainer, prompt)
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(REPO_VENV_PYTHON), "-c", VLLM_PROCESSOR, path, json.dumps(kwargs), text, str(image)],
                          capture_output=True, text=True, timeout=500, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    vllm = json.loads(done.stdout.strip().splitlines()[-1])

    assert encoded.vision["image_grid_thw"].tolist() == vllm["image_grid_thw"]
    assert list(encoded.vision["pixel_values"].shape) == vllm["pixel_values"]
    assert encoded.input_ids.tolist() == vllm["input_ids"][0]
    # the checkpoint's own cap (112x112 pixels) gives a smaller grid: the cap above is what made them agree
    own = PromptEncoder(load_processor(path)).encode(prompt)
    assert own.vision["image_grid_thw"].tolist() != vllm["image_grid_thw"]


def test_the_cap_reaches_the_trainer_s_batches(tmp_path):
    """The capped image's rows reach the training batch: at most maxPixels / (28 x 28) visual tokens."""
    from ttrv.data import Prompt

    image = tmp_path / "large.png"
    Image.new("RGB", (1600, 1200), (200, 10, 30)).save(image)
    processor = load_processor(resolve_model("ttrv://tiny-qwen2vl"), max_pixels=28 * 28 * 16)
    encoded = PromptEncoder(processor).encode(Prompt(id="capped", text="<image>Which colour?", image_path=str(image)))
    batch = collate([encoded], [[5, 6]], pad_id=0)
    (grid,) = batch.vision["image_grid_thw"].tolist()
    assert grid == encoded.vision["image_grid_thw"][0].tolist()
    assert 1 < grid[0] * grid[1] * grid[2] // 4 <= 16  # 2x2 patches merge into one token
