"""One rollout service for K LoRA runs (rollout.shared) against a service per run: memory, processes, throughput,
and whether every sample came from its own run's adapter.

K runs of the tiny Qwen2.5-VL (ttrv://tiny-qwen2vl), each with its own LoRA adapters (random, non-zero, a different
seed per run: trained adapters differ the same way) published to its own store as versions 1..`--versions`, and the
SAME sampling seed, prompts and settings for every run, so two runs' requests differ only in the adapter they name.
Each run is driven as a trainer drives its rollout: publish version v, `ServiceEngine.load_version(v)` (the nudge
and the wait until the service serves v), then `--rounds` calls of `generate` for `--prompts` prompts x `--votes`
votes, every request pinned to v. The K runs go at once, each from its own thread.

  shared     one `ttrv serve --shared runs.yaml` (the operator's shared service) serving the K runs' adapters.
  separate   one `ttrv serve` per run (today's service per run: it merges each version into its model).
  reference  per run, a `ttrv serve --shared` holding that run alone: at every moment exactly one adapter version,
             the one being asked for. Every sample of `shared` is compared token for token with the reference's
             sample of the same request (same run, version, prompt, seed): `mismatches` counts those that differ.

All services run from the start to the end of the bench; shared and separate take turns version by version, in
alternating order (shared first for odd versions), so that a change in the machine's load falls on both alike.
Measured:
- peak rollout memory: the largest sum of RSS over a configuration's service processes (their children included:
  vLLM's server and engine), sampled every 0.1 s from their start to the end;
- the number of rollout processes;
- samples/s per run: the run's samples over its time inside `generate` (publishing and loading excluded).

The last lines: `shared_memory_ratio=<shared peak / separate peak>`, `min_throughput_ratio=<the lowest, over the
runs, of shared samples/s / separate samples/s>` and `mismatches=<n>`. Done for issue 18 when, at K=3, the memory
ratio is <= 0.5, mismatches is 0 and the throughput ratio is >= 0.7.

    python bench/shared_rollout.py [--runs 3] [--versions 2] [--rounds 12] [--prompts 4] [--votes 16]
                                   [--max-tokens 4] [--engine hf|vllm]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml
from peft import LoraConfig, get_peft_model

from ttrv import benchmark, log
from ttrv.data import read_dataset
from ttrv.learner import lora_target_pattern
from ttrv.modeling import load_model
from ttrv.rollout.client import ServiceEngine
from ttrv.rollout.supervisor import ServeProcess
from ttrv.spec import LoraSpec, RunSpec
from ttrv.store import open_store
from ttrv.weights import resolve_model

LORA = {"rank": 8, "alpha": 16}
SEED = 1234


def publish_adapters(base: str, work: Path, runs: list[str], versions: int) -> dict[tuple[str, int], Path]:
    """Each run's adapter of each version, saved in peft's layout (adapter_config.json + safetensors)."""
    folders = {}
    target = lora_target_pattern(LoraSpec().target_modules)  # as the trainer targets them
    for index, run in enumerate(runs):
        for version in range(1, versions + 1):
            torch.manual_seed(1000 * index + version)
            model = get_peft_model(load_model(base), LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                                target_modules=target, init_lora_weights=False))
            folder = work / "adapters" / f"{run}-v{version}"
            model.save_pretrained(folder)
            folders[(run, version)] = folder
    return folders


def publish(store_uri: str, version: int, folder: Path, base: str) -> None:
    from safetensors.torch import load_file

    with open_store(store_uri) as store:
        store.publish_weights(version, load_file(folder / "adapter_model.safetensors"), kind="lora", base_model=base,
                              dtype="float32", extra_files={"adapter_config.json": folder / "adapter_config.json"})


def run_spec(name: str, store: str, engine: str, max_tokens: int) -> dict:
    return {"name": name, "seed": SEED, "data": {"path": "ttrv://tiny-shapes/test"},
            "model": {"path": "ttrv://tiny-qwen2vl", "lora": LORA},
            "rollout": {"engine": engine, "backend": "service", "maxNewTokens": max_tokens},
            "storage": {"uri": store}}


class MemoryWatch:
    """The largest sum of RSS over the given processes and their descendants, sampled every `every` seconds."""

    def __init__(self, pids: list[int], every: float = 0.1):
        self.pids, self.every, self.peak = pids, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def processes(self) -> list[psutil.Process]:
        found = []
        for pid in self.pids:
            try:
                parent = psutil.Process(pid)
                found += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for process in self.processes():
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.every)

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


class Config:
    """One configuration's services and the K runs' clients and stores: shared (one `ttrv serve --shared` for the
    K runs), separate (one `ttrv serve` per run) or reference (one `ttrv serve --shared` per run, holding it alone)."""

    def __init__(self, kind: str, work: Path, runs: list[str], args):
        self.kind, self.runs = kind, runs
        folder = work / kind
        folder.mkdir()
        self.stores = {run: f"file://{folder}/store-{run}" for run in runs}
        self.specs = {run: run_spec(run, self.stores[run], args.engine, args.max_tokens) for run in runs}
        self.services, groups = [], []
        if kind == "separate":
            for run in runs:
                (folder / f"{run}.yaml").write_text(yaml.safe_dump(self.specs[run]))
                self.services.append(ServeProcess(folder / f"{run}.yaml", folder / f"{run}.log"))
                groups.append([run])
        else:
            (folder / "run.yaml").write_text(yaml.safe_dump(run_spec("shared", f"file://{folder}/none",
                                                                     args.engine, args.max_tokens)))
            for group in [runs] if kind == "shared" else [[run] for run in runs]:
                runs_file = folder / f"runs-{group[0]}.yaml"
                runs_file.write_text(yaml.safe_dump({"runs": [{"name": r, "storage": self.stores[r]} for r in group],
                                                     "maxLoras": len(group)}))
                self.services.append(ServeProcess(folder / "run.yaml", folder / f"serve-{group[0]}.log",
                                                  args=("--shared", str(runs_file))))
                groups.append(group)
        self.groups = groups
        self.samples: dict[str, dict] = {run: {} for run in runs}
        self.seconds = dict.fromkeys(runs, 0.0)
        self.clients: dict[str, ServiceEngine] = {}
        self.memory: MemoryWatch | None = None
        self.processes = 0

    def start(self) -> Config:
        threads = [threading.Thread(target=service.start) for service in self.services]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for service, group in zip(self.services, self.groups, strict=True):
            if service.process is None or service.process.poll() is not None:
                return self  # main() sees `memory` unset and stops, naming the logs' folder
            for run in group:
                self.clients[run] = ServiceEngine(service.url, RunSpec.model_validate(self.specs[run]),
                                                  retry_seconds=300, sync_timeout=300)
        self.memory = MemoryWatch([service.process.pid for service in self.services]).__enter__()
        self.processes = len(self.memory.processes())
        return self

    def stop(self) -> None:
        if self.memory is not None:
            self.memory.__exit__()
        for client in self.clients.values():
            client.close()
        for service in self.services:
            service.stop()

    def step(self, version: int, folders, base: str, prompts, args) -> None:
        """The K runs at once, each as its trainer drives the rollout: publish version `version`, wait until its
        service serves it, then `rounds` generate calls (timed) pinned to it."""
        failures = []

        def one(run: str) -> None:
            try:
                publish(self.stores[run], version, folders[(run, version)], base)
                self.clients[run].load_version(version)
                for round_ in range(args.rounds):
                    started = time.perf_counter()
                    answers = self.clients[run].generate(prompts, args.votes, 1.0, 1.0, args.max_tokens,
                                                         seed=SEED + round_)
                    self.seconds[run] += time.perf_counter() - started
                    for prompt, votes in zip(prompts, answers, strict=True):
                        self.samples[run][f"v{version}/r{round_}/{prompt.id}"] = [list(s.token_ids) for s in votes]
            except Exception as error:  # noqa: BLE001 - reported below, with the logs' folder
                failures.append(f"{run}: {type(error).__name__}: {error}")

        threads = [threading.Thread(target=one, args=(run,)) for run in self.runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise SystemExit(f"{self.kind}, version {version}: {failures}")

    def throughput(self, run: str) -> float:
        return sum(len(votes) for votes in self.samples[run].values()) / self.seconds[run]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--versions", type=int, default=2)
    # 12, not 3: at 3 a configuration sampled about 1 s per run, and three runs of the bench spread 0.63-0.79
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--votes", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, stores)")
    args = parser.parse_args()
    log.configure()
    work = Path(tempfile.mkdtemp(prefix="ttrv-shared-bench-"))
    try:
        base = resolve_model("ttrv://tiny-qwen2vl")
        prompts = [e.prompt for e in read_dataset(benchmark.resolve("ttrv://tiny-shapes/test")).examples[:args.prompts]]
        runs = [f"run-{index}" for index in range(args.runs)]
        folders = publish_adapters(base, work, runs, args.versions)
        configs = {kind: Config(kind, work, runs, args) for kind in ("shared", "separate", "reference")}
        try:
            # the services start at once (each loads the model; minutes on a busy machine otherwise)
            starters = [threading.Thread(target=config.start) for config in configs.values()]
            for thread in starters:
                thread.start()
            for thread in starters:
                thread.join()
            if not all(config.memory is not None for config in configs.values()):
                raise SystemExit(f"a service did not start; see the logs in {work}")
            # shared and separate take turns, version by version, in alternating order: a change in the machine's
            # load (2 cores shared with other work) falls on both alike
            for version in range(1, args.versions + 1):
                order = ("shared", "separate") if version % 2 else ("separate", "shared")
                for kind in (*order, "reference"):
                    configs[kind].step(version, folders, base, prompts, args)
        finally:
            for config in configs.values():
                config.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work folder: {work}")
    shared, separate, reference = (configs[kind] for kind in ("shared", "separate", "reference"))
    mismatches = compared = 0
    for run in runs:
        for key, votes in shared.samples[run].items():
            expected = reference.samples[run][key]
            compared += len(votes)
            mismatches += sum(a != b for a, b in zip(votes, expected, strict=True))
    # the adapters matter: the same request of two runs gives other tokens (else a leak could not be seen)
    first, second = runs[0], runs[1 % len(runs)]
    differing = sum(a != b for key, votes in shared.samples[first].items()
                    for a, b in zip(votes, shared.samples[second][key], strict=True))
    # today's per-run service merges each version into its weights; agreement with it, for information
    merged_agree = sum(a == b for run in runs for key, votes in shared.samples[run].items()
                       for a, b in zip(votes, separate.samples[run][key], strict=True))
    rows = [{"run": run, "shared_samples_per_s": round(shared.throughput(run), 1),
             "separate_samples_per_s": round(separate.throughput(run), 1),
             "ratio": round(shared.throughput(run) / separate.throughput(run), 3)} for run in runs]
    per_run = sum(len(votes) for votes in shared.samples[first].values())
    report = {
        "runs": args.runs, "engine": args.engine, "samples_per_run": per_run,
        "shared": {"peak_rss_mb": round(shared.memory.peak / 2**20, 1), "processes": shared.processes},
        "separate": {"peak_rss_mb": round(separate.memory.peak / 2**20, 1), "processes": separate.processes},
        "throughput": rows, "compared_samples": compared,
        "cross_run_differing_samples": f"{differing} of {per_run} ({first} vs {second})",
        "agreement_with_merged_per_run_services": f"{merged_agree} of {compared}",
    }
    print(json.dumps(report, indent=2))
    print(f"shared_processes={shared.processes} separate_processes={separate.processes}")
    print(f"min_throughput_ratio={min(row['ratio'] for row in rows):.3f}")
    print(f"shared_memory_ratio={shared.memory.peak / separate.memory.peak:.3f}")
    print(f"mismatches={mismatches}")


if __name__ == "__main__":
    main()
