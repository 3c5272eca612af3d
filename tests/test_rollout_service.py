"""`ttrv serve` with the Hugging Face engine as a real separate process, following a real S3 store (SeaweedFS), and
the trainer's client (`ServiceEngine`) talking to it over HTTP.

What the service answers is checked against transformers computing the same thing in this process: the log-probs
of its samples and the greedy answers under the weights it should serve. The vLLM engine behind the same service
is tested in test_rollout_service_vllm.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
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

from ttrv.data import Prompt
from ttrv.lifetime import alive
from ttrv.net import free_port
from ttrv.rollout.chat import samples_from_completion
from ttrv.rollout.client import RolloutError, RolloutUnavailableError, ServiceEngine
from ttrv.rollout.hf import VISION_TOKEN_FIELDS
from ttrv.rollout.serving import HFServingEngine
from ttrv.rollout.supervisor import ServeProcess
from ttrv.rollout.sync import RWLock, SyncAgent
from ttrv.rollout.vllm_process import VLLMProcess
from ttrv.spec import RunSpec
from ttrv.store import open_store, weights_prefix


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("rollout-service")


@pytest.fixture(scope="module")
def weights(work):
    return tiny_models(work)


@pytest.fixture(scope="module")
def prompts(work):
    for name, colour in [("red", (200, 30, 30)), ("blue", (30, 30, 200))]:
        Image.new("RGB", (56, 56), colour).save(work / f"{name}.png")
    return [Prompt("red", QUESTION, str(work / "red.png")), Prompt("blue", QUESTION, str(work / "blue.png"))]


@pytest.fixture(scope="module")
def hf(weights, prompts):
    """transformers' view; the Hugging Face engine never samples the vision tokens."""
    return transformers_view(weights, prompts, VISION_TOKEN_FIELDS)


@pytest.fixture(scope="module")
def spec(work, weights, module_s3_uri):
    return served_spec(work, {"name": "served", "data": {"path": "ttrv://tiny-shapes/test"},
                              "model": {"path": str(weights["A"])}, "rollout": {"engine": "hf", "maxNewTokens": 8},
                              "storage": {"uri": module_s3_uri}})


@pytest.fixture(scope="module")
def store(spec):
    with open_store(spec.storage.uri, retry_seconds=30) as opened:
        yield opened


@pytest.fixture(scope="module")
def service(work, spec):
    with serving(work) as service:
        yield service


@pytest.fixture(scope="module")
def client(service, spec):
    return ServiceEngine(service.url, spec, retry_seconds=120, sync_timeout=60)


def test_client_gets_n_samples_per_prompt_with_transformers_log_probs(client, service, hf, prompts):
    assert service.request("GET", "/health") == (200, {"status": "ok", "engine": "hf", "weight_version": None, "in_flight": 0})
    samples = client.generate(prompts, 6, 1.0, 1.0, 8)
    assert [len(row) for row in samples] == [6, 6]
    for prompt, row in zip(prompts, samples, strict=True):
        assert all(1 <= len(s.token_ids) <= 8 and len(s.logprobs) == len(s.token_ids) for s in row)
        assert assert_logprobs_match(hf["A"], hf, hf["batches"][prompt.id], row) >= 12
    assert len({s.token_ids for row in samples for s in row}) > 2, "twelve samples at temperature 1 were all equal"
    (greedy,) = client.generate(prompts[:1], 1, 0.0, 1.0, 8)
    assert_greedy_under(hf["A"], hf, hf["batches"]["red"], greedy[0].token_ids)
    assert client.weight_version is None


def test_a_published_version_is_served_next(client, service, store, hf, weights, prompts):
    step = (store.latest_weights() or 0) + 1
    publish(store, step, language_tensors(hf["mixed"]))
    client.load_version(step)
    assert client.weight_version == step
    assert service.request("GET", "/weight_version")[1]["weight_version"] == step
    samples = client.generate(prompts, 6, 1.0, 1.0, 8)
    for prompt, row in zip(prompts, samples, strict=True):
        assert assert_logprobs_match(hf["mixed"], hf, hf["batches"][prompt.id], row) >= 12
        with pytest.raises(AssertionError):
            assert_logprobs_match(hf["A"], hf, hf["batches"][prompt.id], row)
    (greedy,) = client.generate(prompts[:1], 1, 0.0, 1.0, 8)
    assert_greedy_under(hf["mixed"], hf, hf["batches"]["red"], greedy[0].token_ids)


