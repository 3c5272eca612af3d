"""How many samples per second does the rollout service give, next to a first implementation's sampling loop?

One run, one model, the same prompts and sampling for every engine: the tiny Qwen2.5-VL (ttrv://tiny-qwen2vl when
the package bundles it, else built by ttrv.tinymodel with the tiny-shapes vocabulary), `--prompts` prompts of
ttrv://tiny-shapes/test, N=`--votes` samples each, temperature 1, top-p 1, at most `--max-tokens` new tokens, float32
on CPU, log-probs of every sampled token.

  naive             what a first implementation does: one prompt at a time, and for each of its N votes one
                    `model.generate(do_sample=True)` call for one sequence (batch 1, KV cache on), log-probs from the
                    returned scores. In this process, timed on the first `--naive-prompts` prompts only (the cost
                    per sample does not depend on how many there are). The ratio on the last line is against it.
  naive_per_prompt  one prompt at a time, its N votes in one call (`num_return_sequences=N`): a less naive loop.
  hf_batched        the in-process HFEngine: all N votes of many prompts in one `generate` call. For context.
  service_vllm      `ttrv serve` with the vLLM engine, a separate process (and vLLM's server its child), driven
                    over HTTP by the trainer's client ServiceEngine with every prompt's request in flight at once.

Every engine is warmed up once, then each round runs every engine once, in a rotated order, so that a change in
the machine's load (other processes on a shared CPU) falls on all of them alike; the idle vLLM server costs about 5%
of one core meanwhile (measured with ps). Each row is the median over `--rounds` rounds, as time per sample and
samples/s. The last line is `vllm_vs_naive_ratio=<service_vllm samples/s / naive samples/s>`.

    python bench/rollout_throughput.py [--prompts 16] [--votes 32] [--max-tokens 8] [--rounds 5] [--naive-prompts 4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ttrv import benchmark, log
from ttrv.data import read_dataset
from ttrv.modeling import load_model, load_processor, model_inputs
from ttrv.rollout.client import ServiceEngine
from ttrv.rollout.hf import HFEngine
from ttrv.rollout.supervisor import ServeProcess
from ttrv.spec import RunSpec
from ttrv.tinymodel import build_tiny_qwen2vl
from ttrv.weights import BUNDLED, resolve_model


def tiny_model(work: Path) -> str:
    bundled = BUNDLED["ttrv://tiny-qwen2vl"]
    if bundled.exists():
        return "ttrv://tiny-qwen2vl"
    return str(build_tiny_qwen2vl(work / "tiny-qwen2vl", benchmark.vocabulary(), seed=0))


@torch.no_grad()
def naive(model, processor, prompts, votes: int, max_tokens: int, per_call: int) -> int:
    """Each prompt on its own, `per_call` samples per generate call; returns the number of samples."""
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    count = 0
    for prompt in prompts:
        inputs = model_inputs(processor, [prompt])
        for _ in range(votes // per_call):
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 num_return_sequences=per_call, max_new_tokens=max_tokens,
                                 return_dict_in_generate=True, output_scores=True, pad_token_id=pad)
            tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
            scores = torch.stack(out.scores, 1).float().log_softmax(-1)
            scores.gather(-1, tokens.unsqueeze(-1))
            tokenizer.batch_decode(tokens, skip_special_tokens=True)
            count += per_call
    return count


def interleaved(cases: dict, rounds: int) -> dict[str, float]:
    """Median seconds per sample of each case; a case is (run(warm_up) -> None, samples of a timed call)."""
    for run, _ in cases.values():
        run(warm_up=True)
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[:round_index % len(names)]:
            run, samples = cases[name]
            started = time.perf_counter()
            run(warm_up=False)
            seconds[name].append((time.perf_counter() - started) / samples)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--votes", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--naive-prompts", type=int, default=4, help="prompts timed for the naive loop")
    args = parser.parse_args()
    log.configure("warning")
    work = Path(tempfile.mkdtemp(prefix="ttrv-bench-rollout-"))
    model_path = tiny_model(work)
    examples = read_dataset(benchmark.resolve("ttrv://tiny-shapes/test")).examples[:args.prompts]
    prompts = [example.prompt for example in examples]
    samples = len(prompts) * args.votes
    settings = (args.votes, 1.0, 1.0, args.max_tokens)
    processor = load_processor(resolve_model(model_path))
    model = load_model(resolve_model(model_path))
    engine = HFEngine(model, processor)
    first = prompts[:1]
    few = prompts[:args.naive_prompts]
    spec_path = work / "run.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "bench", "data": {"path": "ttrv://tiny-shapes/test"}, "model": {"path": model_path},
        "rollout": {"engine": "vllm", "maxNewTokens": args.max_tokens},
        "storage": {"uri": f"file://{work / 'store'}"}}))
    service = ServeProcess(spec_path, work / "serve.log").start()
    try:
        client = ServiceEngine(service.url, RunSpec.model_validate(yaml.safe_load(spec_path.read_text())),
                               max_concurrency=len(prompts))
        results = interleaved({
            "naive": (lambda warm_up: naive(model, processor, first if warm_up else few, 1 if warm_up else args.votes,
                                            args.max_tokens, 1), len(few) * args.votes),
            "naive_per_prompt": (lambda warm_up: naive(model, processor, first if warm_up else prompts, args.votes,
                                                       args.max_tokens, args.votes), samples),
            "hf_batched": (lambda warm_up: engine.generate(first if warm_up else prompts, *settings), samples),
            "service_vllm": (lambda warm_up: client.generate(first if warm_up else prompts, *settings), samples),
        }, args.rounds)
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{len(prompts)} prompts x {args.votes} votes, max {args.max_tokens} new tokens, temperature 1, "
          f"{torch.get_num_threads()} torch threads, median of {args.rounds} rounds")
    print(f"{'engine':<18}{'ms/sample':>10}{'samples/s':>11}")
    for name, seconds in results.items():
        print(f"{name:<18}{1000 * seconds:>10.2f}{1 / seconds:>11.1f}")
    print(f"hf_batched_vs_naive_ratio={results['naive'] / results['hf_batched']:.2f}")
    print(f"vllm_vs_naive_per_prompt_ratio={results['naive_per_prompt'] / results['service_vllm']:.2f}")
    print(f"vllm_vs_naive_ratio={results['naive'] / results['service_vllm']:.2f}")

if __name__ == "__main__":
    main()
