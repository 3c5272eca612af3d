"""The operator's decisions as pure functions over (spec, observed objects): one case per transition.

No API and no kopf here (test_operator_kopf.py runs the handlers against an API stand-in); every case states
the world as the API would show it and checks what the operator decides to do and to report.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

import pytest
from k8s_util import validate_object
from operator_fixtures import (
    NOW,
    PREEMPT_MESSAGE,
    QUOTA_MESSAGE,
    ago,
    cond,
    deployment,
    experiment,
    failed,
    job,
    pod,
    restarting,
    run_of,
    running,
    spec_document,
    succeeded,
    workload,
)

from operators.conditions import Want, human_duration, set_conditions
from operators.experiments import ACCEPTED_ANNOTATION, decide_experiment, spec_changes
from operators.experiments import Observed as ExpObserved
from operators.progress import Progress, parse_progress
from operators.runs import (
    Observed,
    decide_run,
    desired_children,
    retry_delay,
    wants_pods,
    wants_progress,
    wants_workload,
)
from ttrv.labels import QUEUE_LABEL

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure

SERVICE = {"rollout": {"backend": "service"}}
KUEUE = {"scheduling": {"queueName": "gpu-a"}}


def accepted(spec: dict) -> dict:
    """The annotation the operator writes when it accepts `spec` (computed by the operator itself)."""
    plan = decide_experiment(ExpObserved(experiment(spec), [], NOW))
    return {ACCEPTED_ANNOTATION: annotation(plan)}


def decide_exp(exp: dict, runs=()):
    plan = decide_experiment(ExpObserved(exp, list(runs), NOW))
    validate_object(exp | {"status": plan.status})  # whatever the operator reports fits the CRD
    return plan


def created(plan) -> list[dict]:
    """The AdaptationRuns an experiment's plan creates."""
    return [a.body for a in plan.actions if (a.verb, a.kind) == ("create", "AdaptationRun")]


def patched(plan) -> list[tuple[str, dict]]:
    """(name, merge patch) of the AdaptationRuns an experiment's plan patches."""
    return [(a.name, a.body) for a in plan.actions if (a.verb, a.kind) == ("patch", "AdaptationRun")]


def annotation(plan) -> str | None:
    """The accepted spec an experiment's plan records, if it records one: its first action."""
    first = plan.actions[0] if plan.actions else None
    if first is None or (first.verb, first.kind) != ("patch", "Experiment"):
        return None
    return first.body["metadata"]["annotations"][ACCEPTED_ANNOTATION]


def rows(plan) -> list[tuple[str, str]]:
    return [(row["name"], row["phase"]) for row in plan.status["datasets"]]


def conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


# --- experiments: scheduling ---------------------------------------------------------------------------------

THREE = spec_document(datasets=[{"name": n, "path": f"/data/{n}.json"} for n in ("a", "b", "c")])


def test_new_experiment_starts_only_the_first_run_and_records_its_spec():
    exp = experiment(THREE)
    plan = decide_exp(exp)
    assert [run["metadata"]["name"] for run in created(plan)] == ["exp-a"]
    assert rows(plan) == [("a", "Queued"), ("b", "Pending"), ("c", "Pending")]
    assert plan.status["phase"] == "Pending"
    assert "waiting for a slot: 1 of 1 runs active" in plan.status["datasets"][1]["message"]
    assert json.loads(annotation(plan))["datasets"][2]["name"] == "c"
    assert [e.reason for e in plan.events] == ["RunCreated"]
    # the run belongs to the experiment, so deleting the experiment deletes it
    assert created(plan)[0]["metadata"]["ownerReferences"][0]["uid"] == exp["metadata"]["uid"]


@pytest.mark.parametrize("phases, new_runs, phase", [
    ({"a": "Running"}, [], "Running"),
    ({"a": "Queued"}, [], "Pending"),
    ({"a": "Succeeded"}, ["exp-b"], "Running"),
    # a failed dataset frees its slot: the others still run
    ({"a": "Failed"}, ["exp-b"], "Running"),
    ({"a": "Succeeded", "b": "Failed", "c": "Running"}, [], "Running"),
    ({"a": "Succeeded", "b": "Succeeded", "c": "Succeeded"}, [], "Succeeded"),
    ({"a": "Failed", "b": "Failed", "c": "Failed"}, [], "Failed"),
    ({"a": "Succeeded", "b": "Failed", "c": "Succeeded"}, [], "PartiallySucceeded"),
    ({"a": "Preempted"}, [], "Running"),
])
def test_next_run_starts_when_one_finishes(phases, new_runs, phase):
    exp = experiment(THREE, annotations=accepted(THREE))
    plan = decide_exp(exp, [run_of(exp, d, phase=p) for d, p in phases.items()])
    assert [run["metadata"]["name"] for run in created(plan)] == new_runs
    assert plan.status["phase"] == phase


def test_max_parallel_runs_starts_that_many_in_order():
    spec = THREE | {"maxParallelRuns": 2}
    plan = decide_exp(experiment(spec, annotations=accepted(spec)))
    assert [run["spec"]["dataset"] for run in created(plan)] == ["a", "b"]
    assert rows(plan)[2] == ("c", "Pending")


def test_outcome_counts_progress_accuracy_and_events():
    exp = experiment(THREE, annotations=accepted(THREE),
                     status={"datasets": [{"name": "a", "phase": "Running"}, {"name": "b", "phase": "Running"}]})
    runs = [run_of(exp, "a", phase="Succeeded", status={"progress": 100.0, "baseAccuracy": 0.4, "accuracy": 0.6}),
            run_of(exp, "b", phase="Failed", status={"progress": 30.0, "reason": "TrainerFailed",
                                                      "message": "trainer failed with exit code 3 (bad data)"}),
            run_of(exp, "c", phase="Running", status={"progress": 40.0, "step": 4, "totalSteps": 10, "eta": "6m",
                                                       "baseAccuracy": 0.2, "accuracy": 0.3, "weightVersion": 4,
                                                       "reason": "TrainerRunning", "restarts": 1})]
    plan = decide_exp(exp, runs)
    status = plan.status
    assert (status["datasetsRunning"], status["datasetsDone"], status["datasetsFailed"], status["datasetsTotal"]) \
        == (1, 2, 1, 3)
    assert status["progress"] == pytest.approx((100 + 100 + 40) / 3, abs=0.01)  # a finished run counts 100
    assert status["baseAccuracy"] == pytest.approx(0.3) and status["accuracy"] == pytest.approx(0.45)
    c = status["datasets"][2]
    assert (c["step"], c["totalSteps"], c["eta"], c["weightVersion"], c["restarts"]) == (4, 10, "6m", 4, 1)
    assert "message" not in c  # a plainly running run needs no words in the table
    assert conditions(status)["Failed"] == ("True", "DatasetsFailed")
    assert "b: trainer failed with exit code 3" in next(c for c in status["conditions"] if c["type"] == "Failed")["message"]
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "DatasetSucceeded"), ("Warning", "DatasetFailed")]
    assert "0.400 -> 0.600" in plan.events[0].message


