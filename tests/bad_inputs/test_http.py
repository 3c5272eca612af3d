"""Hostile and broken requests to `ttrv serve` (its app on a real uvicorn socket in this process, the real Hugging Face
engine on the bundled tiny model, the real sync agent): each is answered, bounded in time and memory, with nothing
left behind and no server path in the answer.

- the catalogue (`case`): request fields out of range, of the wrong type, NaN or infinite, over the service's limits
  on n, max_tokens and image pixels: 400 naming the field;
- what no HTTP client sends (raw sockets): any Content-Length (-1, huge, not a number, more than is sent, less
  than is sent), chunked bodies over the limit, malformed headers, connections that stall or drip;
- requests past the service's capacity (503 with Retry-After), a client that goes away (its generation stops), the
  image decoded once per request whatever n.
"""

from __future__ import annotations

import base64
import json
import math
import tempfile
import threading
import time

import httpx
import pytest
from http_util import LIMITS, Raw, chat_body, png, request_bytes, served_in_process

import ttrv.modeling
from bad_inputs.catalogue import Case, cases, check
from ttrv.rollout.api import ServiceLimits


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_in_process(tmp_path_factory.mktemp("http")) as running:
        yield running


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served.url, trust_env=False, timeout=30) as client:
        yield client


def post(http, body) -> tuple[int, dict]:
    """POST the chat endpoint with `body` as it is (NaN and Infinity written as Python's json writes them)."""
    response = http.post("/v1/chat/completions", content=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
    return response.status_code, response.json()


def assert_no_server_path(served, text: str) -> None:
    for folder in {str(served.work), tempfile.gettempdir()}:
        assert folder not in text, f"the answer shows the server folder {folder}: {text}"


# --- the catalogue: fields ------------------------------------------------------------------------------------------
FINITE = "Input should be a finite number"
FIELDS = cases("http request", [
    ("temperature-nan", {"temperature": math.nan}, ("temperature",), FINITE),
    ("temperature-inf", {"temperature": math.inf}, ("temperature",), FINITE),
    ("temperature-negative", {"temperature": -0.5}, ("temperature",), "greater than or equal to 0"),
    ("temperature-string", {"temperature": "hot"}, ("temperature",), "valid number"),
    ("temperature-bool", {"temperature": True}, ("temperature",), "valid number"),
    ("top-p-nan", {"top_p": math.nan}, ("top_p",), FINITE),
    ("top-p-minus-inf", {"top_p": -math.inf}, ("top_p",), FINITE),
    ("top-p-zero", {"top_p": 0}, ("top_p",), "greater than 0"),
    ("top-p-over-one", {"top_p": 1.5}, ("top_p",), "less than or equal to 1"),
    ("n-zero", {"n": 0}, ("n",), "greater than or equal to 1"),
    ("n-over-limit", {"n": LIMITS.max_n + 1}, ("n",), f"less than or equal to {LIMITS.max_n}"),
    ("n-twenty-thousand", {"n": 20_000}, ("n",), f"less than or equal to {LIMITS.max_n}"),
    ("n-huge-integer", {"n": 10**40}, ("n",), f"less than or equal to {LIMITS.max_n}"),
    ("n-float", {"n": 2.0}, ("n",), "valid integer"),
    ("n-bool", {"n": True}, ("n",), "valid integer"),
    ("max-tokens-over-limit", {"max_tokens": LIMITS.max_tokens + 1}, ("max_tokens",),
     f"less than or equal to {LIMITS.max_tokens}"),
    ("max-tokens-zero", {"max_tokens": 0}, ("max_tokens",), "greater than or equal to 1"),
    ("max-completion-tokens-over-limit", {"max_completion_tokens": 10**9}, ("max_completion_tokens",),
     f"less than or equal to {LIMITS.max_tokens}"),
    ("seed-negative", {"seed": -1}, ("seed",), "greater than or equal to 0"),
    ("seed-over-64-bits", {"seed": 2**64}, ("seed",), "less than"),
    ("version-string", {"ttrv_weight_version": "3"}, ("ttrv_weight_version",), "valid integer"),
    ("version-negative", {"ttrv_weight_version": -1}, ("ttrv_weight_version",), "greater than or equal to 0"),
    ("version-bool", {"ttrv_weight_version": True}, ("ttrv_weight_version",), "valid integer"),
    ("messages-missing", {"messages": None}, ("messages",), "Field required"),
    ("messages-string", {"messages": "hello"}, ("messages",), "valid list"),
    ("content-part-unknown", {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]},
     ("messages.0.content",), "does not match any of the expected tags"),
    ("two-turns", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     ("messages",), "expected one user turn"),
    ("image-not-data-url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}}]}]},
     ("messages[0].content[0].image_url.url",), "images are sent inline"),
    ("image-not-base64", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}]},
     ("messages[0].content[0].image_url.url",), "does not decode"),
    ("image-not-an-image", chat_body(b"\x89PNG\r\n\x1a\n but not really"), ("messages[0].content",),
     "send a PNG or JPEG"),
    ("image-over-pixel-limit", chat_body(png(200, 200)), ("messages[0].content", "200x200"), "downscale it"),
    ("greedy-with-n", {"temperature": 0, "n": 2}, ("n",), "send n: 1"),
    ("unsupported-field", {"presence_penalty": 0.5}, ("presence_penalty",), "remove it"),
    ("stream", {"stream": True}, ("stream",), "send stream: false"),
    ("body-array", [1, 2], ("the body",), "JSON object"),
])