def test_pinned_request_for_another_version_gets_409(service, store, client, prompts):
    served = synced(client, store)
    body = client._body(prompts[0], 2, 1.0, 1.0, 4, None)
    status, answer = service.request("POST", "/v1/chat/completions", body)
    assert (status, answer["ttrv_weight_version"], len(answer["choices"])) == (200, served, 2)
    for wanted in ((served or 0) + 100, None if served is not None else 0):
        status, answer = service.request("POST", "/v1/chat/completions", {**body, "ttrv_weight_version": wanted})
        assert status == 409
        assert answer["ttrv_weight_version"] == served
        assert answer["error"]["message"].startswith("ttrv_weight_version: this service serves")
    unpinned = {key: value for key, value in body.items() if key != "ttrv_weight_version"}
    assert service.request("POST", "/v1/chat/completions", unpinned)[1]["ttrv_weight_version"] == served
    status, answer = service.request("POST", "/v1/chat/completions", {**body, "model": "other"})
    assert status == 404 and "serves 'served'" in answer["error"]["message"]
    status, answer = service.request("POST", "/v1/chat/completions", {**body, "presence_penalty": 0.5})
    assert status == 400 and answer["error"]["message"].startswith("presence_penalty: not supported")
    seeded = [service.request("POST", "/v1/chat/completions", {**body, "n": 6, "seed": 3})[1] for _ in range(2)]
    assert seeded[0]["choices"] and [c["token_ids"] for c in seeded[0]["choices"]] == \
        [c["token_ids"] for c in seeded[1]["choices"]]  # a seed fixes the votes, whatever else is batched
    with pytest.raises(RolloutError, match="HTTP 400: n: greedy decoding"):
        client._complete({**body, "temperature": 0.0}, 2, threading.Event())


def test_metrics_are_prometheus_text_with_the_services_state(service, client, prompts):
    """GET /metrics of a real `ttrv serve` (Hugging Face engine) parses as Prometheus' text format (prometheus_client's
    own parser) and says what the service does: up, the version served, the requests answered by route."""
    from prometheus_client.parser import text_string_to_metric_families

    client.generate(prompts[:1], 2, 1.0, 1.0, 2)
    with urllib.request.urlopen(f"{service.url}/health", timeout=30) as answer:
        served = json.loads(answer.read())["weight_version"]
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = answer.read().decode()
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    assert samples[("ttrv_rollout_up", ())] == 1
    assert samples[("ttrv_rollout_weight_version", ())] == (-1 if served is None else served)
    assert samples[("ttrv_rollout_engine", (("engine", "hf"),))] == 1
    assert samples[("ttrv_rollout_requests_total", (("code", "200"), ("path", "/v1/chat/completions")))] >= 1
    assert samples[("ttrv_rollout_requests_total", (("code", "200"), ("path", "/health")))] >= 1
    assert samples[("ttrv_rollout_request_duration_seconds_count", (("path", "/v1/chat/completions"),))] >= 1
    assert not any(name.startswith("vllm:") for name, _ in samples), "the Hugging Face engine has no vLLM metrics"
    # A path that is no route is counted as "other": a client cannot grow the label set.
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{service.url}/no-such-route-{time.monotonic_ns()}", timeout=30)
    with urllib.request.urlopen(f"{service.url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    assert 'ttrv_rollout_requests_total{code="404",path="other"}' in text
    assert "no-such-route" not in text


def test_every_error_answer_carries_the_served_weight_version(service, store, client):
    """Refused before the service reads the request (too large, not JSON, no such route) or by it: each answer says
    which version is served, in OpenAI's error shape."""
    served = synced(client, store)

    def raw(method: str, path: str, body: bytes = b"", length: int | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
        try:
            connection.putrequest(method, path)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body) if length is None else length))
            connection.endheaders(body)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    answers = {
        413: raw("POST", "/v1/chat/completions", length=(64 << 20) + 1),  # the header alone: it is not read
        400: raw("POST", "/v1/chat/completions", b"{not json"),
        404: raw("GET", "/no-such-route"),
        409: raw("POST", "/v1/chat/completions", json.dumps({"messages": [], "ttrv_weight_version": 10**6}).encode()),
    }
    for status, (got, answer) in answers.items():
        assert got == status and answer["error"]["code"] == status, answer
        assert "ttrv_weight_version" in answer and answer["ttrv_weight_version"] == served, answer
        assert answer["error"]["message"] and answer["error"]["type"]