def test_finished_experiment_reports_and_announces_its_end():
    exp = experiment(THREE, annotations=accepted(THREE), status={"phase": "Running"})
    runs = [run_of(exp, d, phase=p) for d, p in (("a", "Succeeded"), ("b", "Failed"), ("c", "Succeeded"))]
    plan = decide_exp(exp, runs)
    assert plan.status["phase"] == "PartiallySucceeded"
    assert conditions(plan.status)["Succeeded"] == ("False", "PartiallySucceeded")
    assert ("Warning", "ExperimentPartiallySucceeded") in [(e.type, e.reason) for e in plan.events]


def test_runs_of_a_namesake_experiment_are_not_adopted_but_waited_for():
    exp = experiment(THREE, annotations=accepted(THREE))
    stranger = run_of(exp, "a", phase="Running")
    stranger["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-deleted-experiment"
    plan = decide_exp(exp, [stranger])
    assert [run["metadata"]["name"] for run in created(plan)] == ["exp-b"]
    row = plan.status["datasets"][0]
    assert (row["phase"], "run" in row) == ("Pending", False)
    assert "exp-a" in row["message"] and "garbage-collected" in row["message"]
    assert not [e for e in plan.events if e.type == "Warning"]


def test_a_run_name_held_by_another_experiment_fails_that_dataset_with_the_fix():
    """`exp-a` + dataset `b` and `exp` + dataset `a-b` both make the name `exp-a-b`: the dataset whose name is
    taken fails at once (a create would answer 409 forever), and the other datasets go on."""
    spec = spec_document(datasets=[{"name": "a-b", "path": "/data/ab.json"},
                                   {"name": "c", "path": "/data/c.json"}])
    exp = experiment(spec, annotations=accepted(spec))
    other = experiment(spec_document(datasets=[{"name": "b", "path": "/data/b.json"}]), name="exp-a")
    other["metadata"]["uid"] = "uid-of-exp-a"
    holder = run_of(other, "b", phase="Running")
    assert holder["metadata"]["name"] == "exp-a-b"
    plan = decide_exp(exp, [holder])
    assert [run["metadata"]["name"] for run in created(plan)] == ["exp-c"]
    assert rows(plan) == [("a-b", "Failed"), ("c", "Queued")]
    message = plan.status["datasets"][0]["message"]
    assert "exp-a-b" in message and "experiment exp-a" in message and "rename" in message
    assert ("Warning", "DatasetFailed") in [(e.type, e.reason) for e in plan.events]
    assert plan.status["datasetsFailed"] == 1 and plan.status["phase"] == "Running"


def test_a_decision_over_its_own_result_changes_nothing():
    exp = experiment(THREE, annotations=accepted(THREE))
    runs = [run_of(exp, "a", phase="Running", status={"progress": 10.0, "reason": "TrainerRunning"})]
    first = decide_exp(exp, runs)
    later = decide_experiment(ExpObserved(exp | {"status": first.status}, runs, NOW + timedelta(minutes=5)))
    assert later.status == first.status and created(later) == [] and patched(later) == [] and later.events == []


# --- experiments: suspend and spec changes -------------------------------------------------------------------

def test_suspend_reaches_active_runs_only_and_starts_nothing():
    spec = THREE | {"suspend": True}
    exp = experiment(spec, annotations=accepted(THREE))  # suspend is a change the operator accepts
    runs = [run_of(exp, "a", phase="Succeeded", suspend=False), run_of(exp, "b", phase="Running", suspend=False)]
    plan = decide_exp(exp, runs)
    assert patched(plan) == [("exp-b", {"spec": {"suspend": True}})]
    assert created(plan) == []
    assert plan.status["phase"] == "Suspended"
    assert conditions(plan.status)["Ready"] == ("False", "Suspended")
    assert json.loads(annotation(plan))["suspend"] is True
    assert rows(plan)[2] == ("c", "Pending") and plan.status["datasets"][2]["message"] == "the experiment is suspended"


def test_resume_unsuspends_the_runs():
    suspended = THREE | {"suspend": True}
    exp = experiment(THREE, annotations=accepted(suspended))
    plan = decide_exp(exp, [run_of(exp, "a", phase="Suspended", suspend=True)])
    assert patched(plan) == [("exp-a", {"spec": {"suspend": False}})]


def test_allowed_change_is_applied_and_announced():
    spec = THREE | {"maxParallelRuns": 2}
    exp = experiment(spec, annotations=accepted(THREE), generation=2)
    plan = decide_exp(exp, [run_of(exp, "a", phase="Running")])
    assert [run["spec"]["dataset"] for run in created(plan)] == ["b"]
    assert json.loads(annotation(plan))["maxParallelRuns"] == 2
    assert [e.reason for e in plan.events] == ["RunCreated", "SpecChangeAccepted"]
    assert "maxParallelRuns" in plan.events[1].message
    assert plan.status["observedGeneration"] == 2


def test_disallowed_change_is_rejected_whole_and_the_accepted_spec_stays():
    changed = json.loads(json.dumps(THREE))
    changed["datasets"][1]["path"] = "/data/other.json"
    changed["maxParallelRuns"] = 3  # allowed on its own, but not half-applied next to a rejected change
    changed["grpo"] = {"lr": 1e-6}
    exp = experiment(changed, annotations=accepted(THREE), generation=2)
    plan = decide_exp(exp, [run_of(exp, "a", phase="Running")])
    assert annotation(plan) is None and created(plan) == [] and patched(plan) == []
    rejected = next(c for c in plan.status["conditions"] if c["type"] == "SpecChangeRejected")
    assert (rejected["status"], rejected["reason"]) == ("True", "SpecChangeRejected")
    assert rejected["message"].startswith("datasets[1].path, grpo.lr cannot change while the experiment exists")
    assert [e.reason for e in plan.events] == ["SpecChangeRejected"]
    # reverted: the condition clears
    again = decide_exp(experiment(THREE, annotations=accepted(THREE), status=plan.status), [run_of(exp, "a")])
    assert conditions(again.status)["SpecChangeRejected"] == ("False", "SpecAccepted")


def test_invalid_change_is_rejected_and_invalid_spec_fails_the_experiment():
    bad = THREE | {"rollout": {"votes": 4, "groupSize": 8}}
    plan = decide_exp(experiment(bad, annotations=accepted(THREE)))
    assert conditions(plan.status)["SpecChangeRejected"] == ("True", "SpecChangeRejected")
    assert "groupSize (8) > votes (4)" in plan.status["conditions"][-1]["message"]
    fresh = decide_exp(experiment(THREE | {"storage": {"uri": "file:///data"}}))
    assert fresh.status["phase"] == "Failed" and created(fresh) == [] and annotation(fresh) is None
    assert conditions(fresh.status)["Ready"] == ("False", "SpecInvalid")
    assert "s3://bucket/prefix" in fresh.status["message"]
    assert [e.reason for e in fresh.events] == ["SpecInvalid"]


def test_spec_changes_name_the_fields():
    assert spec_changes({"a": 1, "b": {"c": [1, {"d": 2}]}}, {"a": 1, "b": {"c": [1, {"d": 3}]}}) == ["b.c[1].d"]
    assert spec_changes({"l": [1]}, {"l": [1, 2]}) == ["l"]
    assert spec_changes({"x": 1}, {}) == ["x"]


# --- runs ------------------------------------------------------------------------------------------------------

def run_case(spec: dict | None = None, *, phase=None, status=None, suspend=None, dataset="mmmu") -> dict:
    exp = experiment(spec or spec_document())
    return run_of(exp, dataset, phase=phase, status=status, suspend=suspend)


def decide(run: dict, *children, kueue=False, now=NOW, settled=True, **observed):
    """`settled`: the children that never change (ConfigMap, Service, NetworkPolicy) exist already."""
    present = {c["kind"]: c for c in children}
    if settled:
        present = {c["kind"]: c for c in desired_children(run, kueue)
                   if c["kind"] not in ("PyTorchJob", "Deployment")} | present
    plan = decide_run(Observed(run, now, present, kueue_enabled=kueue, **observed))
    validate_object(run | {"status": plan.status})
    return plan


def verbs(plan) -> list[tuple[str, str]]:
    return [(a.verb, a.kind) for a in plan.actions]


# The trainer's identity for its progress reports (ttrv/manifests/access.py), created with the run's other children.
ACCESS = ("ServiceAccount", "Role", "RoleBinding")


def test_new_run_creates_its_children_and_trainer():
    run = run_case()
    plan = decide(run, settled=False)
    assert verbs(plan) == [("create", kind) for kind in ("ConfigMap", *ACCESS, "PyTorchJob")]
    assert (plan.status["phase"], plan.status["reason"]) == ("Queued", "TrainerCreated")
    assert plan.status["storeUri"] == "s3://ttrv/experiments/team-a/exp/mmmu"
    assert plan.actions[-1].body["spec"]["runPolicy"]["suspend"] is False


def test_trainer_waits_for_the_rollout_service():
    run = run_case(spec_document(**SERVICE))
    first = decide(run, settled=False)
    assert verbs(first) == [("create", kind) for kind in ("ConfigMap", "Deployment", "Service", "NetworkPolicy",
                                                           *ACCESS)]
    assert (first.status["phase"], first.status["reason"]) == ("Queued", "WaitingForRollout")
    assert first.events[0].message == ("created ConfigMap exp-mmmu-spec, Deployment exp-mmmu-rollout, "
                                       "Service exp-mmmu-rollout, NetworkPolicy exp-mmmu-rollout, ServiceAccount "
                                       "exp-mmmu-trainer, Role exp-mmmu-trainer, RoleBinding exp-mmmu-trainer")
    waiting = decide(run, deployment(run, ready=0))
    assert verbs(waiting) == [] and "0 of 1 replicas ready" in waiting.status["message"]
    ready = decide(run, deployment(run, ready=1))
    assert verbs(ready) == [("create", "PyTorchJob")]


def test_running_trainer_reports_progress():
    run = run_case(phase="Queued")
    progress = Progress(percentage=40.0, remaining_seconds=4800, step=4, total_steps=10, weight_version=4,
                        checkpoint_step=3, base_accuracy=0.25, accuracy=0.5)
    plan = decide(run, job(run, running()), progress=progress)
    status = plan.status
    assert (status["phase"], status["reason"]) == ("Running", "TrainerRunning")
    assert (status["progress"], status["step"], status["totalSteps"], status["eta"], status["weightVersion"],
            status["checkpointStep"], status["baseAccuracy"], status["accuracy"]) == \
        (40.0, 4, 10, "1h20m", 4, 3, 0.25, 0.5)
    assert status["startTime"] == "2026-03-01T12:00:00Z"
    assert conditions(status)["Ready"] == ("True", "TrainerRunning")
    assert conditions(status)["Running"] == ("True", "TrainerRunning")
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "TrainerRunning")]


