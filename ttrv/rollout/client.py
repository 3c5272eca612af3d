"""The trainer's side of the rollout service: `ServiceEngine`, a `RolloutEngine` that samples over HTTP from
`ttrv serve` (in a cluster: the run's rollout Service, $TTRV_ROLLOUT_URL).

Versions: after publishing version k the trainer calls `load_version(k)`, which nudges the service and waits until it
serves a version within `rollout.maxStaleness` of k. On-policy (maxStaleness 0) every request then pins that exact
version (`ttrv_weight_version`; the service answers 409 to a pinned request it cannot serve), so no sample ever
comes from another version, even when the service restarts and reloads in between.

Failures: connection errors, 5xx and 409 are retried with exponential backoff and jitter for up to `retry_seconds`
per request (long enough for the service to restart and reload); then `RolloutUnavailableError`, which the trainer
turns into its retryable exit code 171. A `generate` call returns every sample of every prompt or raises: never part
of a batch. Other 4xx answers are bugs or misconfiguration and raise `RolloutError` at once.

The person watching is told at once: the first failed request of an outage logs the warning `rollout_unavailable`
with the service's reason (a service whose engine died answers 503 with the engine's own error), again every
REPORT_EVERY seconds while it lasts where the reason changed, and `rollout_available` once a request succeeds again;
not only after the whole retry budget, which is minutes long.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from ttrv import log
from ttrv.data import Prompt
from ttrv.rollout import jsonhttp
from ttrv.rollout.base import Sample, sample_seed
from ttrv.rollout.chat import openai_messages, samples_from_completion
from ttrv.rollout.jsonhttp import TRANSPORT_ERRORS
from ttrv.spec import RunSpec

logger = log.get_logger(__name__)

_RETRYABLE = (*TRANSPORT_ERRORS, ValueError)
"""Refused, reset or timed-out connections, a connection closed mid-answer, and an answer cut short (bad JSON)."""
MAX_RETRY_AFTER = 30.0
"""The longest wait a service's Retry-After makes a request take before it retries."""
REPORT_EVERY = 30.0
"""Seconds between two `rollout_unavailable` warnings of one outage (the reason changes as the service restarts)."""


class RolloutError(RuntimeError):
    """The rollout service refused a request for a reason retrying cannot fix; the message names the fix."""


class RolloutUnavailableError(RolloutError):
    """The rollout service could not be reached, or did not serve the wanted weight version, within the retry
    budget. Retryable: the trainer exits with code 171 (exitcodes.ROLLOUT_UNAVAILABLE) and is restarted."""


