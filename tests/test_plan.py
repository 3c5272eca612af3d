"""`ttrv plan`: parameter counts from a config's shapes equal the model transformers builds, model states agree with
DeepSpeed's own estimators (deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs_all_cold,
deepspeed/runtime/zero/stage3.py estimate_zero3_model_states_mem_needs_all_cold) on the bundled tiny model and on
Qwen2.5-VL-7B's config, and a run that will not fit is named with its fixes."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from k8s_util import ROOT
from transformers import AutoModelForImageTextToText, Qwen2VLConfig

from ttrv.cli import main
from ttrv.plan import GIB, load_config, model_shape, plan
from ttrv.spec import RunSpec

QWEN7B = ROOT / "tests" / "data" / "qwen2.5-vl-7b"
MODELS = {"tiny": "ttrv://tiny-qwen2vl", "qwen2.5-vl-7b": str(QWEN7B)}


def spec(path: str = "ttrv://tiny-qwen2vl", **sections) -> RunSpec:
    document = {"name": "plan", "data": {"path": "ttrv://tiny-shapes/test"},
                **sections, "model": {"path": path, **sections.get("model", {})}}
    return RunSpec.model_validate(document)


def meta_counts(config) -> tuple[int, int, int]:
    """What transformers builds from `config` (on the meta device: shapes, no memory): total, vision, largest
    layer as DeepSpeed counts it (deepspeed/runtime/zero/stage3.py, model_to_params)."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if "visual" in n)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, vision, largest


@pytest.mark.parametrize("name", MODELS)
def test_parameter_counts_from_the_config_equal_the_built_model(name):
    config = load_config(MODELS[name])
    shape = model_shape(config)
    assert (shape.total, shape.vision, shape.largest_layer) == meta_counts(config)
    if name == "qwen2.5-vl-7b":
        assert shape.total == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's published size, vision tower included


def test_qwen2_vl_s_vision_tower_is_counted_too():
    config = Qwen2VLConfig(text_config={"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
                                        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100},
                           vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2})
    shape = model_shape(config)
    assert (shape.total, shape.vision, shape.largest_layer) == meta_counts(config)


