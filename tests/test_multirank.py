"""The trainer's multi-rank and GPU-bound paths, shown on CPU (issue 15): ZeRO-Offload of the optimiser, ZeRO-3
publish/checkpoint/resume with 2 processes, collectives on the engine's device, the accelerator choice, sharded
evaluation, SIGTERM during start-up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from trainer_util import SPEC, events, final_weights, log_events, trainer, wait_for, write_spec

from ttrv import checkpoint, exitcodes
from ttrv.modeling import load_model
from ttrv.store import open_store
from ttrv.weights import resolve_model

ROOT = Path(__file__).resolve().parent.parent

SMALL = SPEC | {
    "name": "multirank",
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 8},
    "grpo": SPEC["grpo"] | {"epochs": 1},
    "storage": {"checkpointEvery": 0},
}
"""8 prompts, 4 a step: 2 steps."""


def run_trainer(folder, spec: dict, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python -m ttrv.train` (one process) on `spec` with its store inside `folder`."""
    spec = spec | {"storage": spec.get("storage", {}) | {"uri": f"file://{folder / 'store'}"}}
    (folder / "run.yaml").write_text(yaml.safe_dump(spec))
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0", **env}
    return subprocess.run([sys.executable, "-m", "ttrv.train", "--spec", str(folder / "run.yaml"), "--out",
                           str(folder)], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.timeout(600)
def test_offloaded_optimizer_trains(tmp_path):
    """resources.offloadOptimizer: DeepSpeed refuses torch's AdamW under ZeRO-Offload (ZeRORuntimeException at
    initialisation); the learner hands it DeepSpeed's CPU Adam, and the run trains."""
    spec = SMALL | {"resources": {"gpusPerNode": 0, "zeroStage": 2, "offloadOptimizer": True}}
    done = run_trainer(tmp_path, spec)
    assert done.returncode == 0, done.stderr[-3000:]
    ready = logged(done.stderr, "learner_ready")
    assert ready[0]["optimizer"] == "DeepSpeedCPUAdam" and ready[0]["offload"] is True
    assert [e["step"] for e in events(tmp_path)] == [1, 2]
    assert final_weights(tmp_path)


# --------------------------------------------------------------------------------------------------- collectives
def test_collectives_refuse_tensors_off_the_engine_device():
    from ttrv.collectives import CollectiveDeviceError, Collectives

    on_meta = Collectives(1, "meta", strict=False)
    with pytest.raises(CollectiveDeviceError, match="on cpu was handed to a collective whose engine runs on meta"):
        on_meta.all_reduce(torch.ones(1))
    assert on_meta.all_reduce(on_meta.tensor([1.0])).device.type == "meta"


def test_strict_collectives_refuse_a_host_tensor_on_cpu():
    """On CPU a host tensor is on the engine's device; strict mode still tells it from a placed one, so the NCCL
    failure of a host tensor shows on CPU."""
    from ttrv.collectives import CollectiveDeviceError, Collectives

    strict = Collectives(1, "cpu", strict=True)
    with pytest.raises(CollectiveDeviceError, match="not placed on the engine's device"):
        strict.all_reduce(torch.tensor([2.0]))
    placed = strict.place(torch.tensor([2.0]))
    assert strict.all_reduce(placed).tolist() == [2.0]
    assert strict.any(True) and not strict.any(False)
    assert strict.all_gather_object({"a": 1}) == [{"a": 1}]


def test_the_trainer_calls_no_collective_but_through_the_wrapper():
    """Every collective of the trainer goes through ttrv.collectives (so the device check sees it)."""
    calls = re.compile(r"\b(?:torch\.)?distributed\.(all_reduce|all_gather\w*|barrier|broadcast\w*|reduce\w*|"
                       r"scatter\w*|gather\w*)\s*\(")
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "ttrv").rglob("*.py"))
                 if path.name != "collectives.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if calls.search(line)]
    assert offenders == []


# --------------------------------------------------------------------------------------------------- ZeRO-3, 2 ranks
TINY_OVERRIDES = ["resources.zeroStage=3", "resources.offloadOptimizer=true", "data.subsetSize=8",
                  "grpo.epochs=1", "grpo.promptsPerStep=4", "rollout.votes=4", "rollout.groupSize=2",
                  "eval.limit=8", "eval.majVotes=4", "storage.checkpointEvery=1"]
"""examples/tiny.yaml shrunk to 2 steps of 4 prompts and evaluations of 8 prompts, under ZeRO-3 with the optimiser
offloaded and a checkpoint after step 1."""