def test_max_staleness_and_a_service_ahead_of_the_trainer(service, store, spec, hf, prompts):
    step = (store.latest_weights() or 0) + 1
    publish(store, step, language_tensors(hf["A"]))
    ServiceEngine(service.url, spec).load_version(step)
    one_off = RunSpec.model_validate({**spec.model_dump(), "rollout": {**spec.rollout.model_dump(), "maxStaleness": 1}})
    asynchronous = ServiceEngine(service.url, one_off, sync_timeout=5)
    asynchronous.load_version(step + 1)  # published by the trainer, not loaded yet: one step behind is enough
    assert asynchronous.weight_version == step
    assert "ttrv_weight_version" not in asynchronous._body(prompts[0], 2, 1.0, 1.0, 4, None)
    assert [len(row) for row in asynchronous.generate(prompts, 2, 1.0, 1.0, 4)] == [2, 2]
    with pytest.raises(RolloutUnavailableError, match=f"serves version {step}, newer than {step - 1}"):
        ServiceEngine(service.url, spec, sync_timeout=2).load_version(step - 1)


def test_versions_withdrawn_by_a_resumed_trainer_are_dropped(client, service, store, hf, prompts):
    """A trainer resumed from its checkpoint at step s deletes the versions published after s by the attempt that
    died, waits for s, and publishes s+1 again with other weights: the service must follow, never keep serving
    the withdrawn s+1."""
    step = (store.latest_weights() or 0) + 1
    publish(store, step, language_tensors(hf["A"]))
    client.load_version(step)
    publish(store, step + 1, language_tensors(hf["mixed"]))
    client.load_version(step + 1)
    store.delete_set(weights_prefix(step + 1))
    client.load_version(step)
    assert service.request("GET", "/weight_version")[1]["weight_version"] == step
    publish(store, step + 1, language_tensors(hf["A"]))
    client.load_version(step + 1)
    for prompt, row in zip(prompts, client.generate(prompts, 6, 1.0, 1.0, 8), strict=True):
        assert assert_logprobs_match(hf["A"], hf, hf["batches"][prompt.id], row) >= 12


def test_corrupt_version_is_refused_and_the_previous_keeps_serving(client, service, store, hf, prompts, spec):
    good = (store.latest_weights() or 0) + 1
    publish(store, good, language_tensors(hf["mixed"]))
    client.load_version(good)
    corrupt = good + 1
    publish_corrupt(store, spec.storage.uri, corrupt, language_tensors(hf["A"]))
    with pytest.raises(RolloutUnavailableError, match=f"it refused {corrupt}: .*checksum"):
        ServiceEngine(service.url, spec, sync_timeout=5).load_version(corrupt)
    state = service.request("GET", "/weight_version")[1]
    assert state["weight_version"] == good and str(corrupt) in state["refused"]
    assert service.request("GET", "/health")[0] == 200
    samples = client.generate(prompts[:1], 4, 1.0, 1.0, 8)[0]
    assert assert_logprobs_match(hf["mixed"], hf, hf["batches"]["red"], samples) >= 4

    # Republished intact, the same step is tried again and served.
    publish(store, corrupt, language_tensors(hf["A"]))
    client.load_version(corrupt)
    samples = client.generate(prompts[:1], 4, 1.0, 1.0, 8)[0]
    assert assert_logprobs_match(hf["A"], hf, hf["batches"]["red"], samples) >= 4


