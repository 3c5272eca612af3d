"""The experiment's shared rollout service (`ttrv.rollout.shared`) with the Hugging Face engine, in this process:
two runs' adapters of different weights served side by side, each request sampled with its own run's adapter
(checked against peft computing each adapter alone), older versions and finished runs unloaded."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image
from rollout_util import (
    QUESTION,
    assert_logprobs_match,
    publish_adapter,
    tiny_models,
    transformers_view,
)

from ttrv.data import Prompt
from ttrv.modeling import load_processor, model_inputs
from ttrv.rollout.api import ServiceLimits
from ttrv.rollout.chat import samples_from_completion
from ttrv.rollout.client import ServiceEngine
from ttrv.rollout.hf import VISION_TOKEN_FIELDS
from ttrv.rollout.shared import (
    HFSharedEngine,
    SharedAgents,
    SharedRollout,
    SharedRolloutService,
    cpu_threads,
    load_shared,
)
from ttrv.spec import RunSpec
from ttrv.spec.base import SpecError
from ttrv.store import open_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("shared")
    weights = tiny_models(work)
    Image.new("RGB", (56, 56), (200, 30, 30)).save(work / "red.png")
    prompt = Prompt("red", QUESTION, str(work / "red.png"))
    hf = transformers_view(weights, [prompt], VISION_TOKEN_FIELDS)
    spec = RunSpec.model_validate({"name": "shared", "data": {"path": "ttrv://tiny-shapes/test"},
                                   "model": {"path": str(weights["A"]), "lora": {"rank": 8, "alpha": 16}},
                                   "rollout": {"engine": "hf", "maxNewTokens": 8}})
    shared = SharedRollout.model_validate({"runs": [{"name": name, "storage": f"file://{work}/store-{name}"}
                                                    for name in ("a", "b")], "maxLoras": 2})
    (work / "images").mkdir()
    engine = HFSharedEngine(spec, str(weights["A"]), work / "images")
    threads = torch.get_num_threads()  # the engine sets them for the process (cpu_threads): given back after
    engine.start()
    agents = SharedAgents(shared, spec, engine, work)
    service = SharedRolloutService(spec, engine, agents, ServiceLimits(), work)
    service.started = True
    yield {"work": work, "weights": weights, "prompt": prompt, "hf": hf, "spec": spec, "engine": engine,
           "agents": agents, "service": service}
    engine.close()
    agents.close()
    torch.set_num_threads(threads)


def body(setup, run, version):
    document = ServiceEngine("http://unused", setup["spec"])._body(setup["prompt"], 8, 1.0, 1.0, 8, 7)
    return {**document, "model": run, "ttrv_weight_version": version, "logprobs": True}


def sampled(answer):
    status, document = answer
    assert status == 200, document
    return [sample for sample, _ in samples_from_completion(document, 8, logprobs=True)]


def test_each_run_is_sampled_with_its_own_adapter_only(setup):
    work, agents, service, hf = setup["work"], setup["agents"], setup["service"], setup["hf"]
    adapters = {}
    for seed, run in enumerate(("a", "b"), start=1):
        store = agents.stores[run]
        adapters[run] = publish_adapter(store, 1, setup["weights"]["A"], work / f"adapter-{run}", seed)
        assert agents.agents[run].sync_once() is True
        agents.agents[run].synced.set()  # what its thread sets after a look at the store (not started here)
    assert agents.agents["a"].version == agents.agents["b"].version == 1
    # both runs' requests at once, with the same seed: they share the sampling batches (peft's mixed batch)
    answers = {}
    threads = [threading.Thread(target=lambda r=run: answers.__setitem__(r, service.chat(body(setup, r, 1))))
               for run in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    batch = hf["batches"]["red"]
    samples = {run: sampled(answers[run]) for run in ("a", "b")}
    for run, other in (("a", "b"), ("b", "a")):
        assert answers[run][1]["model"] == run
        assert assert_logprobs_match(adapters[run], hf, batch, samples[run]) >= 8
        with pytest.raises(AssertionError):  # the other run's adapter gives other log-probs to these tokens
            assert_logprobs_match(adapters[other], hf, batch, samples[run])
    # a request served alone gives the same tokens as the one batched with the other run's
    alone = sampled(service.chat(body(setup, "a", 1)))
    assert [s.token_ids for s in alone] == [s.token_ids for s in samples["a"]]


def test_pins_unknown_runs_old_versions_and_finished_runs(setup):
    work, agents, service, engine = setup["work"], setup["agents"], setup["service"], setup["engine"]
    if agents.agents["a"].version is None:
        pytest.skip("needs the versions of the test before")
    status, document = service.chat(body(setup, "a", 0))
    assert status == 409 and "ttrv_weight_version" in document["error"]["message"]
    status, document = service.chat(body(setup, "c", 1))
    assert status == 404 and "'a', 'b'" in document["error"]["message"]
    before = engine.loaded_adapters()
    publish_adapter(agents.stores["a"], 2, setup["weights"]["A"], work / "adapter-a2", seed=5)
    assert agents.agents["a"].sync_once() is True
    after = engine.loaded_adapters()
    assert len(before) == len(after) == 2 and [n for n in after if n.startswith("a_")][0].startswith("a_v000002-")
    status, state = service.weight_version("a")
    assert (status, state["weight_version"]) == (200, 2)
    agents.stores["b"].put_json("report.json", {"done": True})
    agents.check_finished()
    assert [n.split("_")[0] for n in engine.loaded_adapters()] == ["a"]
    status, document = service.chat(body(setup, "b", 1))
    assert status == 410 and "finished" in document["error"]["message"]
    assert sampled(service.chat(body(setup, "a", 2)))


def test_metrics_say_each_runs_version(setup):
    """GET /metrics of the shared service (its FastAPI app, in process) parses as Prometheus text and has one
    weight-version sample per run, labelled with the run (a single version gauge of a dict answered 500)."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from ttrv.rollout.service import build_app

    with TestClient(build_app(setup["service"])) as http:
        answer = http.get("/metrics")
    assert answer.status_code == 200, answer.text
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(answer.text) for sample in family.samples}
    agents = setup["agents"].agents
    for run, agent in agents.items():
        version = agent.version
        assert samples[("ttrv_rollout_weight_version", (("run", run),))] == (-1 if version is None else version)
    assert samples[("ttrv_rollout_refused_versions", ())] == sum(len(agent.refused) for agent in agents.values())