def test_an_evaluating_trainer_reports_its_stage_and_prompts():
    """The passes over the test set before and after adapting are a run's longest phases on a real model: the
    status (and the STAGE and EVAL columns) says so, and drops what belonged to the previous stage."""
    run = run_case(phase="Queued")
    before = decide(run, job(run, running()), progress=parse_progress({
        "stage": "evaluating-before", "evalPromptsDone": 300, "evalPromptsTotal": 1200, "progressPercentage": 0.0,
        "step": 0, "totalSteps": 52}))
    status = before.status
    assert (status["stage"], status["evalPromptsDone"], status["evalPromptsTotal"], status["evalProgress"]) == \
        ("evaluating-before", 300, 1200, 25.0)
    assert (status["progress"], status["step"], status["eta"]) == (0.0, 0, None)  # adapting's time is unknown yet
    adapting = decide(run | {"status": status}, job(run, running()), progress=parse_progress({
        "stage": "adapting", "progressPercentage": 50.0, "step": 26, "totalSteps": 52,
        "estimatedRemainingSeconds": 600}))
    status = adapting.status
    assert (status["stage"], status["eta"], status["step"]) == ("adapting", "10m", 26)
    assert status["evalPromptsDone"] is status["evalPromptsTotal"] is status["evalProgress"] is None
    after = decide(run | {"status": status}, job(run, running()), progress=parse_progress({
        "stage": "evaluating-after", "evalPromptsDone": 1150, "evalPromptsTotal": 1150, "progressPercentage": 100.0,
        "step": 52, "totalSteps": 52}))
    status = after.status
    assert (status["stage"], status["evalProgress"], status["progress"]) == ("evaluating-after", 100.0, 100.0)
    assert status["eta"] is status["estimatedRemainingSeconds"] is None  # not adapting's 10m: it wrote no estimate
    done = decide(run | {"status": status}, job(run, succeeded()), progress=parse_progress({
        "stage": "finished", "progressPercentage": 100.0, "estimatedRemainingSeconds": 0, "accuracy": 0.5}))
    assert done.status["phase"] == "Succeeded"
    assert all(done.status[key] is None for key in ("stage", "evalProgress", "evalPromptsDone", "eta"))


