"""Evaluation shows its progress the way adaptation does: before and after adapting, the passes over the test set
(greedy and maj@N) are a real model's longest phases. In process on the bundled tiny model and benchmark (the
chunks, the answers, the bar and the events), and as a real trainer (its log and progress.json while it runs)."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from trainer_util import events, log_events, trainer, write_spec

from ttrv import benchmark
from ttrv.data import Example, read_dataset, require_images
from ttrv.evaluate import EvalProgress, evaluate, evaluation_passes, greedy_accuracy, prompts_per_call
from ttrv.modeling import load_model, load_processor
from ttrv.reward import extract_answer
from ttrv.rollout.hf import HFEngine
from ttrv.spec import RunSpec
from ttrv.store import open_store
from ttrv.weights import resolve_model


@pytest.fixture(scope="module")
def engine():
    path = resolve_model("ttrv://tiny-qwen2vl")
    # 16 sequences per batch: a greedy pass is asked for 16 prompts at a time, a maj@4 pass for 4
    return HFEngine(load_model(path), load_processor(path), max_batch_sequences=16)


@pytest.fixture(scope="module")
def test_split():
    return require_images(read_dataset(benchmark.resolve("ttrv://tiny-shapes/test"), "auto", None)).examples


def spec(**eval_fields) -> RunSpec:
    return RunSpec.model_validate({"data": {"path": "ttrv://tiny-shapes/test"}, "seed": 5,
                                   "rollout": {"votes": 8, "groupSize": 4, "maxNewTokens": 3},
                                   "eval": {"majVotes": 4, **eval_fields}})


def test_a_stage_reports_after_every_chunk_and_chunks_change_no_answer(engine, test_split, capsys, log_stream):
    run = spec(limit=20)
    passes = evaluation_passes(run, test_split[:4], test_split, [])
    assert [(p.metric, p.split, len(p.examples), p.samples) for p in passes] == [
        ("pass@1", "subset", 4, 1), ("pass@1", "test", 20, 1), ("maj@4", "test", 20, 4)]
    assert (prompts_per_call(engine, 1, 20), prompts_per_call(engine, 4, 20)) == (16, 4)

    reports: list[EvalProgress] = []
    results = evaluate(engine, run, "evaluating-after", passes, report=reports.append)

    # one report before anything ran, then one per chunk: 4 | 16 4 | 4 x 5
    assert [r.done for r in reports] == [0, 4, 20, 24, 28, 32, 36, 40, 44]
    assert [r.done for r in reports if r.milestone] == [0, 4, 24, 44]  # the start, and each pass's end
    assert {(r.stage, r.total) for r in reports} == {("evaluating-after", 44)}
    assert reports[0].remaining_seconds is None and reports[-1].remaining_seconds == 0
    assert all(r.remaining_seconds > 0 for r in reports[1:-1])

    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    started = [e for e in events if e["event"] == "evaluation_pass_started"]
    finished = [e for e in events if e["event"] == "evaluation_pass_finished"]
    assert [(e["stage"], e["metric"], e["split"], e["prompts"]) for e in started] == [
        ("evaluating-after", "pass@1", "subset", 4), ("evaluating-after", "pass@1", "test", 20),
        ("evaluating-after", "maj@4", "test", 20)]
    assert [(e["metric"], e["split"], e["prompts"]) for e in finished] == [
        (e["metric"], e["split"], e["prompts"]) for e in started]
    assert all(e["seconds"] >= 0 for e in finished)
    assert [e["accuracy"] for e in finished] == [round(results[k], 4) for k in
                                                 ("subset_accuracy", "accuracy", "maj_accuracy")]
    assert "after maj@4 test: 100%" in capsys.readouterr().err  # the bar, as adapt's

    # other ranks show no bar, and a report still marks each pass's end
    quiet: list[EvalProgress] = []
    evaluate(engine, run, "evaluating-before", passes[:1], show=False, report=quiet.append)
    assert [(r.done, r.milestone) for r in quiet] == [(0, True), (4, True)]
    assert "before pass@1" not in capsys.readouterr().err

    # the same greedy answers as one call over all 20 prompts (which the engine splits into the same batches)
    whole = engine.generate([e.prompt for e in test_split[:20]], n=1, temperature=0.0, top_p=1.0, max_new_tokens=3)
    answers = [extract_answer(o[0].text, run.reward.extractor, run.reward.choices) for o in whole]
    correct = sum(a == e.answer for a, e in zip(answers, test_split[:20], strict=True))
    assert results["accuracy"] == correct / 20


def test_the_trainer_shows_its_evaluation_in_progress_json_and_its_log(tmp_path):
    """A real tiny run with evaluation before and after: progress.json, polled while it runs, goes through
    evaluating-before (prompts done of the total), adapting, evaluating-after and finished, and the log has an
    event at the start and end of every pass. A subset probe after the last step stands in for the final
    evaluation's subset pass (the same greedy pass on the same weights)."""
    write_spec(tmp_path, name="evalprogress", eval={"limit": 40, "majVotes": 4, "every": 2},
               grpo={"lr": 1.0e-3, "epochs": 1, "promptsPerStep": 7, "microBatchSize": 8})
    uri = yaml.safe_load((tmp_path / "run.yaml").read_text())["storage"]["uri"]
    store = open_store(uri)
    process = trainer(tmp_path)
    seen: list[tuple] = []

    def look() -> None:
        document = store.get_json("progress.json") or {}
        snapshot = (document.get("stage"), document.get("evalPromptsDone"), document.get("evalPromptsTotal"),
                    document.get("step"))
        if document and (not seen or seen[-1] != snapshot):
            seen.append(snapshot)

    try:
        deadline = time.monotonic() + 600
        while process.poll() is None and time.monotonic() < deadline:
            look()
            time.sleep(0.01)
        look()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.wait() == 0, (tmp_path / "trainer.log").read_text()[-3000:]

    stages = [s[0] for s in seen]
    assert [stage for i, stage in enumerate(stages) if i == 0 or stages[i - 1] != stage] == [
        "evaluating-before", "adapting", "evaluating-after", "finished"], seen
    before = [s for s in seen if s[0] == "evaluating-before"]
    after = [s for s in seen if s[0] == "evaluating-after"]
    # before: subset 14 + greedy 40 + maj@4 40 prompts; after: the subset pass is the last probe's
    # progress.json is rewritten at least at each pass's end: each such snapshot lasts the next pass
    assert before[0][1:] == (0, 94, 0) and after[0][1:] == (0, 80, 2), seen
    assert any(0 < s[1] < 94 for s in before) and any(0 < s[1] < 80 for s in after), seen
    for stage in (before, after):
        done = [s[1] for s in stage]
        assert done == sorted(done) and len({s[2] for s in stage}) == 1

    log = tmp_path / "trainer.log"
    started, finished = log_events(log, "evaluation_pass_started"), log_events(log, "evaluation_pass_finished")
    expected = [("evaluating-before", "pass@1", "subset", 14), ("evaluating-before", "pass@1", "test", 40),
                ("evaluating-before", "maj@4", "test", 40), ("evaluating-after", "pass@1", "test", 40),
                ("evaluating-after", "maj@4", "test", 40)]
    assert [(e["stage"], e["metric"], e["split"], e["prompts"]) for e in started] == expected
    assert [(e["stage"], e["metric"], e["split"], e["prompts"]) for e in finished] == expected
    assert all(isinstance(e["seconds"], (int, float)) for e in finished)

    report = json.loads((tmp_path / "report.json").read_text())
    probes = [e["subset_accuracy"] for e in events(tmp_path) if "subset_accuracy" in e]
    assert len(probes) == 1 and report["subset_final_accuracy"] is not None
    assert round(report["subset_final_accuracy"], 4) == probes[-1]


def test_greedy_accuracy_reads_labels_through_the_extractor(engine, test_split):
    """A label written "(B)" or " B " is the option B: the same model and answers score the same as with bare
    letters (labels were compared raw with extracted predictions, issue 16 item 6)."""
    examples = test_split[:24]
    dressed = [Example(e.prompt, f" ({e.answer}) " if i % 2 else f"{e.answer} ") for i, e in enumerate(examples)]
    plain, written = greedy_accuracy(engine, examples, spec()), greedy_accuracy(engine, dressed, spec())
    assert plain["accuracy"] > 0  # the tiny model gets some right, so equal scores say something
    assert written["accuracy"] == plain["accuracy"]