def deepspeed_gpu_bytes(stage: int, total: int, largest: int, gpus: int, nodes: int, offload: bool,
                        capsys) -> int:
    """DeepSpeed's per-GPU model-state estimate, from its *_all_cold printout (GB = 2**30 bytes there), checked
    against the function that computes it."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    if stage == 2:
        stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold(total, gpus, nodes)
        _, exact = stage_1_and_2.estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
        option = f"offload_optimizer={'OffloadDeviceEnum.cpu' if offload else 'none'}"
    else:
        stage3.estimate_zero3_model_states_mem_needs_all_cold(total, largest, gpus, nodes)
        _, exact, _ = stage3.estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=offload,
                                                                   cpu_offload_params=False)
        option = f"offload_param=none, offload_optimizer={'OffloadDeviceEnum.cpu' if offload else 'none'}, zero_init=1"
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.rstrip().endswith(option))
    assert abs(float(row.split("|")[1].strip().removesuffix("GB")) - exact / 2**30) <= 0.006  # printed to 0.01 GB
    return exact


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True], ids=["gpu-optimizer", "offload"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 2)])
def test_model_states_agree_with_deepspeed_s_estimators(name, stage, offload, gpus, nodes, capsys):
    config = load_config(MODELS[name])
    shape = model_shape(config)
    run = spec(MODELS[name], model={"dtype": "bfloat16", "trainable": "all"},
               resources={"zeroStage": stage, "offloadOptimizer": offload, "gpusPerNode": gpus, "nodes": nodes})
    ours = plan(run, config).trainer.model_states
    theirs = deepspeed_gpu_bytes(stage, shape.total, shape.largest_layer, gpus, nodes, offload, capsys)
    assert abs(ours - theirs) <= 0.10 * theirs, (ours / GIB, theirs / GIB)


def test_a_frozen_vision_tower_has_no_optimizer_state():
    config = load_config(str(QWEN7B))
    shape = model_shape(config)
    lines = {line.name: line.bytes for line in plan(spec(str(QWEN7B), model={"dtype": "bfloat16"},
                                                         resources={"gpusPerNode": 8}), config).trainer.lines}
    assert lines["optimizer (AdamW)"] == int(12 * shape.language / 8)
    assert lines["policy weights"] == 2 * shape.total


def test_a_7b_full_fine_tune_without_checkpointing_does_not_fit_and_the_fixes_are_named():
    config = load_config(str(QWEN7B))
    result = plan(spec(str(QWEN7B), resources={"gpusPerNode": 8, "gradientCheckpointing": False}), config)
    assert not result.fits and result.verdict == "does not fit"
    [warning] = result.warnings
    for fix in ("gradientCheckpointing: true", "zeroStage: 3", "offloadOptimizer: true", "model.lora",
                "more GPUs", "rollout.backend: service"):
        assert fix in warning


def test_a_7b_run_set_up_as_the_references_do_fits_and_vllm_s_gpu_is_budgeted():
    config = load_config(str(QWEN7B))
    run = spec(str(QWEN7B), rollout={"backend": "service"}, grpo={"microBatchSize": 2},
               resources={"gpusPerNode": 8, "zeroStage": 3, "gradientCheckpointing": True, "rolloutGpus": 2})
    result = plan(run, config)
    assert result.fits, result.table()
    assert result.rollout is not None and result.rollout.fits
    vllm = {line.name: line.bytes for line in result.rollout.lines}
    assert vllm["vLLM weights"] == 2 * model_shape(config).total // 2
    assert "in-process rollout: model copy" not in {line.name for line in result.trainer.lines}
    colocated = plan(run, config, colocated=True)
    assert colocated.trainer.total - result.trainer.total == int(0.85 * 80 * GIB)


def test_vllm_without_room_for_its_kv_cache_is_a_warning():
    run = spec(str(QWEN7B), rollout={"backend": "service", "maxModelLen": 32768, "maxNumSeqs": 256},
               resources={"gpusPerNode": 8, "zeroStage": 3, "gradientCheckpointing": True,
                          "rolloutGpuMemoryUtilization": 0.3}, grpo={"microBatchSize": 1})
    result = plan(run, load_config(str(QWEN7B)))
    assert any("rollout.maxNumSeqs 256" in w or "no room" in w for w in result.warnings), result.warnings


def ttrv(capsys, *args: str) -> subprocess.CompletedProcess:
    """`ttrv ARGS` in this process (an import of transformers per command would cost seconds each)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_the_command_prints_the_plan_and_exits_by_its_verdict(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    fits = ttrv(capsys, "plan", "examples/tiny.yaml", "--json")
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["verdict"] == "fits"
    spec_file = tmp_path / "big.yaml"
    spec_file.write_text("data: {path: ttrv://tiny-shapes/test}\nmodel: {path: Qwen/Not-Downloaded}\n"
                         "resources: {gpusPerNode: 1, gradientCheckpointing: false}\n")
    missing = ttrv(capsys, "plan", str(spec_file))
    assert missing.returncode == 2 and "--model-config" in missing.stderr
    too_big = ttrv(capsys, "plan", str(spec_file), "--model-config", str(QWEN7B / "config.json"))
    assert too_big.returncode == 1
    assert re.search(r"verdict: does not fit\nwarning: needs [\d.]+ GiB per GPU", too_big.stdout), too_big.stdout
    lora = ttrv(capsys, "plan", str(spec_file), "--model-config", str(QWEN7B), "--set", "model.lora.rank=16",
                "--set", "resources.gradientCheckpointing=true", "--set", "rollout.backend=service",
                "--set", "grpo.microBatchSize=2")
    assert lora.returncode == 0, lora.stdout


def test_spec_validate_shows_the_plan_beside_the_spec(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    result = ttrv(capsys, "spec", "validate", "examples/tiny.yaml")
    assert result.returncode == 0
    json.loads(result.stdout)  # stdout stays the spec alone
    assert "memory plan" in result.stderr and "verdict: fits" in result.stderr


def test_spec_validate_of_a_model_not_on_this_machine_still_validates(tmp_path, capsys):
    """The plan is left out with the reason; the spec is valid all the same."""
    spec_file = tmp_path / "hub.yaml"
    spec_file.write_text("data: {path: ttrv://tiny-shapes/test}\nmodel: {path: Qwen/Not-Downloaded}\n")
    result = ttrv(capsys, "spec", "validate", str(spec_file))
    assert result.returncode == 0 and json.loads(result.stdout)["model"]["path"] == "Qwen/Not-Downloaded"
    assert "memory plan: none: model.path 'Qwen/Not-Downloaded'" in result.stderr
    assert "--model-config" in result.stderr


@pytest.mark.parametrize("trainable", ["language", "all"])
def test_the_token_budget_bounds_activations_and_logits(trainable):
    """grpo.microBatchTokens: a micro-batch's padded tokens stay within the budget, so the activation estimate
    is the budget's tokens, not microBatchSize whole sequences (the learner packs by it: ttrv.policy). With the
    vision tower trained, its images scale with the sequences too, and the text is scaled once (it was twice)."""
    config = load_config(str(QWEN7B))
    sections = {"model": {"dtype": "bfloat16", "trainable": trainable}, "resources": {"gpusPerNode": 8}}
    lines = {}
    for budget in (None, 4096):
        result = plan(spec(str(QWEN7B), grpo={"microBatchSize": 16, "microBatchTokens": budget}, **sections), config)
        lines[budget] = {line.name: line for line in result.trainer.lines}
    # 4 prompts x 16 trained samples over 8 ranks: 8 sequences a rank, one micro-batch without a budget
    micro, tokens_per_seq = map(int, re.search(r"(\d+) sequences × (\d+) tokens",
                                               lines[None]["activations (estimate)"].note).groups())
    assert micro == 8 and micro * tokens_per_seq > 4096
    assert "4096 tokens (grpo.microBatchTokens)" in lines[4096]["activations (estimate)"].note
    assert lines[4096]["activations (estimate)"].bytes == pytest.approx(
        lines[None]["activations (estimate)"].bytes * 4096 / (micro * tokens_per_seq), rel=1e-6)
    assert lines[4096]["logits (estimate)"].bytes == pytest.approx(
        lines[None]["logits (estimate)"].bytes * 4096 / (micro * 1024), rel=1e-6)  # maxNewTokens 1024


def test_an_offloaded_reference_leaves_the_gpu_for_host_memory():
    config = load_config(str(QWEN7B))
    sections = {"model": {"dtype": "bfloat16"}, "resources": {"gpusPerNode": 8, "memory": "256Gi"}}
    resident = plan(spec(str(QWEN7B), **sections), config)
    sections["resources"] |= {"offloadReference": True}
    offloaded = plan(spec(str(QWEN7B), **sections), config)
    resident_ref, offloaded_ref = ({line.name: line.bytes for line in result.trainer.lines}["reference model"]
                                   for result in (resident, offloaded))
    weights = 2 * model_shape(config).total
    assert resident_ref == weights and offloaded_ref < weights
    assert offloaded.host_offload - resident.host_offload == weights * 8  # each of the node's 8 ranks keeps one
    sections["resources"] |= {"memory": "64Gi"}
    short = plan(spec(str(QWEN7B), **sections), config)
    assert any("raise resources.memory" in warning for warning in short.warnings)
