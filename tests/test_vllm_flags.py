"""vLLM's command line, as `ttrv serve` starts vLLM's server: built from the spec in one place
(`vllm_process.vllm_flags`), every flag once, the rollout pod's GPUs and memory share included. No vLLM needed."""

from __future__ import annotations

import json

import pytest

from ttrv.rollout.vllm_process import PROMPT_TOKEN_BUDGET, VLLMProcess, model_len, vllm_flags
from ttrv.spec import RunSpec

LORA = {"rank": 8, "alpha": 16}


def spec(lora: dict | None = None, **sections) -> RunSpec:
    return RunSpec.model_validate({"name": "flags", "data": {"path": "ttrv://tiny-shapes/test"},
                                   "model": {"path": "/models/m", **({"lora": lora} if lora else {})}, **sections})


def command(run: RunSpec, gpu: bool) -> list[str]:
    return VLLMProcess(run.model.path, port=8001, flags=vllm_flags(run, gpu), python="python").command()


def values(command: list[str]) -> dict[str, str | None]:
    """Each flag's value (None for a switch), refusing a flag given twice: vLLM would keep the last and hide the
    first."""
    found: dict[str, str | None] = {}
    for index, arg in enumerate(command):
        if not arg.startswith("--"):
            continue
        name, _, value = arg.partition("=")
        assert name not in found, f"{name} is passed twice: {command}"
        following = command[index + 1] if index + 1 < len(command) else None
        found[name] = value or (following if following is not None and not following.startswith("--") else None)
    return found


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("TTRV_VLLM_ARGS", raising=False)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_every_flag_is_passed_once(gpu, lora):
    flags = values(command(spec(lora), gpu))
    assert flags["--model"] == "/models/m" and flags["--port"] == "8001"
    assert ("--enable-lora" in flags) == (lora is not None)


def test_the_rollout_pod_takes_the_spec_s_gpus_memory_share_and_lora_rank():
    run = spec(LORA, resources={"rolloutGpus": 2, "rolloutGpuMemoryUtilization": 0.7})
    flags = values(command(run, gpu=True))
    assert {name: flags.get(name) for name in ("--tensor-parallel-size", "--gpu-memory-utilization", "--dtype",
                                               "--max-lora-rank", "--max-loras")} == {
        "--tensor-parallel-size": "2", "--gpu-memory-utilization": "0.7", "--dtype": "bfloat16",
        "--max-lora-rank": "8", "--max-loras": "1"}
    assert "--enforce-eager" not in flags
    assert flags["--max-model-len"] == str(256 + 1280 + 1024)  # text, one 1280-token image, the longest response


def test_the_rollout_s_limits_and_the_image_cap_come_from_the_spec():
    """vLLM 0.32's flag names (vllm/engine/arg_utils.py, EngineArgs.add_cli_args); without them vLLM sizes its KV
    cache for the checkpoint's 128k-token length and admits any number of images of any size."""
    run = spec(rollout={"maxModelLen": 3000, "maxNumSeqs": 64, "limitMmPerPrompt": 2}, model={"path": "/models/m",
                                                                                             "maxPixels": 401408})
    for gpu in (False, True):
        flags = values(command(run, gpu))
        assert flags["--max-model-len"] == "3000" and flags["--max-num-seqs"] == "64"
        assert json.loads(flags["--limit-mm-per-prompt"]) == {"image": 2, "video": 0}
        assert json.loads(flags["--mm-processor-kwargs"]) == {"max_pixels": 401408}
    derived = spec(rollout={"maxNewTokens": 100, "limitMmPerPrompt": 2}, model={"path": "/m", "maxPixels": 28 * 28 * 10})
    assert model_len(derived) == 256 + 2 * 10 + 100


def test_without_an_image_cap_vllm_takes_the_checkpoint_s_length_on_gpu():
    run = spec(model={"path": "/models/m", "maxPixels": None}, rollout={"maxNewTokens": 64})
    gpu = values(command(run, gpu=True))
    assert "--max-model-len" not in gpu and "--mm-processor-kwargs" not in gpu
    assert values(command(run, gpu=False))["--max-model-len"] == str(PROMPT_TOKEN_BUDGET + 64)


def test_on_cpu_the_model_length_fits_the_longest_response_and_the_trainer_s_dtype():
    run = spec(rollout={"maxNewTokens": 64}, eval={"maxNewTokens": 200}, model={"path": "/m", "dtype": "bfloat16"})
    flags = values(command(run, gpu=False))
    assert flags["--max-model-len"] == str(model_len(run)) == str(256 + 1280 + 200)
    assert flags["--dtype"] == "bfloat16"
    assert flags["--gpu-memory-utilization"] == "0.3" and "--no-enable-chunked-prefill" in flags
    assert "--tensor-parallel-size" not in flags
    assert values(command(spec(), gpu=False))["--dtype"] == "float32"


def test_ttrv_vllm_args_come_last_so_that_they_win(monkeypatch):
    monkeypatch.setenv("TTRV_VLLM_ARGS", "--max-num-seqs 4 --gpu-memory-utilization=0.5")
    assert command(spec(), gpu=True)[-3:] == ["--max-num-seqs", "4", "--gpu-memory-utilization=0.5"]


def test_a_model_length_without_room_for_the_response_is_refused():
    from ttrv.spec import SpecError, parse_spec

    document = {"name": "flags", "data": {"path": "ttrv://tiny-shapes/test"},
                "rollout": {"maxModelLen": 512, "maxNewTokens": 512}}
    with pytest.raises(SpecError, match=r"maxModelLen \(512\) <= maxNewTokens \(512\).*raise maxModelLen"):
        parse_spec(document, RunSpec, "run.yaml")