def test_the_shared_engine_caps_images_as_the_trainer(setup, tmp_path):
    """model.maxPixels reaches the shared engine's processor as it reaches the trainer's (`ttrv.train`) and a
    run's own service: the votes are sampled from the image tokens the trainer scores (the shared engine used the
    checkpoint's own cap)."""
    Image.new("RGB", (1600, 1200), (10, 200, 30)).save(tmp_path / "large.png")
    prompt = Prompt("large", QUESTION, str(tmp_path / "large.png"))
    path, spec = setup["weights"]["A"], setup["spec"]
    served = model_inputs(setup["engine"].engine.processor, [prompt])["image_grid_thw"].tolist()
    assert served == model_inputs(load_processor(path, False, spec.model.max_pixels), [prompt])["image_grid_thw"].tolist()
    assert served != model_inputs(load_processor(path), [prompt])["image_grid_thw"].tolist()


def test_a_shared_service_needs_lora(tmp_path):
    spec = RunSpec.model_validate({"data": {"path": "ttrv://tiny-shapes/test"}})
    (tmp_path / "runs.yaml").write_text("runs: [{name: a, storage: 'file:///x'}]\n")
    with pytest.raises(SpecError, match="model.lora"):
        load_shared(tmp_path / "runs.yaml", spec)
    (tmp_path / "runs.yaml").write_text("runs: [{name: a, storage: x}, {name: a, storage: y}]\n")
    with pytest.raises(SpecError, match="listed twice"):
        load_shared(tmp_path / "runs.yaml", spec)


def test_open_store_is_used_per_run(tmp_path):
    with open_store(f"file://{tmp_path}/s") as store:
        assert store.get_json("report.json") is None


def test_the_shared_engine_on_a_cpu_samples_on_one_thread_unless_told(monkeypatch):
    """On shared cores, MultiLora's extra small per-layer ops at torch's default threads made `ttrv serve --shared`
    5x slower than a plain service (cpu_threads): the sampling thread, started after the engine, must see 1."""
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert cpu_threads() == 1
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [1]
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert cpu_threads() == 2  # an explicit setting is kept
    finally:
        torch.set_num_threads(before)