def case_body(value):
    """A case's body: as it is when it is not an object or is a whole request, else the trainer's request with
    the case's fields over it (None: the field left out)."""
    if not isinstance(value, dict) or "model" in value:
        return value
    return {key: field for key, field in {**chat_body(), **value}.items() if field is not None}


@pytest.mark.parametrize("case", FIELDS)
def test_a_bad_field_is_refused_with_400_naming_it(served, http, case: Case):
    status, answer = post(http, case_body(case.input))
    assert status == 400, answer
    message = answer["error"]["message"]
    assert answer["error"]["code"] == 400 and "ttrv_weight_version" in answer
    assert_no_server_path(served, message)
    check(case, status, message, served.images())


def test_a_good_request_is_answered_and_leaves_no_file(served, http):
    status, answer = post(http, chat_body(png(56, 56), n=3))
    assert status == 200, answer
    assert len(answer["choices"]) == 3 and all(choice["token_ids"] for choice in answer["choices"])
    assert served.images() == []


def test_an_image_that_fails_to_decode_names_no_server_path_and_leaves_no_file(served, http):
    """A PNG whose header reads (so it is written and queued) but whose pixels are cut off: the engine's own error,
    which names the file it read, is answered without the server's folder."""
    damaged = png(64, 64)[:-40]
    status, answer = post(http, chat_body(damaged))
    assert status == 400, answer
    assert "unreadable image" in answer["error"]["message"]
    assert_no_server_path(served, answer["error"]["message"])
    assert served.images() == []


def test_the_image_is_decoded_once_per_request_whatever_n(served, http, monkeypatch):
    decoded = []
    real = ttrv.modeling.load_image

    def counting(path):
        decoded.append(path)
        return real(path)

    monkeypatch.setattr(ttrv.modeling, "load_image", counting)
    status, answer = post(http, chat_body(png(96, 96), n=LIMITS.max_n))
    assert status == 200 and len(answer["choices"]) == LIMITS.max_n, answer
    assert len(decoded) == 1, f"the image was decoded {len(decoded)} times for one request of n={LIMITS.max_n}"


# --- raw requests: bodies ----------------------------------------------------------------------------------------------
def raw_answer(served, data: bytes, then_send: bytes = b"") -> tuple[int | None, dict, bytes, Raw]:
    connection = Raw(served.port).send(data)
    if then_send:
        connection.send(then_send)
    return (*connection.answer(), connection)