def test_progress_without_a_stage_keeps_what_it_leaves_out():
    """An older trainer writes no stage: a key it leaves out keeps its value, as before."""
    run = run_case(phase="Running", status={"estimatedRemainingSeconds": 600, "eta": "10m", "step": 3})
    status = decide(run, job(run, running()), progress=Progress(percentage=40.0, step=4)).status
    assert (status["eta"], status["step"], status.get("stage")) == ("10m", 4, None)


def test_success_scales_the_rollout_to_zero_and_sticks():
    run = run_case(spec_document(**SERVICE), phase="Running", status={"progress": 95.0, "eta": "1m"})
    rollout = deployment(run, ready=1)
    plan = decide(run, rollout, job(run, succeeded(at=ago(5))))
    assert (plan.status["phase"], plan.status["progress"], plan.status["completionTime"]) == \
        ("Succeeded", 100.0, ago(5))
    assert plan.status["eta"] is None
    assert [(a.verb, a.kind, a.body) for a in plan.actions if a.kind == "Deployment"] == \
        [("patch", "Deployment", {"spec": {"replicas": 0}})]
    # The finished job is garbage-collected later (ttlSecondsAfterFinished): nothing comes back.
    done = run | {"status": plan.status}
    later = decide(done, deployment(run, replicas=0))
    assert [a for a in later.actions if a.kind == "PyTorchJob"] == [] and later.status["phase"] == "Succeeded"


@pytest.mark.parametrize("pods, exit_code, text", [
    ([pod(3, "data: /data/mmmu.json: no such file")], 3,
     "trainer failed with exit code 3 (bad data): data: /data/mmmu.json: no such file"),
    # no pod left: under ExitCode only a permanent exit code fails the job with this message
    ([], None, 'trainer failed with an unknown exit code (job "x" is failing because "Master" replica(s) failed.)'),
])
def test_permanent_failure_fails_the_run_with_the_trainers_message(pods, exit_code, text):
    run = run_case(spec_document(**SERVICE), phase="Running")
    plan = decide(run, deployment(run, ready=1), job(run, failed()), pods=pods)
    assert (plan.status["phase"], plan.status["reason"], plan.status.get("exitCode")) == \
        ("Failed", "TrainerFailed", exit_code)
    assert plan.status["message"] == text
    assert ("patch", "Deployment") in verbs(plan) and ("delete", "PyTorchJob") not in verbs(plan)
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "TrainerFailed")]
    assert conditions(plan.status)["Failed"] == ("True", "TrainerFailed")


def test_retryable_failure_waits_out_the_backoff_then_starts_a_new_trainer():
    run = run_case(phase="Running", status={"restarts": 1, "checkpointStep": 6})
    failing = job(run, failed(at=ago(30)))
    pods = [pod(170, "store unavailable")]
    waiting = decide(run, failing, pods=pods)  # restart 2: 60 s after the failure
    assert verbs(waiting) == []
    assert (waiting.status["phase"], waiting.status["reason"]) == ("Queued", "RetryBackoff")
    assert "starts in 30s (restart 2 of 3) and the trainer resumes from its checkpoint at step 6" in \
        waiting.status["message"]
    due = decide(run, failing, pods=pods, now=NOW + timedelta(seconds=31))
    assert verbs(due) == [("delete", "PyTorchJob")]
    assert (due.status["restarts"], due.status["lastRestart"], due.status["exitCode"]) == (2, "job-uid-1", 170)
    assert "TrainerRetry" in [e.reason for e in due.events]
    # while the deletion is under way the same failure is not counted again
    pending = decide(run | {"status": due.status}, failing, pods=pods, now=NOW + timedelta(seconds=32))
    assert verbs(pending) == [("delete", "PyTorchJob")] and pending.status["restarts"] == 2
    # once the old job is gone, a new one
    fresh = decide(run | {"status": due.status}, now=NOW + timedelta(seconds=33))
    assert verbs(fresh) == [("create", "PyTorchJob")]


def test_training_operator_giving_up_counts_as_retryable():
    run = run_case(phase="Running")
    plan = decide(run, job(run, failed("Job x has failed because it has reached the specified backoff limit",
                                       at=ago(600))))
    assert verbs(plan) == [("delete", "PyTorchJob")]


def test_retries_exhausted_fail_the_run_and_free_the_gpus():
    run = run_case(spec_document(**SERVICE), phase="Queued", status={"restarts": 3})
    plan = decide(run, deployment(run, ready=1), job(run, failed(at=ago(3600))), pods=[pod(171)])
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "RetriesExhausted")
    assert "exit code 171 (rollout service unavailable) after 3 restarts (scheduling.backoffLimit 3)" in \
        plan.status["message"]
    assert set(verbs(plan)) == {("patch", "Deployment"), ("delete", "PyTorchJob")}


def test_in_place_restarts_are_counted_once_each_and_capped():
    run = run_case(phase="Running", status={"restarts": 0})
    first = decide(run, job(run, restarting(ago(10))), pods=[pod(143)])
    assert (first.status["phase"], first.status["reason"], first.status["restarts"]) == \
        ("Running", "TrainerRestarting", 1)
    assert first.status["exitCode"] == 143
    assert "after exit code 143 (terminated (SIGTERM)) (restart 1 of 3)" in first.events[0].message
    assert conditions(first.status)["Ready"] == ("False", "TrainerRestarting")
    same = decide(run | {"status": first.status}, job(run, restarting(ago(10))))
    assert same.status["restarts"] == 1 and same.events == []
    over = run_case(phase="Running", status={"restarts": 3, "lastRestart": ago(100)})
    plan = decide(over, job(over, restarting(ago(10))))
    assert (plan.status["phase"], plan.status["reason"], plan.status["restarts"]) == ("Failed", "RetriesExhausted", 4)
    assert verbs(plan) == [("delete", "PyTorchJob")]  # v1.9 would restart it forever