def ttrv_run_tiny(out, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """The README's `ttrv run SPEC --nproc 2` on examples/tiny.yaml, shortened with --set, collectives strict."""
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TTRV_METRICS_PORT": "0",
                        "TTRV_STRICT_COLLECTIVES": "1"}
    return subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(ROOT / "examples" / "tiny.yaml"), "--out",
                           str(out), "--nproc", str(nproc), *sets], capture_output=True, text=True,
                          timeout=timeout, env=env)


def logged(stderr: str, name: str) -> list[dict]:
    """The events `name` in a log that two ranks (and tqdm's bars) write into at once: a line may hold more than
    one JSON object, so every object is decoded where it starts."""
    decoder, found = json.JSONDecoder(), []
    for line in stderr.splitlines():
        for start in (m.start() for m in re.finditer(r'\{"', line)):
            try:
                value, _ = decoder.raw_decode(line, start)
            except json.JSONDecodeError:
                continue
            if value.get("event") == name:
                found.append(value)
    return found


@dataclass(frozen=True)
class TinyRun:
    out: Path
    stderr: str
    report: dict
    published: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> TinyRun:
    """One `ttrv run` of the tiny spec with zeroStage 3, offloadOptimizer and --nproc 2, for the tests below."""
    out = tmp_path_factory.mktemp("zero3") / "out"
    first = ttrv_run_tiny(out)
    assert first.returncode == 0, first.stderr[-4000:]
    store = open_store(f"file://{out / 'store'}")
    return TinyRun(out, first.stderr, json.loads((out / "report.json").read_text()), store.load_weights(2))


@pytest.mark.timeout(900)
def test_zero3_offload_two_processes_publish(zero3_run):
    """`ttrv run` of the tiny spec with zeroStage 3, offloadOptimizer and --nproc 2 finishes on CPU (issue 15's
    done-when): DeepSpeed's CPU Adam trains, every rank enters the ZeRO-3 gather of the published weights (a
    collective by DeepSpeed's contract; main entered it on rank 0 alone, which gloo on CPU happened to survive),
    and every collective's tensor was placed on the engine's device (strict mode)."""
    out, report, published = zero3_run.out, zero3_run.report, zero3_run.published
    ready = logged(zero3_run.stderr, "learner_ready")
    assert len(ready) == 2 and {(r["world"], r["zero"], r["optimizer"]) for r in ready} == \
        {(2, 3, "DeepSpeedCPUAdam")}
    assert ready[0]["trainable_params"] > 0
    assert report["world_size"] == 2 and report["steps"] == 2 and report["final_accuracy"] is not None
    assert [e["step"] for e in events(out)] == [1, 2]
    store = open_store(f"file://{out / 'store'}")
    assert store.weight_versions() == [1, 2]
    assert checkpoint.committed_steps(store) == [1]
    base = load_model(resolve_model("ttrv://tiny-qwen2vl")).state_dict()
    assert set(published) <= set(base) and len(published) > 10
    assert all(published[k].shape == base[k].shape for k in published)  # gathered, not ZeRO-3's empty partitions
    assert sum((published[k] - base[k]).abs().sum() for k in published) > 0


