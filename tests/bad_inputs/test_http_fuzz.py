"""`ttrv serve` fuzzed against its own OpenAPI description (GET /openapi.json) with schemathesis: bodies that fit
the request model and bodies that break it (its negative mode), on every route of the service, running in this
process on a real uvicorn socket with the real Hugging Face engine on the tiny model (tests/http_util.py). Whatever
comes, the service answers, never with a 5xx, within a few seconds, and leaves no file behind. Kept under a minute:
the limits on n and max_tokens of the fuzzed service are small, so a valid request samples little."""

from __future__ import annotations

import httpx
import pytest
import requests
import schemathesis
from http_util import served_in_process
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

EXAMPLES = 200
"""Requests over all routes and both modes; the chat route gets most of them (its body is the one to break)."""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_in_process(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def test_the_service_answers_whatever_its_description_allows_or_not(served):
    # schemathesis's own pytest plugin (schemathesis.pytest.from_fixture) does not run under this pytest, so its
    # strategies are drawn here with hypothesis, and each response checked with its not_a_server_error.
    document = httpx.get(f"{served.url}/openapi.json", trust_env=False, timeout=30).json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=served.url)
    operations = {f"{op.method.upper()} {op.path}": op for op in (result.ok() for result in
                                                                      schema.get_all_operations())}
    assert "POST /v1/chat/completions" in operations and len(operations) == 6, sorted(operations)  # /metrics too
    chat = operations["POST /v1/chat/completions"]
    strategy = st.one_of(
        chat.as_strategy(GenerationMode.POSITIVE), chat.as_strategy(GenerationMode.NEGATIVE),
        *(operation.as_strategy(mode) for operation in operations.values() for mode in GenerationMode))
    seen: dict[str, int] = {}
    session = requests.Session()
    session.trust_env = False  # never through an environment proxy

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=True)
    @given(strategy)
    def fuzz(case):
        response = case.call(session=session, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        assert response.elapsed < 10, f"{case.method} {case.path} took {response.elapsed} s"
        assert served.images() == []
        seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1

    try:
        fuzz()
    finally:
        session.close()
    assert served.service.problem() is None, "the fuzzing broke the service"
    # both sides were reached: answers and refusals
    assert seen.get("200", 0) >= 1 and seen.get("400", 0) >= EXAMPLES // 4, seen
