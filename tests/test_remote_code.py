"""model.trustRemoteCode: a checkpoint that ships its own Python code (config.json's auto_map) is refused with a
message naming the field unless the spec opts in, and its code never runs then; with the opt-in it loads through
the same loaders (trainer, in-process engine, `ttrv serve`) and vLLM gets --trust-remote-code. The checkpoint is the
bundled tiny model with a remote configuration class that leaves a marker file when Python imports it."""

from __future__ import annotations

import json
import shutil

import pytest

from ttrv.modeling import load_model, load_processor
from ttrv.rollout.vllm_process import vllm_flags
from ttrv.spec import RunSpec
from ttrv.weights import resolve_model

REMOTE_CONFIGURATION = '''
import pathlib
from transformers import Qwen2_5_VLConfig

pathlib.Path({marker!r}).touch()


class RemoteConfig(Qwen2_5_VLConfig):
    model_type = "ttrv_remote_vl"
'''

REMOTE_MODELING = '''
from transformers import Qwen2_5_VLForConditionalGeneration

from .configuration_remote import RemoteConfig


class RemoteModel(Qwen2_5_VLForConditionalGeneration):
    config_class = RemoteConfig
'''


@pytest.fixture
def remote_checkpoint(tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(resolve_model("ttrv://tiny-qwen2vl"), folder)
    (folder / "configuration_remote.py").write_text(REMOTE_CONFIGURATION.format(marker=str(tmp_path / "RAN")))
    (folder / "modeling_remote.py").write_text(REMOTE_MODELING)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "ttrv_remote_vl"  # a type transformers does not know: only the checkpoint's code reads it
    config["auto_map"] = {"AutoConfig": "configuration_remote.RemoteConfig",
                          "AutoModelForImageTextToText": "modeling_remote.RemoteModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_is_refused_by_default_and_never_runs(remote_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="model.trustRemoteCode: true") as error:
        load_processor(remote_checkpoint)
    assert "InternVL3-2B-hf" in str(error.value)
    assert not (tmp_path / "RAN").exists()


def test_trusted_remote_code_loads_and_reaches_vllm(remote_checkpoint, tmp_path):
    processor = load_processor(remote_checkpoint, trust_remote_code=True)
    model = load_model(remote_checkpoint, trust_remote_code=True)
    assert type(model.config).__name__ == "RemoteConfig" and processor.tokenizer is not None
    assert (tmp_path / "RAN").exists()  # the checkpoint's code ran, as asked

    spec = RunSpec.model_validate({"data": {"path": "ttrv://tiny-shapes/test"}, "model": {"trustRemoteCode": True}})
    assert "--trust-remote-code" in vllm_flags(spec, gpu=False)
    assert "--trust-remote-code" not in vllm_flags(RunSpec.model_validate({"data": {"path": "x.json"}}), gpu=False)