def test_kueue_holds_a_new_trainer_queued_with_its_reason():
    run = run_case(spec_document(**KUEUE), phase="Queued")
    created = decide(run, kueue=True)
    trainer = created.actions[-1].body
    assert trainer["spec"]["runPolicy"]["suspend"] is True
    assert trainer["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-a"
    held = job(run, suspend=True)
    plan = decide(run, held, kueue=True, workload=workload(cond("QuotaReserved", False, "Pending", QUOTA_MESSAGE)))
    assert (plan.status["phase"], plan.status["reason"]) == ("Queued", "QuotaPending")
    assert plan.status["message"] == f"waiting for Kueue (LocalQueue gpu-a): {QUOTA_MESSAGE}"
    unseen = decide(run, held, kueue=True)  # no Workload readable (Kueue off in RBAC, or not created yet)
    assert unseen.status["message"] == "the PyTorchJob is suspended until Kueue admits it from LocalQueue gpu-a"
    assert verbs(plan) == [] and verbs(unseen) == []  # the operator never unsuspends what Kueue holds


def test_kueue_preemption_is_reported_and_nothing_is_reset():
    run = run_case(spec_document(**KUEUE), phase="Running",
                   status={"checkpointStep": 12, "step": 13, "eta": "20m", "estimatedRemainingSeconds": 1200})
    preempted = job(run, cond("Running", False, "PyTorchJobSuspended"), cond("Suspended", True, "PyTorchJobSuspended"),
                    suspend=True)
    plan = decide(run, preempted, kueue=True,
                  workload=workload(cond("Evicted", True, "Preempted", PREEMPT_MESSAGE),
                                    cond("Preempted", True, "InClusterQueue", PREEMPT_MESSAGE)))
    assert (plan.status["phase"], plan.status["reason"]) == ("Preempted", "Preempted")
    assert plan.status["message"] == (f"Kueue preempted the trainer: {PREEMPT_MESSAGE}; the trainer resumes from its "
                                      "checkpoint at step 12 when Kueue admits it again")
    assert verbs(plan) == [] and plan.status["step"] == 13
    assert plan.status["eta"] is None  # no time left is honest while nothing runs
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "Preempted")]
    readmitted = decide(run | {"status": plan.status}, job(run, running()), kueue=True)
    assert readmitted.status["phase"] == "Running"


def rollout_patches(plan) -> list[dict]:
    return [a.body for a in plan.actions if (a.verb, a.kind) == ("patch", "Deployment")]


def test_under_kueue_a_pytorchjob_rollout_runs_only_while_its_trainer_is_admitted():
    """Gang admission with a PyTorchJob: the trainer is created at once (suspended) with no rollout running; the
    rollout scales to one when Kueue unsuspends the trainer and back to zero when Kueue suspends it again or it ends."""
    run = run_case(spec_document(**SERVICE, **KUEUE), phase="Queued")
    first = decide(run, settled=False, kueue=True)
    assert verbs(first) == [("create", kind) for kind in
                            ("ConfigMap", "Deployment", "Service", "NetworkPolicy", "ServiceAccount", "Role",
                             "RoleBinding", "PyTorchJob")]
    rollout = first.actions[1].body
    assert rollout["spec"]["replicas"] == 0 and "kueue.x-k8s.io/queue-name" not in rollout["metadata"]["labels"]
    held = decide(run, deployment(run, replicas=0), job(run, suspend=True), kueue=True)
    assert verbs(held) == [] and held.status["phase"] == "Queued"
    admitted = decide(run, deployment(run, replicas=0), job(run, running()), kueue=True)
    assert rollout_patches(admitted) == [{"spec": {"replicas": 1}}]
    assert (admitted.status["phase"], admitted.status["reason"]) == ("Queued", "WaitingForRollout")
    assert "is admitted; rollout service exp-mmmu-rollout has 0 of 1 replicas ready" in admitted.status["message"]
    serving = decide(run, deployment(run, ready=1), job(run, running()), kueue=True)
    assert verbs(serving) == [] and serving.status["phase"] == "Running"
    running_run = run | {"status": serving.status}
    # a rollout restarting under a running trainer does not make the run Queued again
    assert decide(running_run, deployment(run, ready=0), job(run, running()), kueue=True).status["phase"] == "Running"
    preempted = decide(running_run, deployment(run, ready=1), job(run, cond("Running", False, "PyTorchJobSuspended"),
                                                                  suspend=True), kueue=True)
    assert rollout_patches(preempted) == [{"spec": {"replicas": 0}}]
    assert preempted.status["phase"] == "Preempted"
    done = decide(running_run, deployment(run, ready=1), job(run, succeeded()), kueue=True)
    assert rollout_patches(done) == [{"spec": {"replicas": 0}}] and done.status["phase"] == "Succeeded"


def test_a_trainjob_run_creates_its_runtime_with_the_rollout_and_its_trainer_at_once():
    """Gang admission with a TrainJob: no Deployment to wait for; the run's TrainingRuntime (carrying the rollout job)
    is created before the TrainJob that references it."""
    run = run_case(spec_document(**SERVICE, **KUEUE))
    first = decide(run, settled=False, kueue=True, trainer_apis=frozenset({"trainjob"}))
    assert verbs(first) == [("create", kind) for kind in ("ConfigMap", "Service", "NetworkPolicy", "ServiceAccount",
                                                          "Role", "RoleBinding", "TrainingRuntime", "TrainJob")]
    assert first.actions[-1].body["spec"]["runtimeRef"]["name"] == first.actions[-2].body["metadata"]["name"]
    assert (first.status["phase"], first.status["reason"]) == ("Queued", "TrainerCreated")


def test_a_trainjob_whose_rollout_job_failed_is_retried():
    """A rollout that keeps crashing fails its Job, hence the JobSet and the TrainJob, with no trainer exit code:
    retryable, as the trainer's own ROLLOUT_UNAVAILABLE exit is (a new TrainJob after the backoff)."""
    run = run_case(spec_document(**SERVICE), phase="Running")
    failed = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
              "metadata": {"name": "exp-mmmu-trainer", "namespace": "team-a", "uid": "tj-1"},
              "spec": {"suspend": False},
              "status": {"conditions": [cond("Failed", reason="FailedJobs",
                                             message="jobset failed due to one or more job failures")],
                         "jobsStatus": [{"name": "rollout", "failed": 1, "ready": 0},
                                        {"name": "node", "failed": 0, "ready": 0, "active": 1}]}}
    plan = decide(run, failed, trainer_apis=frozenset({"trainjob"}))
    assert (plan.status["phase"], plan.status["reason"], plan.status["restarts"]) == ("Queued", "Retrying", 1)
    assert [v for v in verbs(plan) if v[1] == "TrainJob"] == [("delete", "TrainJob")]  # a new one follows
    assert any("the rollout service's pod kept failing" in e.message for e in plan.events if e.reason == "TrainerRetry")
    ordinary = failed | {"status": failed["status"] | {"jobsStatus": [{"name": "rollout", "failed": 0},
                                                                      {"name": "node", "failed": 1}]}}
    assert decide(run, ordinary, trainer_apis=frozenset({"trainjob"})).status["phase"] == "Failed"  # no exit code


