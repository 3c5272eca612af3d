"""The shared rollout service (`ttrv serve --shared`) with the vLLM engine (the CPU build, from .venv-vllm) as a real
process: two runs' adapters loaded at runtime side by side, each run's samples scored by peft under its own adapter
(and not under the other's), a run's newer version replacing its older adapter."""

from __future__ import annotations

import threading

import pytest
import yaml
from PIL import Image
from rollout_util import QUESTION, assert_logprobs_match, publish_adapter, tiny_models, transformers_view

from ttrv.data import Prompt
from ttrv.rollout.client import ServiceEngine
from ttrv.rollout.supervisor import ServeProcess
from ttrv.spec import RunSpec
from ttrv.store import open_store

pytestmark = pytest.mark.vllm


def test_two_runs_share_one_vllm_each_with_its_own_adapter(tmp_path):
    weights = tiny_models(tmp_path)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    prompt = Prompt("red", QUESTION, str(tmp_path / "red.png"))
    hf = transformers_view(weights, [prompt])
    document = {"data": {"path": "ttrv://tiny-shapes/test"},
                "model": {"path": str(weights["A"]), "lora": {"rank": 8, "alpha": 16}},
                "rollout": {"engine": "vllm", "maxNewTokens": 8}}
    stores = {run: f"file://{tmp_path}/store-{run}" for run in ("a", "b")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({**document, "name": "shared",
                                                       "storage": {"uri": f"file://{tmp_path}/none"}}))
    (tmp_path / "runs.yaml").write_text(yaml.safe_dump({"runs": [{"name": r, "storage": s} for r, s in stores.items()],
                                                        "maxLoras": 2}))
    adapters = {}
    for seed, run in enumerate(stores, start=1):
        with open_store(stores[run]) as store:
            adapters[run] = publish_adapter(store, 1, weights["A"], tmp_path / f"adapter-{run}", seed)
    service = ServeProcess(tmp_path / "run.yaml", tmp_path / "serve.log", args=("--shared", str(tmp_path / "runs.yaml")))
    service.start()
    try:
        clients = {run: ServiceEngine(service.url, RunSpec.model_validate({**document, "name": run,
                                                                          "storage": {"uri": stores[run]}}),
                                      retry_seconds=120, sync_timeout=120) for run in stores}
        samples = {}

        def sample(run):
            clients[run].load_version(1)
            samples[run] = clients[run].generate([prompt], 8, 1.0, 1.0, 8, seed=3)[0]

        threads = [threading.Thread(target=sample, args=(run,)) for run in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        batch = hf["batches"]["red"]
        for run, other in (("a", "b"), ("b", "a")):
            assert assert_logprobs_match(adapters[run], hf, batch, samples[run]) >= 8
            with pytest.raises(AssertionError):
                assert_logprobs_match(adapters[other], hf, batch, samples[run])

        with open_store(stores["a"]) as store:
            newer = publish_adapter(store, 2, weights["A"], tmp_path / "adapter-a2", seed=7)
        clients["a"].load_version(2)
        assert assert_logprobs_match(newer, hf, batch, clients["a"].generate([prompt], 8, 1.0, 1.0, 8)[0]) >= 8
        status, state = service.request("GET", "/weight_version")
        assert status == 200 and sorted(name.split("_")[0] for name in state["adapters"]) == ["a", "b"]
        assert {run: s["weight_version"] for run, s in state["runs"].items()} == {"a": 2, "b": 1}
    finally:
        assert service.stop() == 0, service.log_tail()
