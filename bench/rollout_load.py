"""The rollout service under load: several trainers' requests at once against one `ttrv serve` (Hugging Face engine,
the tiny model), on loopback only, bounded in count and time.

Each of `--clients` threads stands for a trainer rank: it sends `--requests` chat completions one after another,
each for a prompt of ttrv://tiny-shapes/test with a seed of its own, `--votes` samples, pinned to the served weight
version (the base model). The service batches concurrent requests together; an answer must still be the one its own
request asked for. A seeded request's samples depend on its seed alone, so each request is first sent alone, with
nothing else in flight, and every answer under load must match that one token for token, with n choices and the
pinned version: a dropped, duplicated or mixed-up answer cannot pass.

Printed: requests/s and latency p50/p99 per round, and the service's resident memory before the load and after each
round (a leak grows round after round; the first round may grow once, as allocator pools fill). The last line is
the whole result as JSON.

    python bench/rollout_load.py [--clients 4] [--requests 25] [--votes 4] [--max-tokens 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ttrv import benchmark, log
from ttrv.data import read_dataset
from ttrv.rollout.chat import openai_messages
from ttrv.rollout.jsonhttp import TRANSPORT_ERRORS, request_json
from ttrv.rollout.supervisor import ServeProcess

DEADLINE_SECONDS = 600.0
"""No round runs past this, however slow the machine: the clients stop sending and the round is reported short."""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def post(url: str, body: dict) -> tuple[int, dict]:
    """One request on a connection of its own, as the trainer's client sends it."""
    return request_json(url, "POST", "/v1/chat/completions", body, timeout=300)


def token_ids(answer: dict) -> list[list[int]]:
    return [choice["token_ids"] for choice in answer["choices"]]


def requests_of(clients: int, count: int, prompts, model: str, votes: int, max_tokens: int) -> list[list[dict]]:
    """Each client's requests: every one a different (prompt, seed)."""
    return [[{"model": model, "messages": openai_messages(prompts[(client * count + i) % len(prompts)]), "n": votes,
              "temperature": 1.0, "top_p": 1.0, "max_tokens": max_tokens, "seed": 1000 * client + i,
              "return_token_ids": True, "ttrv_weight_version": None}
             for i in range(count)] for client in range(clients)]


def load_round(url: str, work: list[list[dict]], expected: list[list[list[list[int]]]]) -> dict:
    """Every client's requests at once; the round's throughput, latencies and wrong answers."""
    latencies: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + DEADLINE_SECONDS

    def client(index: int) -> None:
        for number, body in enumerate(work[index]):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                status, answer = post(url, body)
                problem = None
                if status != 200:
                    problem = f"HTTP {status}: {answer.get('error', {}).get('message')}"
                elif answer.get("ttrv_weight_version") is not None:
                    problem = f"answered from version {answer['ttrv_weight_version']}, pinned to the base model"
                elif token_ids(answer) != expected[index][number]:
                    problem = "samples differ from those of the same request sent alone"
            except (*TRANSPORT_ERRORS, ValueError) as error:
                problem = f"{type(error).__name__}: {error}"
            with lock:
                latencies.append(time.perf_counter() - started)
                if problem:
                    problems.append(f"client {index} request {number}: {problem}")

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(work))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    ordered = sorted(latencies)
    return {"requests": len(latencies), "sent": sum(len(w) for w in work), "problems": problems,
            "seconds": round(seconds, 2), "requests_per_s": round(len(latencies) / seconds, 2),
            "p50_s": round(statistics.median(ordered), 3),
            "p99_s": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3)}


def run(clients: int, requests: int, votes: int, max_tokens: int, rounds: int) -> dict:
    work_dir = Path(tempfile.mkdtemp(prefix="ttrv-bench-load-"))
    spec_path = work_dir / "run.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "load", "data": {"path": "ttrv://tiny-shapes/test"}, "model": {"path": "ttrv://tiny-qwen2vl"},
        "rollout": {"engine": "hf", "maxNewTokens": max_tokens}, "storage": {"uri": f"file://{work_dir / 'store'}"}}))
    prompts = [example.prompt for example in read_dataset(benchmark.resolve("ttrv://tiny-shapes/test")).examples]
    service = ServeProcess(spec_path, work_dir / "serve.log").start()
    try:
        work = requests_of(clients, requests, prompts, "load", votes, max_tokens)
        expected = [[token_ids(post(service.url, body)[1]) for body in bodies] for bodies in work]
        memory = [round(rss_mb(service.process.pid), 1)]
        results = []
        for _ in range(rounds):
            results.append(load_round(service.url, work, expected))
            memory.append(round(rss_mb(service.process.pid), 1))
        stopped = service.stop()
    finally:
        service.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    return {"clients": clients, "requests_per_client": requests, "votes": votes, "max_tokens": max_tokens,
            "rounds": results, "rss_mb": memory, "service_exit_code": stopped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25, help="requests per client and round")
    parser.add_argument("--votes", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    log.configure("warning")
    result = run(args.clients, args.requests, args.votes, args.max_tokens, args.rounds)
    print(f"{args.clients} clients x {args.requests} requests, n={args.votes}, max {args.max_tokens} new tokens; "
          f"service RSS {result['rss_mb'][0]} MB before the load")
    for number, (round_, rss) in enumerate(zip(result["rounds"], result["rss_mb"][1:], strict=True), start=1):
        print(f"round {number}: {round_['requests']}/{round_['sent']} requests in {round_['seconds']} s, "
              f"{round_['requests_per_s']} requests/s, p50 {round_['p50_s']} s, p99 {round_['p99_s']} s, "
              f"{len(round_['problems'])} wrong answers, RSS {rss} MB")
        for problem in round_["problems"][:5]:
            print(f"  {problem}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