def test_service_killed_mid_request_the_batch_still_completes(client, service, store, prompts):
    synced(client, store)
    batch = prompts * 2
    result: dict = {}

    def sample():
        try:
            result["samples"] = client.generate(batch, 32, 1.0, 1.0, 64)
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            result["error"] = error

    thread = threading.Thread(target=sample)
    thread.start()
    deadline = time.monotonic() + 30
    while service.request("GET", "/health")[1]["in_flight"] == 0:
        assert time.monotonic() < deadline and thread.is_alive(), "no request was ever in flight"
        time.sleep(0.01)
    service.kill()
    assert thread.is_alive(), "the batch finished before the service was killed"
    service.start()
    thread.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert [len(row) for row in result["samples"]] == [32] * len(batch)
    assert all(s.token_ids and len(s.logprobs) == len(s.token_ids) for row in result["samples"] for s in row)
    assert service.request("GET", "/weight_version")[1]["weight_version"] == client.weight_version


def test_sigterm_answers_the_requests_in_flight_then_exits_0(work, client, store, prompts):
    """uvicorn's graceful shutdown: SIGTERM closes the listener, the requests being sampled are still answered,
    then `ttrv serve` exits 0. A service of its own, with a grace (TTRV_SERVE_SHUTDOWN_SECONDS) long enough for a
    loaded machine."""
    synced(client, store)
    service = ServeProcess(work / "run.yaml", work / "serve-sigterm.log",
                           env={"TTRV_SERVE_SHUTDOWN_SECONDS": "300"}).start()
    body = client._body(prompts[0], 32, 1.0, 1.0, 32, None)
    answers: list = []

    def ask():
        try:
            answers.append(service.request("POST", "/v1/chat/completions", body))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            answers.append(error)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while service.request("GET", "/health")[1]["in_flight"] == 0:
            assert time.monotonic() < deadline, "no request was ever in flight"
            time.sleep(0.01)
        assert any(thread.is_alive() for thread in threads), "the requests finished before SIGTERM"
        assert service.stop(grace=360) == 0, service.log_tail()
    finally:
        service.stop(grace=5)
    for thread in threads:
        thread.join(timeout=60)
    assert [type(answer) for answer in answers] == [tuple] * 2, answers
    assert [(status, len(answer["choices"])) for status, answer in answers] == [(200, 32)] * 2
    assert '"serve_stopping"' in service.log_tail(200)


def test_sync_agent_loads_the_newest_lora_version_merged(tmp_path, weights, prompts, hf, spec):
    """In this process: the agent skips intermediate versions and keeps only the served version's local copy, and the
    Hugging Face engine serves a LoRA version as peft computes it."""
    lora_spec = RunSpec.model_validate({**spec.model_dump(), "model": {"path": str(weights["A"]),
                                                                      "lora": {"rank": 8, "alpha": 16}}})
    (tmp_path / "images").mkdir()
    engine = HFServingEngine(lora_spec, str(weights["A"]), tmp_path / "images")
    engine.start()
    adapters = {}
    try:
        with open_store(f"{spec.storage.uri}-lora", retry_seconds=30) as lora_store:
            for step in (1, 2, 3):
                adapters[step] = publish_adapter(lora_store, step, weights["A"], tmp_path / f"adapter-{step}")
            agent = SyncAgent(lora_store, engine.load, tmp_path / "weights")
            agent.cache_dir.mkdir()
            assert agent.sync_once() is True
            assert agent.version == 3
            assert [p.name for p in agent.cache_dir.iterdir()] == [agent.path.name]
            assert agent.path.name.startswith("v000003-")
            assert agent.sync_once() is False
        body = ServiceEngine("http://unused", spec)._body(prompts[0], 8, 1.0, 1.0, 8, None)
        del body["ttrv_weight_version"], body["model"]
        samples = [sample for sample, _ in samples_from_completion(engine.complete(body), 8, logprobs=True)]
    finally:
        engine.close()
    assert assert_logprobs_match(adapters[3], hf, hf["batches"]["red"], samples) >= 8
    with pytest.raises(AssertionError):
        assert_logprobs_match(adapters[2], hf, hf["batches"]["red"], samples)