@pytest.mark.parametrize(("length", "expected"), [
    ("-1", 400), ("+10", 400), ("0x10", 400), ("abc", 400), ("", 400), ("1e3", 400),
    # h11 reads at most 20 digits (h11/_headers.py, CONTENT_LENGTH_MAX_DIGITS): more is malformed
    (str(10**30), 400), (str(10**19), 413), (str(LIMITS.max_body_bytes + 1), 413), ("10, 20", 400),
])
def test_any_content_length_is_answered_without_reading_the_body(served, length, expected):
    started = time.monotonic()
    status, headers, body, connection = raw_answer(served, request_bytes(b"{}", length=length))
    try:
        assert status == expected, body
        assert time.monotonic() - started < LIMITS.body_seconds, "the server waited for a body it should refuse"
        assert_no_server_path(served, body.decode())
        # refused before its body was read: the connection closes rather than read a body of any length
        assert connection.closed_within(5) is not None
    finally:
        connection.close()


def test_two_different_content_lengths_are_refused(served):
    data = request_bytes(b"{}", headers={"Content-Length": "5"})
    status, _, _, connection = raw_answer(served, data)
    connection.close()
    assert status == 400


def test_a_body_shorter_than_its_content_length_times_out(served):
    started = time.monotonic()
    status, headers, body, connection = raw_answer(served, request_bytes(b'{"messages": [', length="1000"))
    try:
        assert status == 408, body
        assert LIMITS.body_seconds <= time.monotonic() - started < LIMITS.body_seconds + 5
        assert json.loads(body)["error"]["message"].startswith("the body did not arrive")
        assert connection.closed_within(5) is not None
    finally:
        connection.close()


def test_a_body_longer_than_its_content_length_is_not_taken_as_json(served):
    """The bytes past Content-Length are the next request on the connection: garbage, answered 400 by h11."""
    connection = Raw(served.port).send(request_bytes(b'{}{"n": 1, "extra": "x"}', length="2"))
    try:
        first, _, body, _ = (*connection.answer(), None)
        assert first == 400 and "messages" in json.loads(body)["error"]["message"]
        second, _, _ = connection.answer()
        assert second in (400, None)
    finally:
        connection.close()