def test_kueue_off_in_the_operator_ignores_the_queue():
    run = run_case(spec_document(**KUEUE))
    trainer = decide(run, kueue=False).actions[-1].body
    assert trainer["spec"]["runPolicy"]["suspend"] is False
    assert "kueue.x-k8s.io/queue-name" not in trainer["metadata"]["labels"]


@pytest.mark.parametrize("kueue, actions", [
    (False, [("patch", "Deployment", {"spec": {"replicas": 0}}),
             ("patch", "PyTorchJob", {"spec": {"runPolicy": {"suspend": True}}})]),
    # Kueue would unsuspend a suspended job whose Workload is admitted: the job goes instead.
    (True, [("patch", "Deployment", {"spec": {"replicas": 0}}), ("delete", "PyTorchJob", None)]),
])
def test_suspend_stops_the_trainer_and_the_rollout(kueue, actions):
    run = run_case(spec_document(**SERVICE, **KUEUE), phase="Running", suspend=True)
    plan = decide(run, deployment(run, ready=1), job(run, running()), kueue=kueue)
    assert [(a.verb, a.kind, a.body) for a in plan.actions] == actions
    assert (plan.status["phase"], plan.status["reason"]) == ("Suspended", "Suspended")


def test_resume_unsuspends_or_recreates_the_trainer():
    run = run_case(spec_document(**SERVICE), phase="Suspended", suspend=False)
    plan = decide(run, deployment(run, ready=0, replicas=0), job(run, suspend=True))
    assert [(a.verb, a.kind, a.body) for a in plan.actions] == [
        ("patch", "Deployment", {"spec": {"replicas": 1}}),
        ("patch", "PyTorchJob", {"spec": {"runPolicy": {"suspend": False}}})]
    assert plan.status["reason"] == "Resuming"


def test_finished_run_deletes_a_trainer_it_gave_up_on():
    run = run_case(phase="Failed", status={"reason": "RetriesExhausted", "message": "gave up"})
    plan = decide(run, job(run, running()))
    assert verbs(plan) == [("delete", "PyTorchJob")]
    assert (plan.status["phase"], plan.status["message"]) == ("Failed", "gave up")


def test_hand_edited_invalid_run_spec_fails_the_run():
    run = run_case()
    run["spec"]["run"]["rollout"] = {"votes": 2, "groupSize": 4}
    plan = decide(run, settled=False)
    assert (plan.status["phase"], plan.status["reason"]) == ("Failed", "SpecInvalid")
    assert "groupSize (4) > votes (2)" in plan.status["message"] and plan.actions == []


def test_a_run_decision_over_its_own_result_changes_nothing():
    run = run_case(phase="Queued")
    trainer = job(run, running())
    first = decide(run, trainer, progress=Progress(percentage=10.0, step=1))
    again = decide(run | {"status": first.status}, trainer, now=NOW + timedelta(minutes=1),
                   progress=Progress(percentage=10.0, step=1))
    assert again.actions == [] and again.events == [] and again.status == first.status


# --- what the handler reads ----------------------------------------------------------------------------------

def test_the_handler_reads_pods_workloads_and_progress_only_when_they_matter():
    run = run_case(phase="Running")
    assert not wants_pods(job(run, running())) and wants_pods(job(run, failed()))
    assert wants_pods(job(run, restarting(ago(1))))
    assert wants_workload(job(run, suspend=True), True) and not wants_workload(job(run, suspend=True), False)
    assert not wants_workload(job(run, running()), True)
    assert wants_progress(run, job(run, running())) and wants_progress(run, job(run, succeeded()))
    assert not wants_progress(run, job(run)) and not wants_progress(run, None)
    assert not wants_progress(run_case(phase="Succeeded"), job(run, succeeded()))


# --- helpers ---------------------------------------------------------------------------------------------------

def test_retry_delay_doubles_up_to_ten_minutes():
    assert [retry_delay(n) for n in range(7)] == [30, 60, 120, 240, 480, 600, 600]


def test_condition_times_move_only_on_a_flip():
    first = set_conditions([], [Want("Ready", False, "Waiting", "a")], NOW, 1)
    same = set_conditions(first, [Want("Ready", False, "StillWaiting", "b")], NOW + timedelta(hours=1), 2)
    flipped = set_conditions(same, [Want("Ready", True, "Up")], NOW + timedelta(hours=2), 2)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] == "2026-03-01T12:00:00Z"
    assert (same[0]["reason"], same[0]["observedGeneration"]) == ("StillWaiting", 2)
    assert flipped[0]["lastTransitionTime"] == "2026-03-01T14:00:00Z"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (59, "59s"), (60, "1m"), (4800, "1h20m"), (7200, "2h"),
                                           (90000, "1d1h"), (172800, "2d")])
def test_human_duration(seconds, text):
    assert human_duration(seconds) == text


# --- the progress.json contract ------------------------------------------------------------------------------

def test_progress_contract_is_read_field_by_field():
    progress = parse_progress({
        "progressPercentage": 37.5, "estimatedRemainingSeconds": 600, "step": 3.0, "totalSteps": 8,
        "weightVersion": 3, "checkpointStep": 2, "baseAccuracy": 0.41, "accuracy": 0.47,
        "metrics": {"reward/mean": 0.3}, "somethingNew": 1})
    assert progress == Progress(37.5, 600, 3, 8, 3, 2, 0.41, 0.47)


@pytest.mark.parametrize("document, kept, problem", [
    ({"progressPercentage": 130, "step": 5}, {"step": 5}, "progressPercentage: 130 is outside [0.0, 100.0]"),
    ({"accuracy": "0.5", "step": 5}, {"step": 5}, "accuracy: '0.5' is not a number"),
    ({"step": 2.5, "accuracy": 0.5}, {"accuracy": 0.5}, "step: 2.5 is not an integer"),
    ({"step": True}, {}, "step: True is not an integer"),
    ({"estimatedRemainingSeconds": -3}, {}, "estimatedRemainingSeconds: -3 is outside [0, inf]"),
    ({"baseAccuracy": float("nan")}, {}, "baseAccuracy: nan is not a number"),
])
def test_progress_keeps_the_good_keys_and_names_the_bad(document, kept, problem):
    progress = parse_progress(document)
    assert progress.problems == (problem,)
    assert replace(progress, problems=()) == Progress(**kept)