@pytest.mark.timeout(900)
def test_zero3_partitions_the_policy_while_it_loads(zero3_run):
    """Under ZeRO-3 each of the 2 ranks loads the policy straight into its own partition (transformers builds it
    inside deepspeed.zero.Init: ttrv.learner.load_policy), holding about half its elements, instead of a whole
    copy per rank that DeepSpeed partitions only later."""
    loaded = logged(zero3_run.stderr, "policy_loaded")
    assert len(loaded) == 2 and all(entry["zero3_init"] for entry in loaded)
    total = loaded[0]["parameters"]
    assert total == sum(p.numel() for p in load_model(resolve_model("ttrv://tiny-qwen2vl")).parameters())
    for entry in loaded:  # half, up to DeepSpeed's padding of each partition to equal sizes
        assert entry["parameters"] == total and total / 2 <= entry["held"] < 0.55 * total


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_zero3_offload_two_processes_resume(zero3_run):
    """Run again on the same folder, the ZeRO-3 run with 2 processes resumes from its step-1 checkpoint (each
    rank its own partition of the weights and of CPU Adam's states) and ends on the same weights. A second
    2-process run: about 100 s on this machine, so it runs with `make test-all`."""
    out, published = zero3_run.out, zero3_run.published
    again = ttrv_run_tiny(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [(r["step"], r["attempt"]) for r in logged(again.stderr, "resumed")] == [(1, 2), (1, 2)]
    assert json.loads((out / "report.json").read_text())["attempts"] == 2
    assert [e["step"] for e in events(out)] == [1, 2]
    resumed = open_store(f"file://{out / 'store'}").load_weights(2)
    for name in published:
        torch.testing.assert_close(resumed[name], published[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.timeout(900)
def test_evaluation_is_sharded_over_ranks_and_equals_one_rank(zero3_run):
    """Each of the 2 ranks evaluated half of every pass (rank 0 evaluated everything while rank 1 waited in a
    barrier), and the gathered results are those of one process evaluating the whole of each pass. (Reads the
    first run's report, so it does not depend on the resume test's order.)"""
    from ttrv.evaluate import evaluate, evaluation_passes
    from ttrv.modeling import load_processor
    from ttrv.rollout.hf import HFEngine
    from ttrv.spec import load_run_spec
    from ttrv.splits import subset_examples
    from ttrv.train import load_examples

    finished = [e for e in logged(zero3_run.stderr, "evaluation_pass_finished") if e["stage"] == "evaluating-before"]
    assert len(finished) == 2 * 4  # each rank finished each of the 4 passes (one rank alone: 4)
    assert sorted((e.get("rank"), e["split"], e["metric"], e["prompts"], e.get("shard")) for e in finished) == sorted(
        (rank, split, metric, 8, 4) for rank in (0, 1)
        for split, metric in [("subset", "pass@1"), ("test", "pass@1"), ("test", "maj@4"), ("heldout", "pass@1")])

    spec = load_run_spec(zero3_run.out / "run.yaml")
    test, prompts, heldout = load_examples(spec)
    path = resolve_model(spec.model.path)
    engine = HFEngine(load_model(path), load_processor(path))  # as the trainer makes it (ttrv.train.make_engine)
    alone = evaluate(engine, spec, "evaluating-before",
                     evaluation_passes(spec, subset_examples(test, prompts), test, heldout), show=False)
    report = zero3_run.report
    assert (report["subset_base_accuracy"], report["base_accuracy"], report["base_valid_ratio"],
            report["base_maj_accuracy"], report["base_pass_at_n"], report["heldout_base_accuracy"]) == (
        alone["subset_accuracy"], alone["accuracy"], alone["valid_ratio"], alone["maj_accuracy"],
        alone["pass_at_n"], alone["heldout_accuracy"])


# --------------------------------------------------------------------------------------------------- SIGTERM
@pytest.mark.timeout(300)
@pytest.mark.parametrize("phase", ["learner_ready", "evaluation_pass_started"])
def test_sigterm_ends_the_trainer_during_start_up(tmp_path, phase):
    """SIGTERM after the learner loaded (the engine still loading) or during the first evaluation (400 prompts and
    maj@32: minutes) ends the trainer within seconds, with the retryable preemption code; it used to be read only
    between adaptation steps, so the phase ran to its end first."""
    write_spec(tmp_path, eval={"before": True, "after": False, "majVotes": 32})
    process = trainer(tmp_path)
    try:
        wait_for(lambda: log_events(tmp_path / "trainer.log", phase), 240, process)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == exitcodes.PREEMPTED, (tmp_path / "trainer.log").read_text()[-3000:]
    assert time.monotonic() - sent < 30
    assert log_events(tmp_path / "trainer.log", "trainer_interrupted")
    assert not events(tmp_path)  # no step ran


# --------------------------------------------------------------------------------------------------- accelerator
@pytest.mark.parametrize(("environ", "cuda", "chosen"), [
    ({}, True, "cuda"),  # `ttrv run` on a GPU machine: the policy trains on the GPU (it was forced to cpu)
    ({}, False, "cpu"),
    ({"DS_ACCELERATOR": "cpu"}, True, "cpu"),  # the user's choice stands
    ({"DS_ACCELERATOR": "cuda"}, False, "cuda"),
    ({"DS_ACCELERATOR": ""}, True, "cuda"),
])
def test_the_accelerator_is_chosen_from_the_hardware(environ, cuda, chosen):
    from ttrv.launch import choose_accelerator

    assert choose_accelerator(environ, cuda) == chosen


def test_ttrv_run_passes_the_chosen_accelerator_to_its_processes(monkeypatch):
    from ttrv import launch

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launch.accelerator_env(os.environ)["DS_ACCELERATOR"] == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.accelerator_env(os.environ)["DS_ACCELERATOR"] == "cpu"