def chunked(chunks: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


def chunked_head() -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def test_a_chunked_body_is_read_and_validated(served):
    data = json.dumps(chat_body(n=1)).encode()
    status, _, body, connection = raw_answer(served, chunked_head() + chunked([data[:10], data[10:]]))
    connection.close()
    assert status == 200, body


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(served):
    connection = Raw(served.port).send(chunked_head())
    sent, block = 0, b"x" * 65536
    try:
        with pytest.raises(OSError):  # the server answers and closes: the send fails before all is sent
            while sent < 20 * LIMITS.max_body_bytes:
                connection.send(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
        status, _, body = connection.answer()
    except OSError:  # reset before the answer could be read: the 413 went out, the connection is gone
        status, body = 413, b""
    finally:
        connection.close()
    assert status == 413, body
    assert sent < 20 * LIMITS.max_body_bytes


def test_a_chunked_body_with_a_content_length_too(served):
    data = chunked_head().replace(b"\r\n\r\n", b"\r\nContent-Length: 99999999999\r\n\r\n") + chunked([b"{}"])
    status, _, _, connection = raw_answer(served, data)
    connection.close()
    assert status in (400, 413)


# --- raw requests: headers and stalled connections ----------------------------------------------------------------
@pytest.mark.parametrize("data", [
    b"GET /health HTTP/1.1\r\nHost: test\r\nNo colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: test\r\nBad\x00Name: 1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: test\r\nX: a\x00b\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: test\r\nX: 1\r\n\r\n".replace(b"\r\n", b"\n\r"),
    b"GET /health HTTP/1.1 extra\r\nHost: test\r\n\r\n",
    b"HELLO\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # no Host, which HTTP/1.1 requires
    # headers that never end, past h11_max_incomplete_event_size (64 KiB): refused, not buffered
    b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 100_000,
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # a TLS hello on the plain port
], ids=["no-colon", "nul-in-name", "nul-in-value", "swapped-line-ends", "junk-after-version", "no-request-line", "no-host",
        "header-over-64k", "tls-hello"])
def test_malformed_requests_get_an_answer(served, data):
    connection = Raw(served.port)
    try:
        connection.send(data)
        status, _, body = connection.answer()
        assert status is not None and 400 <= status < 500, body
        assert connection.closed_within(5) is not None
    finally:
        connection.close()


@pytest.mark.parametrize("opening", [b"", b"GET /hea", b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"])
def test_a_stalled_connection_is_dropped(served, opening):
    connection = Raw(served.port).send(opening) if opening else Raw(served.port)
    try:
        waited = connection.closed_within(LIMITS.header_seconds + 5)
        assert waited is not None, "the server held a silent connection"
    finally:
        connection.close()


def test_a_connection_dripping_its_headers_is_dropped(served):
    connection = Raw(served.port)
    started = time.monotonic()
    try:
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                connection.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert connection.closed_within(1) is not None
    finally:
        connection.close()
    assert time.monotonic() - started < LIMITS.header_seconds + 3


def test_an_idle_kept_alive_connection_is_closed(served):
    connection = Raw(served.port).send(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
    try:
        status, _, _ = connection.answer()
        assert status == 200
        waited = connection.closed_within(LIMITS.keep_alive_seconds + 5)
        assert waited is not None and waited >= LIMITS.keep_alive_seconds - 0.5
    finally:
        connection.close()


# --- capacity, cancellation ---------------------------------------------------------------------------------------
def test_past_max_in_flight_requests_get_503_with_retry_after(served, http):
    """The requests held count from their headers: LIMITS.max_in_flight connections that send headers and stall
    on their bodies fill the service; the next chat request gets 503 at once, GET /health still answers, and once
    they have timed out (408) the service takes requests again."""
    stalled = [Raw(served.port).send(request_bytes(b"", length="100")) for _ in range(LIMITS.max_in_flight)]
    try:
        deadline = time.monotonic() + 5
        while served.service.in_flight < LIMITS.max_in_flight:
            assert time.monotonic() < deadline, served.service.in_flight
            time.sleep(0.01)
        response = http.post("/v1/chat/completions", json=chat_body(n=1))
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(LIMITS.retry_after_seconds)
        assert "ttrv_weight_version" in response.json() and "retry after" in response.json()["error"]["message"]
        assert http.get("/health").status_code == 200
        assert [connection.answer()[0] for connection in stalled] == [408] * LIMITS.max_in_flight
    finally:
        for connection in stalled:
            connection.close()
    assert post(http, chat_body(n=1))[0] == 200


def test_the_trainers_client_waits_as_long_as_retry_after_says(served, log_stream):
    """The service is full (every slot held by a stalled upload): the trainer's client is told 503 with
    Retry-After, waits that long rather than its own shorter back-off, and gets its samples once the slots free."""
    from ttrv.data import Prompt
    from ttrv.rollout.client import ServiceEngine

    stalled = [Raw(served.port).send(request_bytes(b"", length="100")) for _ in range(LIMITS.max_in_flight)]
    client = ServiceEngine(served.url, served.service.spec, retry_seconds=60)
    try:
        deadline = time.monotonic() + 5
        while served.service.in_flight < LIMITS.max_in_flight:
            assert time.monotonic() < deadline, served.service.in_flight
            time.sleep(0.01)
        (samples,) = client.generate([Prompt("p", "What is shown? Options:\nA. cat\nB. dog", None)], 2, 1.0, 1.0, 4)
    finally:
        client.close()
        for connection in stalled:
            connection.close()
    assert len(samples) == 2
    retries = [json.loads(line) for line in log_stream.getvalue().splitlines() if "rollout_request_retry" in line]
    assert retries and all(retry["retry_in"] >= LIMITS.retry_after_seconds for retry in retries), retries
    assert "HTTP 503" in retries[0]["problem"]


def test_a_client_that_goes_away_gets_no_further_votes(served, http, monkeypatch):
    """Two requests, each disconnected while the one sampling thread is held: the first while its batch is about to
    be sampled (it stops before sampling anything), the second while it waits in the queue behind (it leaves the
    queue, never sampled). The engine then answers the next request at once."""
    engine = served.engine.engine
    real, calls, entered, release = engine.generate, [], threading.Event(), threading.Event()

    def held(prompts, *args, **kwargs):
        calls.append(len(prompts))
        entered.set()
        release.wait(30)
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "generate", held)
    before = served.engine.stopped_early
    first = Raw(served.port).send(request_bytes(chat_body(png(56, 56), n=LIMITS.max_n)))
    assert entered.wait(30), "the first request never reached the engine"
    second = Raw(served.port).send(request_bytes(chat_body(png(56, 56), n=LIMITS.max_n - 1)))
    deadline = time.monotonic() + 10
    while len(served.engine._pending) < 1:
        assert time.monotonic() < deadline, "the second request was never queued"
        time.sleep(0.01)
    first.close()
    second.close()
    deadline = time.monotonic() + 10
    while served.engine._pending:  # the second leaves the queue once its disconnect is seen
        assert time.monotonic() < deadline, "the cancelled request stayed in the queue"
        time.sleep(0.02)
    time.sleep(0.3)  # the first one's disconnect is seen too
    release.set()
    deadline = time.monotonic() + 30
    while served.engine.stopped_early == before:
        assert time.monotonic() < deadline, "the abandoned batch was sampled to its end"
        time.sleep(0.02)
    monkeypatch.setattr(engine, "generate", real)
    assert calls == [1], f"the engine sampled batches {calls}: the queued request was not dropped"
    assert served.images() == []
    assert post(http, chat_body(n=1))[0] == 200


def test_generation_stops_at_the_next_token_once_asked(served):
    """The stop hook (`HFEngine.generate(stop=...)`) is asked at every token: told to stop at its third question,
    a generation of up to 200 tokens asks no more than that."""
    from ttrv.data import Prompt

    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 3

    prompt = Prompt("p", "What is shown? Options:\nA. cat\nB. dog", None)
    assert served.engine.engine.generate([prompt], 4, 1.0, 1.0, 200, stop=stop) is None
    assert len(asked) <= 4, f"asked {len(asked)} times: generation went on"


# --- the description, the settings ------------------------------------------------------------------------------------
def test_the_openapi_description_is_served_with_the_limits(http):
    document = http.get("/openapi.json").json()
    assert {"/health", "/weight_version", "/v1/models", "/sync", "/v1/chat/completions"} <= set(document["paths"])
    schema = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    n = schema["properties"]["n"]["anyOf"][0]
    assert (n["minimum"], n["maximum"]) == (1, LIMITS.max_n)
    assert set(schema["required"]) == {"messages"}


def test_limits_from_the_environment():
    assert ServiceLimits.from_env({"TTRV_SERVE_MAX_N": "512", "TTRV_SERVE_BODY_SECONDS": "2.5"}) == \
        ServiceLimits(max_n=512, body_seconds=2.5)
    for value in ("lots", "0", "-3"):
        with pytest.raises(ValueError, match="TTRV_SERVE_MAX_N"):
            ServiceLimits.from_env({"TTRV_SERVE_MAX_N": value})


def test_base64_payload_over_the_body_limit_is_413(served, http):
    image = base64.b64encode(b"\x00" * (LIMITS.max_body_bytes + 10)).decode()
    body = chat_body()
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}})
    status, answer = post(http, body)
    assert status == 413 and "MiB" in answer["error"]["message"]
    assert served.images() == []


def test_sync_reads_its_body_and_keeps_the_connection(served):
    """The trainer's POST /sync carries {"step": k}: read (within the limit), so its pooled connection serves the
    next call; one over the limit is refused and closed."""
    connection = Raw(served.port)
    try:
        for step in (1, 2):
            status, headers, _ = connection.send(request_bytes({"step": step}, path="/sync")).answer()
            assert status == 202 and headers.get("connection") != "close"
        status, _, _ = connection.send(request_bytes(b"", path="/sync", length=str(10**12))).answer()
        assert status == 413 and connection.closed_within(5) is not None
    finally:
        connection.close()