def test_progress_contract_reads_the_evaluation_stage():
    progress = parse_progress({"stage": "evaluating-after", "evalPromptsDone": 120, "evalPromptsTotal": 900.0,
                               "estimatedRemainingSeconds": 75, "step": 52, "totalSteps": 52})
    assert (progress.stage, progress.eval_prompts_done, progress.eval_prompts_total, progress.eval_progress) == \
        ("evaluating-after", 120, 900, 13.3)
    assert parse_progress({"stage": "adapting", "evalPromptsDone": 3, "evalPromptsTotal": 9}).eval_progress is None
    wrong = parse_progress({"stage": "warming-up", "evalPromptsDone": -1, "step": 2})
    assert wrong.problems == ("evalPromptsDone: -1 is outside [0, inf]", "stage: 'warming-up' is not one of "
                              "evaluating-before, adapting, evaluating-after, finished")
    assert (wrong.stage, wrong.step) == (None, 2)


def test_progress_that_is_not_an_object_is_a_problem_not_a_crash():
    assert parse_progress([1, 2]).problems == ("progress.json is a list, not an object",)


def test_read_progress_reads_what_the_store_holds(tmp_path):
    """The seam to the store, for real: skipped until ttrv.store is merged."""
    store = pytest.importorskip("ttrv.store")
    from operators.progress import read_progress

    uri = f"file://{tmp_path}/run"
    assert read_progress(uri) is None
    with store.open_store(uri) as writer:
        writer.put_json("progress.json", {"step": 4, "progressPercentage": 50.0})
    assert parse_progress(read_progress(uri)) == Progress(percentage=50.0, step=4)


# --- Kubeflow Trainer v2: the TrainJob path ----------------------------------------------------------------------

TRAINJOB_SERVED = frozenset({"trainjob"})


def trainjob(run: dict, *conditions: dict, suspend: bool = False, ready: int = 0, uid: str = "tj-uid-1") -> dict:
    """A TrainJob as Kubeflow Trainer reports it: metav1 conditions (Complete, Failed, Suspended) and jobsStatus."""
    name = f"{run['metadata']['name']}-trainer"
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": uid, "labels": {"ttrv.io/run": run["metadata"]["name"]}},
        "spec": {"runtimeRef": {"name": "ttrv-trainer"}, "suspend": suspend},
        "status": {"conditions": [{k: v for k, v in c.items() if k != "lastUpdateTime"} for c in conditions],
                   "jobsStatus": [{"name": "node", "ready": ready, "succeeded": 0, "failed": 0, "active": ready,
                                   "suspended": int(suspend)}]},
    }


def node_pod(exit_code: int, message: str = "", index: str = "0") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"x-node-0-{index}", "labels": {"batch.kubernetes.io/job-completion-index": index}},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "node", "state": {"terminated": {"exitCode": exit_code, "message": message}}}]}}


def decide_tj(run: dict, **observed):
    plan = decide_run(Observed(run, NOW, trainer_apis=observed.pop("served", TRAINJOB_SERVED), **observed))
    validate_object(run | {"status": plan.status})
    return plan


def test_auto_picks_the_served_api_creates_a_trainjob_and_records_it():
    run = run_of(experiment(), "mmmu")
    plan = decide_tj(run)
    [create] = [a for a in plan.actions if a.verb == "create" and a.kind == "TrainJob"]
    validate_object(create.body)
    assert not [a for a in plan.actions if a.kind == "PyTorchJob"]
    assert (plan.status["reason"], plan.status["trainerApi"]) == ("TrainerCreated", "trainjob")
    assert plan.status["message"] == "created TrainJob exp-mmmu-trainer"


def test_a_run_keeps_its_recorded_api_when_both_are_served():
    run = run_of(experiment(), "mmmu", phase="Queued", status={"trainerApi": "pytorchjob"})
    plan = decide_tj(run, served=frozenset({"trainjob", "pytorchjob"}))
    assert [a.kind for a in plan.actions if a.verb == "create"][-1] == "PyTorchJob"
    assert plan.status["trainerApi"] == "pytorchjob"


@pytest.mark.parametrize("requested, served, fix", [
    ("auto", frozenset(), "install Kubeflow Trainer v2"),
    ("trainjob", frozenset({"pytorchjob"}), "or set scheduling.trainerApi: pytorchjob"),
])
def test_no_served_api_creates_nothing_and_says_the_fix(requested, served, fix):
    run = run_of(experiment(spec_document(scheduling={"trainerApi": requested}, **SERVICE)), "mmmu")
    plan = decide_tj(run, served=served)
    assert plan.actions == []
    assert (plan.status["phase"], plan.status["reason"]) == ("Queued", "TrainerAPIMissing")
    assert fix in plan.status["message"] and "restart the ttrv operator" in plan.status["message"]


def test_trainjob_running_complete_and_suspend_patch():
    run = run_of(experiment(), "mmmu", phase="Queued", status={"trainerApi": "trainjob"})
    assert decide_tj(run, children={"TrainJob": trainjob(run)}).status["reason"] == "WaitingForPods"
    assert decide_tj(run, children={"TrainJob": trainjob(run, ready=1)}).status["reason"] == "TrainerRunning"
    done = decide_tj(run, children={"TrainJob": trainjob(run, cond("Complete", reason="AllJobsCompleted"))})
    assert (done.status["phase"], done.status["message"]) == ("Succeeded", "TrainJob exp-mmmu-trainer succeeded")
    suspended = run_of(experiment(), "mmmu", phase="Running", status={"trainerApi": "trainjob"}, suspend=True)
    plan = decide_tj(suspended, children={"TrainJob": trainjob(suspended, ready=1)})
    assert [(a.verb, a.kind, a.body) for a in plan.actions if a.kind == "TrainJob"] == \
        [("patch", "TrainJob", {"spec": {"suspend": True}})]
    assert plan.status["phase"] == "Suspended"


@pytest.mark.parametrize("code, phase, reason", [(3, "Failed", "TrainerFailed"), (170, "Queued", "RetryBackoff")])
def test_a_failed_trainjob_follows_the_exit_code_of_node_zero(code, phase, reason):
    run = run_of(experiment(), "mmmu", phase="Running", status={"trainerApi": "trainjob"})
    job_ = trainjob(run, cond("Failed", reason="FailedJobs", message="jobset failed due to one or more job failures",
                              at=ago(5)))
    pods = [node_pod(137, index="1"), node_pod(code, "why")]  # rank 0's code decides, as the master's does
    plan = decide_tj(run, children={"TrainJob": job_}, pods=pods)
    assert (plan.status["phase"], plan.status["reason"], plan.status["exitCode"]) == (phase, reason, code)


