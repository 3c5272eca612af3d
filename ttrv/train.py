"""The trainer entrypoint (`python -m ttrv.train --spec run.yaml`): one process of the run. It sets up the
distributed world, loads the data, the learner and the rollout engine, runs the adaptation loop (ttrv.loop) between
the evaluations before and after, writes the report, and leaves through the exit-code contract (ttrv.exitcodes).

The same entrypoint runs under `ttrv train` (torchrun's launcher) in a PyTorchJob pod and as local processes
under `ttrv run`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from ttrv import benchmark, lifetime, log
from ttrv.collectives import Collectives
from ttrv.data import Example, Prompt, adaptation_prompts, read_dataset, require_images
from ttrv.evaluate import greedy_accuracy
from ttrv.learner import Learner, World, training_device
from ttrv.loop import (
    EVALUATING_AFTER,
    EVALUATING_BEFORE,
    FINISHED,
    Interrupted,
    Preempted,
    PreemptionSignal,
    RunContext,
    RunState,
    adapt,
    eval_shards,
    evaluate_all,
    resume,
    rewrite_events,
    steps_per_epoch,
    write_progress,
)
from ttrv.net import free_port
from ttrv.policy import PromptEncoder
from ttrv.rollout.base import RolloutEngine
from ttrv.spec import RunSpec
from ttrv.splits import check_disjoint, setting, subset_examples

logger = log.get_logger(__name__)


# --------------------------------------------------------------------------------------------------- data
def load_examples(spec: RunSpec) -> tuple[list[Example], list[Prompt], list[Example]]:
    """(test examples, adaptation prompts, held-out examples); the held-out split checked disjoint from the
    adaptation prompts (splits.check_disjoint)."""
    data = spec.data

    def read(path: str) -> list[Example]:
        return require_images(read_dataset(benchmark.resolve(path), data.format, data.path_map)).examples

    test = read(data.path)
    if data.adapt_path:
        prompts = [e.prompt for e in read(data.adapt_path)]
    else:
        prompts = adaptation_prompts(test, data.subset_size, data.subset_seed, data.single_example,
                                     data.single_example_repeats)
    heldout = read(data.heldout_path) if data.heldout_path else []
    check_disjoint(prompts, heldout, data.heldout_path or "")
    return test, prompts, heldout


# --------------------------------------------------------------------------------------------------- entrypoint
def init_distributed(world: World) -> Collectives:
    """torchrun (and the training-operator) set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; a lone process gets
    a world of one on loopback. Returns the trainer's collectives, on the device DeepSpeed trains this rank on.

    The rank's CUDA device is made current first: NCCL's object collectives and barrier use the current device
    (torch/distributed/distributed_c10d.py), and DeepSpeed's engine sets it only later, in deepspeed.initialize."""
    import deepspeed

    if world.size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    device = training_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return Collectives(world.size, device)