def test_sync_agent_reads_versions_straight_into_the_engine_without_files(tmp_path, weights, hf, spec):
    """In this process, as `ttrv serve` wires it: the Hugging Face engine takes each version's verified tensors from
    the store's in-memory read (parallel ranged GETs into one buffer per shard); no file is written on the way, the
    served weights are the published bits, and a corrupt version is still refused with the previous one serving."""
    (tmp_path / "images").mkdir()
    engine = HFServingEngine(spec, str(weights["A"]), tmp_path / "images")
    engine.start()
    try:
        with open_store(f"{spec.storage.uri}-memory", retry_seconds=30) as memory_store:
            tensors = language_tensors(hf["mixed"])
            publish(memory_store, 1, tensors)
            agent = SyncAgent(memory_store, engine.load, tmp_path / "weights", load_in_memory=engine.load_in_memory)
            agent.cache_dir.mkdir()
            assert agent.sync_once() is True and agent.version == 1
            assert list(agent.cache_dir.iterdir()) == [] and agent.path is None
            served = engine.engine.model.state_dict()
            assert all(torch.equal(served[name], tensor) for name, tensor in tensors.items())

            publish_corrupt(memory_store, f"{spec.storage.uri}-memory", 2, language_tensors(hf["A"]))
            assert agent.sync_once() is False
            assert agent.version == 1 and "checksum" in agent.refused[2][1]
            assert all(torch.equal(engine.engine.model.state_dict()[n], t) for n, t in tensors.items())
    finally:
        engine.close()


def test_a_reload_waits_for_requests_in_flight_and_holds_back_new_ones():
    lock, events = RWLock(), []
    reader_in, release_reader, writer_waiting = threading.Event(), threading.Event(), threading.Event()

    def reader(name, hold):
        with lock.read():
            events.append(f"{name} in")
            if hold:
                reader_in.set()
                release_reader.wait()
        events.append(f"{name} out")

    def writer():
        writer_waiting.set()
        with lock.write():
            events.append("reload")

    first = threading.Thread(target=reader, args=("request 1", True))
    first.start()
    reader_in.wait()
    reload = threading.Thread(target=writer)
    reload.start()
    writer_waiting.wait()
    time.sleep(0.1)
    second = threading.Thread(target=reader, args=("request 2", False))
    second.start()
    time.sleep(0.1)
    assert events == ["request 1 in"], "the reload or a new request overlapped the request in flight"
    release_reader.set()
    for thread in (first, reload, second):
        thread.join(timeout=5)
    assert events == ["request 1 in", "request 1 out", "reload", "request 2 in", "request 2 out"]


def test_the_vllm_process_does_not_outlive_a_killed_serve_process(tmp_path):
    """The vLLM server runs in a process group of its own (it is stopped as a group), so SIGKILL of `ttrv serve`'s
    group does not reach it; `lifetime.tie_to_parent()`, run in it before exec, has the kernel send it SIGTERM when
    its parent dies. Shown with `sleep` standing in for the server, started as VLLMProcess starts it."""
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from ttrv import lifetime\n"
        "child = subprocess.Popen(['sleep', '300'], start_new_session=True, preexec_fn=lifetime.tie_to_parent())\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(300)\n")], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the child outlived its SIGKILLed parent"


def test_requests_to_ttrv_servers_never_go_through_an_environment_proxy(tmp_path, monkeypatch):
    """The trainer's client, ServeProcess and VLLMProcess speak to their servers directly, whatever HTTP_PROXY says:
    here it names a port where nothing listens, and urllib (which would use it) fails, while they are answered."""

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):
            data = json.dumps({"path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    url = f"http://127.0.0.1:{port}"
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    try:
        # The trap works: urllib goes to the dead proxy. A new opener, since urlopen's global one read the proxy
        # variables when an earlier test first called it.
        with pytest.raises(urllib.error.URLError):
            urllib.request.build_opener().open(f"{url}/weight_version", timeout=5)
        spec = RunSpec.model_validate({"name": "proxy", "data": {"path": "ttrv://tiny-shapes/test"},
                                       "model": {"path": "ttrv://tiny-qwen2vl"}})
        assert ServiceEngine(url, spec)._request("GET", "/weight_version", None, 5) == (200, {"path": "/weight_version"})
        assert ServeProcess(tmp_path / "run.yaml", tmp_path / "log", port=port).request("GET", "/health") == \
            (200, {"path": "/health"})
        vllm = VLLMProcess("unused", port=port)
        assert vllm.healthy() and vllm.get("/v1/models") == {"path": "/v1/models"}
    finally:
        server.shutdown()
        server.server_close()