def test_kueue_tells_a_trainjob_preemption_by_the_runs_phase():
    kueue = experiment(spec_document(**KUEUE))
    for previous, expected in (("Queued", "QuotaPending"), ("Running", "Preempted")):
        run = run_of(kueue, "mmmu", phase=previous, status={"trainerApi": "trainjob"})
        plan = decide_tj(run, children={"TrainJob": trainjob(run, suspend=True)}, kueue_enabled=True,
                         workload=workload(cond("Evicted", True, "Preempted", PREEMPT_MESSAGE)))
        assert plan.status["reason"] == expected, previous
        assert not [a for a in plan.actions if a.kind == "TrainJob"]  # Kueue's to unsuspend


@pytest.mark.parametrize("api, framework", [("trainjob", "trainer.kubeflow.org/trainjob"),
                                            ("pytorchjob", "kubeflow.org/pytorchjob")])
def test_no_kueue_workload_for_long_says_which_integration_to_enable(api, framework):
    """Kueue makes a Workload for every job of an integration it enables; a queued trainer with none after two
    minutes is one Kueue does not manage (Kueue v0.19 no longer enables pytorchjob by default)."""
    kueue = experiment(spec_document(**KUEUE))
    run = run_of(kueue, "mmmu", phase="Queued", status={"trainerApi": api})
    for age, reason in ((30, "QuotaPending"), (300, "NoKueueWorkload")):
        child = trainjob(run, suspend=True) if api == "trainjob" else job(run, suspend=True)
        child["metadata"]["creationTimestamp"] = ago(age)
        plan = decide_tj(run, children={child["kind"]: child}, kueue_enabled=True, workload=None,
                         served=frozenset({api}))
        assert plan.status["reason"] == reason, age
    assert f"enable the {framework} integration" in plan.status["message"]
    assert "LocalQueue gpu-a" in plan.status["message"]
    assert ("Kueue v0.19" in plan.status["message"]) == (api == "pytorchjob")


# --- budgets and early stops (issue 19) ------------------------------------------------------------------------

def test_budgets_reach_each_run_from_the_experiment_or_the_dataset():
    """`budget` applies to every dataset's run; a dataset's own `budget` replaces it whole."""
    spec = spec_document(budget={"maxSteps": 20, "gpuHours": 2.5}, maxParallelRuns=2, datasets=[
        {"name": "a", "path": "/data/a.json"}, {"name": "b", "path": "/data/b.json", "budget": {"maxSteps": 5}}])
    runs = {run["spec"]["dataset"]: run["spec"]["run"]["budget"] for run in created(decide_exp(experiment(spec)))}
    assert runs == {"a": {"maxSteps": 20, "gpuHours": 2.5}, "b": {"maxSteps": 5}}  # nulls are left out


@pytest.mark.parametrize("reason, words", [
    ("MaxStepsReached", "its step budget is spent (budget.maxSteps)"),
    ("GpuHoursSpent", "its device-hour budget is spent (budget.gpuHours)"),
    ("EarlyStopped", "the votes stopped changing (grpo.earlyStop)"),
])
def test_a_run_that_stopped_early_succeeds_and_its_status_says_why(reason, words):
    run = run_case(phase="Running", status={"step": 19, "totalSteps": 52})
    adapting = decide(run, job(run, running()), progress=parse_progress({
        "stage": "evaluating-after", "step": 20, "totalSteps": 52, "stopReason": reason, "stepsSaved": 32}))
    assert (adapting.status["phase"], adapting.status["stopReason"], adapting.status["stepsSaved"]) == \
        ("Running", reason, 32)
    done = decide(run | {"status": adapting.status}, job(run, succeeded()), progress=parse_progress({
        "stage": "finished", "step": 20, "totalSteps": 52, "stopReason": reason, "stepsSaved": 32,
        "accuracy": 0.5}))
    status = done.status
    assert (status["phase"], status["reason"], status["stopReason"], status["stepsSaved"]) == \
        ("Succeeded", reason, reason, 32)
    assert status["message"].endswith(f"adapting stopped at step 20, 32 steps saved: {words}")
    assert conditions(status)["Succeeded"] == ("True", reason)
    # The experiment's row carries the message: the reason is not the plain TrainerSucceeded.
    exp = experiment(spec_document())
    row = decide_exp(exp, [run_of(exp, "mmmu", phase="Succeeded", status=status)]).status["datasets"][0]
    assert words in row["message"]


def test_a_run_that_ran_all_its_epochs_says_nothing_about_stopping():
    run = run_case(phase="Running")
    status = decide(run, job(run, succeeded()), progress=parse_progress({"stage": "finished", "step": 52,
                                                                          "totalSteps": 52})).status
    assert (status["reason"], status.get("stopReason"), status.get("stepsSaved")) == ("TrainerSucceeded", None, None)


def test_progress_names_an_unknown_stop_reason_and_keeps_the_rest():
    progress = parse_progress({"step": 3, "stopReason": "Bored", "stepsSaved": -1})
    assert (progress.step, progress.stop_reason, progress.steps_saved) == (3, None, None)
    assert progress.problems == ("stepsSaved: -1 is outside [0, inf]",
                                 "stopReason: 'Bored' is not one of EarlyStopped, MaxStepsReached, GpuHoursSpent, "
                                 "CollapseGuard")


@pytest.mark.parametrize("kueue_enabled", [False, True])
def test_the_shared_rollout_carries_the_queue_label_only_with_kueue_on(kueue_enabled):
    """With Kueue off in the operator (TTRV_KUEUE_ENABLED=false) scheduling.queueName is ignored by the shared
    rollout service as by the runs' children: a queue label would let a Kueue that is installed but not meant to
    be used hold the service's pods back, and every run would wait for it."""
    spec = spec_document(**KUEUE, model={"lora": {"rank": 8}}, rollout={"backend": "service", "shared": True})
    plan = decide_experiment(ExpObserved(experiment(spec), [], NOW, kueue_enabled=kueue_enabled))
    deployment = next(a.body for a in plan.actions if (a.verb, a.kind) == ("create", "Deployment"))
    assert (deployment["metadata"]["labels"].get(QUEUE_LABEL) == "gpu-a") is kueue_enabled