class ServiceEngine:
    """Samples from the rollout service at `url` (http://host:port). `spec` gives the served model's id (the run's
    name) and `rollout.maxStaleness`.

    retry_seconds: how long one request keeps retrying after its first failure. sync_timeout: how long
    `load_version` waits for the service to serve the version. request_timeout: how long one request may wait for its
    answer (a whole batch of long answers on a busy GPU). max_concurrency: prompts in flight at once, each on a
    connection of a pool of as many, kept alive between requests (httpx, `jsonhttp.client`)."""

    def __init__(self, url: str, spec: RunSpec, *, retry_seconds: float = 600.0, sync_timeout: float = 600.0,
                 request_timeout: float = 1800.0, max_concurrency: int = 16):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"rollout service URL {url!r} is not http(s)://host:port; in a cluster it comes from "
                             "TTRV_ROLLOUT_URL")
        self.url = url.rstrip("/")
        self.model = spec.name
        self.max_staleness = spec.rollout.max_staleness
        self.retry_seconds = retry_seconds
        self.sync_timeout = sync_timeout
        self.request_timeout = request_timeout
        self.max_concurrency = max_concurrency
        # a few more connections than prompts in flight: the /sync and /weight_version calls of load_version
        self._http = jsonhttp.client(max_concurrency + 4)
        self.weight_version: int | None = None
        self._target: int | None = None
        self._outage_lock = threading.Lock()
        self._outage: dict[str, Any] | None = None
        """The outage under way: since (monotonic), the reason last reported and when."""

    # ------------------------------------------------------------------------------------------------- RolloutEngine
    def generate(self, prompts: Sequence[Prompt], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int | None = None) -> list[list[Sample]]:
        if temperature == 0 and n != 1:
            raise ValueError("greedy decoding (temperature 0) gives one answer per prompt; set n=1")
        if not prompts:
            return []
        bodies = [self._body(prompt, n, temperature, top_p, max_new_tokens, seed) for prompt in prompts]
        cancelled = threading.Event()
        pool = ThreadPoolExecutor(min(self.max_concurrency, len(bodies)), thread_name_prefix="ttrv-rollout")
        try:
            futures = [pool.submit(self._complete, body, n, cancelled) for body in bodies]
            return [future.result() for future in futures]
        except BaseException:
            cancelled.set()  # the other prompts stop retrying; requests on the wire end in the background
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def load_version(self, step: int) -> None:
        """Wait until the service serves version `step` (or, with maxStaleness s, one of step-s..step)."""
        self._target = step
        oldest = step - self.max_staleness
        try:
            self._request("POST", "/sync", {"step": step}, timeout=10)
        except _RETRYABLE:
            pass  # only a nudge: the wait below finds out whether the service is there
        started = time.monotonic()
        delay, problem = 0.05, "no answer yet"
        while True:
            try:
                # ?model=: an experiment's shared service answers with this run's version (ttrv.rollout.shared)
                status, state = self._request("GET", f"/weight_version?model={self.model}", None, timeout=10)
            except _RETRYABLE as error:
                problem = f"unreachable ({type(error).__name__}: {error})"
                self._unavailable(problem)
            else:
                served = state.get("weight_version") if status == 200 else None
                if status != 200:
                    problem = f"HTTP {status}: {_message(state)}"
                    self._unavailable(problem)
                elif served is not None and served > step and self.max_staleness == 0:
                    # a resumed trainer has just withdrawn the versions after its checkpoint; the service drops
                    # them on its next look at the store
                    problem = (f"it serves version {served}, newer than {step}, which this trainer published last "
                               "(a version of an earlier attempt that the store no longer holds?)")
                elif served is not None and served >= oldest:
                    self.weight_version = served
                    logger.info("rollout_version_ready", step=step, served=served,
                                seconds=round(time.monotonic() - started, 2))
                    return
                else:
                    refused = (state.get("refused") or {}).get(str(step))
                    problem = f"it serves version {served}" + (f"; it refused {step}: {refused}" if refused else "")
            if time.monotonic() - started >= self.sync_timeout:
                raise RolloutUnavailableError(
                    f"the rollout service at {self.url} did not serve weight version {step} within "
                    f"{self.sync_timeout:.0f} s: {problem}. Check that it reads the same storage.uri as the trainer "
                    "and read its log (weights_refused, weights_sync_failed events)")
            time.sleep(delay)
            delay = min(2 * delay, 2.0)

    def close(self) -> None:
        """Closes the pooled connections."""
        self._http.close()

    # -------------------------------------------------------------------------------------------------- requests
    def _body(self, prompt: Prompt, n: int, temperature: float, top_p: float, max_tokens: int,
              seed: int | None) -> dict[str, Any]:
        body = {"model": self.model, "messages": openai_messages(prompt), "n": n, "temperature": temperature,
                "top_p": top_p, "max_tokens": max_tokens, "logprobs": True, "return_token_ids": True}
        if seed is not None and temperature > 0:
            body["seed"] = sample_seed(seed, prompt.id)
        if self.max_staleness == 0:
            body["ttrv_weight_version"] = self.weight_version
        return body

    def _acceptable(self, version: Any) -> bool:
        if self.max_staleness == 0:
            return version == self.weight_version
        return self._target is None or (version is not None and version >= self._target - self.max_staleness)

    def _complete(self, body: dict[str, Any], n: int, cancelled: threading.Event) -> list[Sample]:
        """One prompt's samples, retrying what a restart of the service explains."""
        first_failure, delay, attempt = None, 0.5, 0
        while True:
            attempt += 1
            retry_after = 0.0
            try:
                status, answer, retry_after = self._chat(body)
            except _RETRYABLE as error:
                problem = f"{type(error).__name__}: {error}"
                self._unavailable(f"unreachable ({problem})")
            else:
                if status == 200:
                    version = answer.get("ttrv_weight_version")
                    if self._acceptable(version):
                        self._available()
                        try:
                            return [sample for sample, _ in samples_from_completion(answer, n, logprobs=True)]
                        except ValueError as error:
                            raise RolloutError(f"the rollout service at {self.url} answered without what the "
                                               f"trainer needs: {error}") from None
                    problem = f"answered from weight version {version}, outside what was asked"
                elif status == 409:
                    problem = f"HTTP {status}: {_message(answer)}"
                elif status >= 500:
                    problem = f"HTTP {status}: {_message(answer)}"
                    self._unavailable(problem)
                else:
                    raise RolloutError(f"the rollout service at {self.url} refused the request: HTTP {status}: "
                                       f"{_message(answer)}")
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure >= self.retry_seconds:
                raise RolloutUnavailableError(
                    f"the rollout service at {self.url} gave no usable answer for {self.retry_seconds:.0f} s "
                    f"({attempt} attempts); last: {problem}{self._first_reason(problem)}. Check that its pod is "
                    "running and read its log")
            # a full service says when to come back (503 with Retry-After): not sooner, so the retries of many
            # prompts do not keep it full
            wait = max(delay * random.uniform(0.5, 1.5), min(retry_after, MAX_RETRY_AFTER))
            logger.warning("rollout_request_retry", attempt=attempt, problem=problem, retry_in=round(wait, 2))
            if cancelled.wait(wait):
                raise RolloutUnavailableError("cancelled: another prompt of the batch failed")
            delay = min(2 * delay, 5.0)

    def _unavailable(self, reason: str) -> None:
        """A request found the service unavailable: tell the person at the first failure of an outage, then every
        REPORT_EVERY seconds where the reason changed (a restart: unreachable, then starting)."""
        now = time.monotonic()
        with self._outage_lock:
            outage = self._outage
            if outage is None:
                outage = self._outage = {"since": now, "reason": None, "at": 0.0, "first": reason}
            elif reason == outage["reason"] or now - outage["at"] < REPORT_EVERY:
                return
            outage.update(reason=reason, at=now)
            seconds = round(now - outage["since"], 1)
        logger.warning("rollout_unavailable", url=self.url, reason=reason, seconds=seconds,
                       action=f"retrying each request for up to {self.retry_seconds:.0f} s")

    def _first_reason(self, last: str) -> str:
        """The outage's first reason, where the last one differs: a dead engine's error comes first, then only
        refused connections while the service restarts."""
        with self._outage_lock:
            first = self._outage["first"] if self._outage else None
        return f"; first: {first}" if first and first not in last else ""

    def _available(self) -> None:
        with self._outage_lock:
            outage, self._outage = self._outage, None
        if outage is not None:
            logger.info("rollout_available", url=self.url, seconds=round(time.monotonic() - outage["since"], 1))

    def _chat(self, body: dict[str, Any]) -> tuple[int, Any, float]:
        """(status, decoded JSON, the answer's Retry-After in seconds or 0) of one chat request."""
        response = self._http.post(f"{self.url}/v1/chat/completions", content=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"},
                                   timeout=jsonhttp.timeout(self.request_timeout))
        try:
            retry_after = float(response.headers.get("retry-after", 0))
        except ValueError:  # an HTTP date, which ttrv serve never sends
            retry_after = 0.0
        return response.status_code, json.loads(response.content) if response.content else {}, retry_after

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, Any]:
        """(status, decoded JSON) of one request on a pooled connection; ValueError when the answer is not JSON."""
        status, payload = jsonhttp.send(self._http, self.url, method, path, body, timeout)
        return status, json.loads(payload) if payload else {}


def _message(answer: Any) -> str:
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(answer)[:500]