def cpu_threads(world: World) -> None:
    """One process per core slice: intra-op threads beyond the cores a process owns only spin against each other."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def make_engine(spec: RunSpec, model_path: str, processor, store, device) -> RolloutEngine:
    """The rollout engine the spec asks for: the separate rollout service (its URL from TTRV_ROLLOUT_URL, as the
    operator and `ttrv run` set it) or an in-process Hugging Face engine loading versions from the store."""
    if spec.rollout.backend == "service":
        from ttrv.rollout.client import ServiceEngine

        url = os.environ.get("TTRV_ROLLOUT_URL")
        if not url:
            raise ValueError("rollout.backend is service but TTRV_ROLLOUT_URL is not set; start `ttrv serve` and "
                             "point TTRV_ROLLOUT_URL at it (the operator and `ttrv run` do this)")
        return ServiceEngine(url, spec, retry_seconds=float(os.environ.get("TTRV_ROLLOUT_RETRY_SECONDS", 600)))
    from ttrv.modeling import load_model
    from ttrv.rollout.hf import HFEngine, lora_merger

    model = load_model(model_path, spec.model.dtype, device, trust_remote_code=spec.model.trust_remote_code)
    merge = lora_merger(model, spec.model.lora)
    if merge is None:
        return HFEngine(model, processor, store.load_weights, update_weights=store.update_weights)
    return HFEngine(model, processor, lambda step: merge(store.load_weights(step)))


class ModelError(ValueError):
    """The model folder cannot be loaded (missing files, unknown architecture)."""


def load_learner_and_engine(spec: RunSpec, model_path: str, store, world: World, prompts: list[Prompt],
                            collectives: Collectives):
    from ttrv.modeling import load_processor

    def cannot_load(error: Exception) -> ModelError:
        return ModelError(f"model.path {spec.model.path!r}: cannot load the checkpoint ({error}); point it at a "
                          "Hugging Face folder with config.json, weights, tokenizer and processor files")

    # A ValueError while the processor loads is the folder's (no model_type, not a vision-language model, no
    # tokenizer); one from the learner or the engine is the spec's (a service rollout without TTRV_ROLLOUT_URL).
    try:
        processor = load_processor(model_path, spec.model.trust_remote_code, spec.model.max_pixels)
    except (OSError, KeyError, ImportError, ValueError) as error:
        raise cannot_load(error) from None
    try:
        per_epoch = steps_per_epoch(len(prompts), spec.grpo.prompts_per_step)
        sequences = math.ceil(spec.grpo.prompts_per_step / world.size) * spec.rollout.group_size
        learner = Learner(spec, model_path, per_epoch * spec.grpo.epochs, world, sequences, collectives)
        engine = make_engine(spec, model_path, processor, store, learner.device)
    except (OSError, KeyError, ImportError) as error:
        raise cannot_load(error) from None
    return processor, learner, engine


def run(spec: RunSpec, out: Path, preemption: PreemptionSignal | None = None) -> dict:
    from ttrv.metrics import TrainerMetrics
    from ttrv.report import write_report
    from ttrv.store import open_store
    from ttrv.weights import resolve_model

    started = time.perf_counter()
    world = World.from_env()
    cpu_threads(world)
    collectives = init_distributed(world)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    out.mkdir(parents=True, exist_ok=True)
    test, prompts, heldout = load_examples(spec)
    model_path = resolve_model(spec.model.path)
    store = open_store(spec.storage.uri, spec.storage.endpoint)
    processor, learner, engine = load_learner_and_engine(spec, model_path, store, world, prompts, collectives)
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ctx = RunContext(spec, out, world, store, engine, learner, PromptEncoder(processor), prompts, pad_id,
                     collectives, preemption or PreemptionSignal())
    metrics = TrainerMetrics.serve_from_env() if world.is_main else None

    state = resume(ctx)
    if state is None:
        state = RunState()
        if world.is_main:
            rewrite_events(ctx.events, [])
        if spec.eval.before:  # every rank evaluates its shard and gets the whole results
            state.before = evaluate_all(ctx, state, EVALUATING_BEFORE, test, prompts, heldout)
            if world.is_main:
                logger.info("eval_before", **{k: v for k, v in state.before.items() if v is not None})
        collectives.barrier()
    subset = subset_examples(test, prompts)
    probed: dict = {}  # the newest probe, {weight version served: subset accuracy}; rolling back serves another

    def probe() -> float | None:
        if not subset:
            return None
        accuracy = greedy_accuracy(engine, subset, spec, shards=eval_shards(ctx))["accuracy"]
        probed.clear()
        probed[engine.weight_version] = accuracy
        return accuracy

    outcome = adapt(ctx, state, metrics, probe)
    after = {}
    if spec.eval.after:
        # A probe after the last step measured these very weights on the subset: one greedy pass serves both.
        after = evaluate_all(ctx, state, EVALUATING_AFTER, test, prompts, heldout, probed.get(engine.weight_version))
        if world.is_main:
            logger.info("eval_after", **{k: v for k, v in after.items() if v is not None})
    collectives.barrier()
    report = {}
    if world.is_main:
        before = state.before
        report = {
            "name": spec.name,
            "base_accuracy": before.get("accuracy"), "final_accuracy": after.get("accuracy"),
            "base_maj_accuracy": before.get("maj_accuracy"), "final_maj_accuracy": after.get("maj_accuracy"),
            "subset_base_accuracy": before.get("subset_accuracy"),
            "subset_final_accuracy": after.get("subset_accuracy"),
            "heldout_base_accuracy": before.get("heldout_accuracy"),
            "heldout_final_accuracy": after.get("heldout_accuracy"),
            "base_valid_ratio": before.get("valid_ratio"), "final_valid_ratio": after.get("valid_ratio"),
            "base_pass_at_n": before.get("pass_at_n"), "final_pass_at_n": after.get("pass_at_n"),
            "maj_votes": before.get("votes") or after.get("votes"),
            "test_prompts": len(test), "adaptation_prompts": len(prompts), "heldout_prompts": len(heldout),
            "setting": setting(test, prompts, heldout),
            **outcome,
            "attempts": state.attempts,
            "world_size": world.size,
            "adapt_seconds": round(state.elapsed_seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "spec": spec.model_dump(mode="json"),
        }
        write_report(out, report, state.events)
        store.put_json("report.json", report)
        write_progress(ctx, state, FINISHED, progressPercentage=100.0, estimatedRemainingSeconds=0,
                       accuracy=report["final_accuracy"])
        logger.info("run_finished", report=str(out / "report.json"), base=report["base_accuracy"],
                    final=report["final_accuracy"])
    collectives.barrier()
    return report


def exit_code_for(error: BaseException) -> int:
    """Map a failure to the PyTorchJob ExitCode contract (ttrv.exitcodes)."""
    from ttrv import exitcodes
    from ttrv.data import DataError
    from ttrv.store import StoreAuthError, StoreConfigError, StoreUnavailableError

    if isinstance(error, Preempted):
        return exitcodes.PREEMPTED
    if isinstance(error, StoreUnavailableError):
        return exitcodes.STORE_UNAVAILABLE
    if type(error).__name__ == "RolloutUnavailableError":
        return exitcodes.ROLLOUT_UNAVAILABLE
    if isinstance(error, DataError):
        return exitcodes.BAD_DATA
    if isinstance(error, ModelError):
        return exitcodes.BAD_MODEL
    if isinstance(error, (StoreAuthError, StoreConfigError, ValueError)):
        return exitcodes.BAD_SPEC
    distributed = getattr(torch.distributed, "DistError", ())
    if isinstance(error, distributed) or "Connection closed by peer" in str(error):
        return exitcodes.LOST_PEER
    return exitcodes.PERMANENT_FAILURE


def write_termination_message(message: str) -> None:
    """Kubernetes shows the file at terminationMessagePath (/dev/termination-log, which the kubelet creates) as the
    container's last state, and the operator copies it into a failed run's status; outside a pod there is none."""
    path = Path(os.environ.get("TTRV_TERMINATION_LOG", "/dev/termination-log"))
    if path.is_file():
        try:
            path.write_text(message[-4000:])
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    from ttrv import exitcodes

    parser = argparse.ArgumentParser(prog="python -m ttrv.train", description="The ttrv trainer entrypoint.")
    parser.add_argument("--spec", required=True, help="run spec (YAML)")
    parser.add_argument("--out", default=os.environ.get("TTRV_OUT", "/tmp/ttrv-out"),
                        help="folder for events.jsonl and the report (default $TTRV_OUT)")
    args = parser.parse_args(argv)
    log.configure()
    # A worker of torch elastic's launcher (ttrv.launch) gets SIGTERM when the launcher dies, even by SIGKILL: it
    # checkpoints after its step, as when the launcher passes a SIGTERM on. Set before the handler, so that a
    # launcher dying meanwhile ends the worker at once, with nothing yet to save.
    if not lifetime.die_with_launcher():
        logger.warning("launcher_gone", action="exit before any work")
        return exitcodes.PREEMPTED
    preemption = PreemptionSignal()
    preemption.install()
    try:
        return _main(args, preemption)
    except Interrupted:  # SIGTERM outside the steps: nothing to save, the restart repeats the phase
        logger.warning("trainer_interrupted", exit_code=exitcodes.PREEMPTED, kind=exitcodes.kind(exitcodes.PREEMPTED))
        return exitcodes.PREEMPTED


def _main(args: argparse.Namespace, preemption: PreemptionSignal) -> int:
    from ttrv import exitcodes
    from ttrv.spec import SpecError, load_run_spec

    try:
        spec = load_run_spec(args.spec)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_SPEC
    try:
        run(spec, Path(args.out), preemption)
    except Exception as error:  # noqa: BLE001 - every failure leaves through the exit-code contract
        code = exit_code_for(error)
        retry = exitcodes.kind(code)
        logger.error("trainer_failed", exit_code=code, kind=retry, error=f"{type(error).__name__}: {error}")
        print(f"error ({retry}, exit {code}): {error}", file=sys.stderr)
        write_termination_message(f"{retry}, exit {code}: {error}")
        return code
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
