"""The label-free stopping rules of ttrv/guard.py as pure functions over per-step signals: early stopping, the
run's budget, and which dataset's budget a run gets. (The collapse guard on recorded runs: test_guard_recorded.py;
a whole run that stops: test_adaptation.py.)"""

from __future__ import annotations

import pytest

from ttrv.guard import GPU_HOURS, MAX_STEPS, EarlyStop, budget_spent, devices, majority_share
from ttrv.spec import BudgetSpec, EarlyStopSpec, ExperimentSpec, RunSpec, SpecError, parse_spec

pytestmark = pytest.mark.pure


def feed(rule: EarlyStop, values: list[float], key: str = "entropy") -> int | None:
    """The step at which the rule fires over these per-step values (None: it never does)."""
    for step, value in enumerate(values, start=1):
        if rule.observe(step, {key: value}):
            return step
    return None


def test_early_stop_fires_once_the_windowed_signal_stops_improving():
    spec = EarlyStopSpec(enabled=True, signal="entropy", window=2, min_delta=0.05, patience=3, min_steps=0)
    # falling entropy improves; from step 4 on it stays at 0.3: the best window (0.3) is set at step 5, and
    # steps 6, 7, 8 bring no fall of 0.05 more
    assert feed(EarlyStop(spec), [0.9, 0.7, 0.5, 0.3, 0.3, 0.3, 0.31, 0.29, 0.3, 0.3]) == 8


def test_early_stop_keeps_going_while_the_signal_moves_and_waits_for_min_steps():
    spec = EarlyStopSpec(enabled=True, signal="entropy", window=1, min_delta=0.01, patience=2, min_steps=0)
    assert feed(EarlyStop(spec), [1.0 - 0.05 * i for i in range(15)]) is None
    flat = [0.5] * 20
    assert feed(EarlyStop(spec), flat) == 3
    assert feed(EarlyStop(spec.model_copy(update={"min_steps": 13})), flat) == 13


@pytest.mark.parametrize("signal, key", [("reward", "reward"), ("majorityShare", "majority_share")])
def test_reward_and_majority_share_improve_by_rising(signal, key):
    spec = EarlyStopSpec(enabled=True, signal=signal, window=1, min_delta=0.01, patience=2, min_steps=0)
    assert feed(EarlyStop(spec), [0.1, 0.2, 0.3, 0.4, 0.5], key) is None  # rising: improving
    assert feed(EarlyStop(spec), [0.5, 0.4, 0.3, 0.2, 0.1], key) == 3  # falling: never better than the first


def test_early_stop_is_off_by_default_and_its_state_resumes():
    assert not EarlyStopSpec().enabled
    assert feed(EarlyStop(EarlyStopSpec(signal="entropy", min_steps=0, window=1, patience=1)), [0.5] * 10) is None
    spec = EarlyStopSpec(enabled=True, signal="entropy", window=2, min_delta=0.01, patience=2, min_steps=0)
    first = EarlyStop(spec)
    for step, value in enumerate([0.5, 0.5, 0.5], start=1):
        assert not first.observe(step, {"entropy": value})
    resumed = EarlyStop(spec, **first.state())  # what a checkpoint's RunState carries
    assert resumed.observe(4, {"entropy": 0.5})


def test_budget_stops_at_max_steps_or_device_hours():
    assert budget_spent(BudgetSpec(), 10_000, 1e9, 8) is None
    assert budget_spent(BudgetSpec(max_steps=20), 19, 0.0, 1) is None
    assert budget_spent(BudgetSpec(max_steps=20), 20, 0.0, 1) == MAX_STEPS
    # 8 GPUs for 15 minutes are 2 GPU-hours
    assert budget_spent(BudgetSpec(gpu_hours=2.0), 5, 14 * 60, 8) is None
    assert budget_spent(BudgetSpec(gpu_hours=2.0), 5, 15 * 60, 8) == GPU_HOURS


def test_devices_count_gpus_or_cpu_processes():
    data = {"data": {"path": "x.json"}}
    assert devices(RunSpec(**data, resources={"nodes": 2, "gpusPerNode": 4})) == 8
    assert devices(RunSpec(**data, resources={"gpusPerNode": 0, "processesPerNode": 2})) == 2


def test_a_dataset_budget_replaces_the_experiments_and_bad_budgets_are_named():
    spec = ExperimentSpec(budget={"gpuHours": 1.0}, datasets=[
        {"name": "a", "path": "a.json"}, {"name": "b", "path": "b.json", "budget": {"maxSteps": 7}}])
    assert spec.run_spec("a").budget == BudgetSpec(gpu_hours=1.0)
    assert spec.run_spec("b").budget == BudgetSpec(max_steps=7)
    assert spec.run_spec("b").data.path == "b.json"
    with pytest.raises(SpecError, match=r"datasets\.0\.budget\.maxSteps"):
        parse_spec({"datasets": [{"name": "a", "path": "a.json", "budget": {"maxSteps": 0}}]}, ExperimentSpec, "x")
    with pytest.raises(SpecError, match=r"grpo\.earlyStop\.signal"):
        parse_spec({"data": {"path": "a.json"}, "grpo": {"earlyStop": {"signal": "accuracy"}}}, RunSpec, "x")


def test_majority_share_is_agreement_within_prompts():
    assert majority_share([["A", "A", "B", "B"], ["C", "C", "C", None]]) == pytest.approx((0.5 + 0.75) / 2)
    assert majority_share([[None, None]]) == 0.0


def test_the_report_plot_marks_where_adapting_stopped():
    from ttrv.report import plot, stop_line

    report = {"name": "x", "stop_reason": "EarlyStopped", "steps": 13, "steps_saved": 39}
    assert stop_line(report) == (13, "EarlyStopped at step 13, 39 steps saved")
    assert stop_line({"steps": 52, "stop_reason": None}) is None
    events = [{"step": s, "reward": 0.1, "entropy": 0.5, "response_length": 2.0} for s in range(1, 14)]
    assert plot(report, events).startswith(b"\x89PNG")
