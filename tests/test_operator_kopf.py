"""The operator's kopf handlers end to end, against an API stand-in (kube_standin.py: kmock plus uids, generations,
the status subresource, CRD schema validation with 422s, label selectors and cascading deletion).

kopf runs in the test's event loop with the real operator module: discovery, watches, handlers, status patches,
events, finalizers. Nothing else runs in this "cluster": the tests play the training operator (PyTorchJob
conditions, trainer pods with exit codes), the kubelet (a rollout Deployment's readyReplicas) and Kueue (Workloads
and the PyTorchJob's runPolicy.suspend) by writing those objects as those controllers would. The object store is
replaced at the operator's one seam to it, `read_progress(store_uri, endpoint)`, by a dict of progress.json
documents (in the memo the tests start kopf with); the store's own tests cover what is behind that seam.

What a real cluster would do differently is listed in kube_standin.py's docstring; the one that matters most
here: Kueue's webhook would suspend a labelled job on create (the operator creates it suspended itself, so the
tests cannot tell the difference), and the garbage collector and the training operator run asynchronously,
seconds apart, not within one request.
"""

from __future__ import annotations

import asyncio
import urllib.request
from datetime import datetime, timedelta, timezone

import kmock
import pytest
from kopf_util import (
    DEPLOYMENTS,
    EXPERIMENTS,
    JOBS,
    RUNS,
    WORKLOADS,
    cluster,
    condition,
    operator,
)
from operator_fixtures import NS, PREEMPT_MESSAGE, QUOTA_MESSAGE

from operators.experiments import ACCEPTED_ANNOTATION

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


# The stand-in serves one training API, as a cluster with only Kubeflow Trainer v2 or only the v1 training operator
# installed: the operator finds it by discovery (scheduling.trainerApi is auto) and runs every trainer with it.
APIS = pytest.mark.parametrize("trainer_api", ["trainjob", "pytorchjob"])


@APIS
async def test_datasets_run_one_after_another_and_the_experiment_succeeds(monkeypatch, tmp_path, trainer_api):
    async with cluster(monkeypatch, tmp_path, trainer_api=trainer_api) as c, operator(c) as memo:
        await c.create_experiment(maxParallelRuns=1)
        await c.wait_phase("exp-mmmu", "Queued")
        # A reconcile writes the run's status before its actions: the job follows the phase, not before it.
        await c.wait(lambda: c.get(c.jobs, "exp-mmmu-trainer"), "the trainer job")
        assert c.status(RUNS, "exp-mmmu")["trainerApi"] == trainer_api
        assert c.get(RUNS, "exp-shapes") is None  # waits for the slot
        store = "s3://ttrv/experiments/team-a/exp/mmmu"
        c.progress[store] = {"progressPercentage": 40.0, "estimatedRemainingSeconds": 4800, "step": 4,
                             "totalSteps": 10, "weightVersion": 4, "checkpointStep": 4, "baseAccuracy": 0.25,
                             "accuracy": 0.4, "metrics": {"reward/mean": 0.3}}
        await c.trainer_running("exp-mmmu-trainer")
        await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("step") == 4, "progress of exp-mmmu")
        run = c.status(RUNS, "exp-mmmu")
        assert (run["phase"], run["progress"], run["eta"], run["weightVersion"], run["accuracy"]) == \
            ("Running", 40.0, "1h20m", 4, 0.4)
        await c.wait(lambda: c.status(EXPERIMENTS, "exp").get("datasets", [{}])[0].get("step") == 4,
                     "the experiment's table to show the progress")
        assert c.phase("exp", EXPERIMENTS) == "Running"

        c.progress[store] |= {"progressPercentage": 100.0, "step": 10, "accuracy": 0.55}
        await c.trainer_succeeded("exp-mmmu-trainer")
        await c.wait_phase("exp-mmmu", "Succeeded")
        await c.wait(lambda: c.get(c.jobs, "exp-shapes-trainer"), "the second dataset's trainer")
        await c.trainer_running("exp-shapes-trainer")
        await c.trainer_succeeded("exp-shapes-trainer")
        await c.wait_phase("exp", "Succeeded", EXPERIMENTS)

        status = c.status(EXPERIMENTS, "exp")
        assert [(d["name"], d["phase"], d.get("accuracy")) for d in status["datasets"]] == \
            [("mmmu", "Succeeded", 0.55), ("shapes", "Succeeded", None)]
        assert (status["datasetsDone"], status["datasetsTotal"], status["progress"]) == (2, 2, 100.0)
        assert {c_["type"]: c_["status"] for c_ in status["conditions"]} == {
            "Ready": "True", "Running": "False", "Succeeded": "True", "Failed": "False", "SpecChangeRejected": "False"}
        reasons = await c.wait(lambda: (found := [r for _, r, _ in c.events("exp")]) and
                               "ExperimentSucceeded" in found and found, "the experiment's events")
        assert reasons.count("RunCreated") == 2 and reasons.count("DatasetSucceeded") == 2
        run_events = [r for _, r, _ in c.events("exp-mmmu")]  # WaitingForPods may come between, or not
        assert [r for r in run_events if r != "WaitingForPods"] == \
            ["Created", "TrainerCreated", "TrainerRunning", "TrainerSucceeded"]
        # kopf's bookkeeping lives in annotations: status holds only what the CRD's schema allows
        assert "kopf" not in c.status(EXPERIMENTS, "exp")
        assert ACCEPTED_ANNOTATION in c.get(EXPERIMENTS, "exp")["metadata"]["annotations"]

        port = memo.metrics_server.server_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'ttrv_operator_reconciles_total{kind="AdaptationRun",result="ok"}' in text
        assert 'ttrv_operator_reconcile_duration_seconds_count{kind="Experiment"}' in text
        await c.wait(lambda: 'ttrv_operator_resources{kind="AdaptationRun",phase="Succeeded"} 2.0' in
                     urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode(),
                     "the runs-by-phase gauge")


@APIS
async def test_failures_fail_only_their_dataset(monkeypatch, tmp_path, trainer_api):
    async with cluster(monkeypatch, tmp_path, trainer_api=trainer_api) as c, operator(c):
        await c.create_experiment(maxParallelRuns=3, datasets=[
            {"name": name, "path": f"/data/{name}.json"} for name in ("bad", "flaky", "store")])
        for run in ("exp-bad", "exp-flaky", "exp-store"):
            await c.wait(lambda run=run: c.get(c.jobs, f"{run}-trainer"), f"{run}'s trainer")
            await c.trainer_running(f"{run}-trainer")

        # permanent: exit code 3, with the trainer's termination message
        await c.trainer_pod("exp-bad", 3, "data: /data/bad.json: no such file")
        await c.trainer_failed("exp-bad-trainer", 'job "exp-bad-trainer" is failing because "Master" replica(s) failed.')
        await c.wait_phase("exp-bad", "Failed")
        assert c.status(RUNS, "exp-bad")["message"] == \
            "trainer failed with exit code 3 (bad data): data: /data/bad.json: no such file"
        assert "exit code 3 (bad data)" in await c.wait_event("exp-bad", "Warning", "TrainerFailed")

        # retryable, restarted in place by the training operator: counted. (Only PyTorchJobs restart in place: a
        # TrainJob's runtime fails its Job on the first non-zero exit, the path of exp-store below.)
        if trainer_api == "pytorchjob":
            await c.job_conditions("exp-flaky-trainer", condition("Restarting", reason="PyTorchJobRestarting"))
            await c.wait(lambda: c.status(RUNS, "exp-flaky").get("restarts") == 1, "the restart to be counted")
            await c.job_conditions("exp-flaky-trainer", condition("Running"), condition("Succeeded"))
        else:
            await c.trainer_succeeded("exp-flaky-trainer")

        # retryable, the job itself failed a while ago: the operator starts a new one
        old_uid = c.get(c.jobs, "exp-store-trainer")["metadata"]["uid"]
        await c.trainer_pod("exp-store", 170, "s3 endpoint unreachable")
        long_ago = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
        await c.trainer_failed("exp-store-trainer", "Job exp-store-trainer has failed because it has reached "
                               "the specified backoff limit", at=long_ago)
        await c.wait(lambda: (c.get(c.jobs, "exp-store-trainer") or {}).get("metadata", {}).get("uid", old_uid)
                     != old_uid, "a new trainer for exp-store")
        assert (c.status(RUNS, "exp-store")["restarts"], c.status(RUNS, "exp-store")["exitCode"]) == (1, 170)
        await c.trainer_running("exp-store-trainer")
        await c.trainer_succeeded("exp-store-trainer")

        await c.wait_phase("exp", "PartiallySucceeded", EXPERIMENTS)
        status = c.status(EXPERIMENTS, "exp")
        flaky_restarts = 1 if trainer_api == "pytorchjob" else 0
        assert [(d["name"], d["phase"], d["restarts"]) for d in status["datasets"]] == \
            [("bad", "Failed", 0), ("flaky", "Succeeded", flaky_restarts), ("store", "Succeeded", 1)]
        assert (status["datasetsFailed"], status["datasetsDone"]) == (1, 3)
        failed = next(x for x in status["conditions"] if x["type"] == "Failed")
        assert failed["status"] == "True" and "bad: trainer failed with exit code 3" in failed["message"]
        assert "dataset bad failed" in await c.wait_event("exp", "Warning", "DatasetFailed")
        assert await c.wait_event("exp", "Warning", "ExperimentPartiallySucceeded") == "2 of 3 datasets succeeded"


@APIS
async def test_kueue_queues_admits_and_preempts(monkeypatch, tmp_path, trainer_api):
    async with cluster(monkeypatch, tmp_path, kueue=True, trainer_api=trainer_api) as c, operator(c):
        await c.create_experiment(scheduling={"queueName": "gpu-a"},
                                  datasets=[{"name": "mmmu", "path": "/data/mmmu.json"}])
        job = await c.wait(lambda: c.get(c.jobs, "exp-mmmu-trainer"), "the trainer")
        assert c.suspended("exp-mmmu-trainer") is True  # Kueue admits it by unsuspending it
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-a"

        # Kueue: a Workload owned by the job, not admitted for lack of quota
        uid = job["metadata"]["uid"]
        workload = f"{trainer_api}-exp-mmmu-trainer-1a2b3"
        await c.api.put_object(WORKLOADS, {
            "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload", "metadata": {
                "name": workload, "namespace": NS, "labels": {"kueue.x-k8s.io/job-uid": uid},
                "ownerReferences": [{"apiVersion": job["apiVersion"], "kind": job["kind"], "name": "exp-mmmu-trainer",
                                     "uid": uid, "controller": True}]},
            "spec": {"queueName": "gpu-a"}})
        await c.api.patch_object(WORKLOADS, NS, workload, {"status": {"conditions": [
            condition("QuotaReserved", False, "Pending", QUOTA_MESSAGE)]}}, subresource="status")
        await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("message") ==
                     f"waiting for Kueue (LocalQueue gpu-a): {QUOTA_MESSAGE}", "Kueue's reason, read at the next poll")
        assert (c.phase("exp-mmmu"), c.status(RUNS, "exp-mmmu")["reason"]) == ("Queued", "QuotaPending")

        # admitted and running
        c.progress["s3://ttrv/experiments/team-a/exp/mmmu"] = {"step": 7, "checkpointStep": 6, "progressPercentage": 35.0}
        await c.kueue_suspend("exp-mmmu-trainer", False)
        await c.trainer_running("exp-mmmu-trainer")
        await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("step") == 7, "the run to report step 7")
        await c.wait_phase("exp-mmmu", "Running")

        # preempted: Kueue evicts the Workload and suspends the job; the training operator stops the pods
        await c.api.patch_object(WORKLOADS, NS, workload, {"status": {"conditions": [
            condition("QuotaReserved", False, "Pending", PREEMPT_MESSAGE),
            condition("Evicted", True, "Preempted", PREEMPT_MESSAGE),
            condition("Preempted", True, "InClusterQueue", PREEMPT_MESSAGE)]}}, subresource="status")
        await c.kueue_suspend("exp-mmmu-trainer", True)
        await c.wait_phase("exp-mmmu", "Preempted")
        assert c.status(RUNS, "exp-mmmu")["message"] == (
            f"Kueue preempted the trainer: {PREEMPT_MESSAGE}; the trainer resumes from its checkpoint at step 6 "
            "when Kueue admits it again")
        # nothing reset: same job, same spec, the checkpoint left to the trainer
        assert c.get(c.jobs, "exp-mmmu-trainer")["metadata"]["uid"] == uid
        assert c.suspended("exp-mmmu-trainer") is True
        assert c.status(RUNS, "exp-mmmu")["step"] == 7
        assert PREEMPT_MESSAGE in await c.wait_event("exp-mmmu", "Warning", "Preempted")

        # re-admitted
        await c.kueue_suspend("exp-mmmu-trainer", False)
        if trainer_api == "pytorchjob":
            await c.job_conditions("exp-mmmu-trainer", condition("Suspended", False, "PyTorchJobResumed"),
                                   condition("Running"))
        else:
            await c.trainer_running("exp-mmmu-trainer")
        await c.wait_phase("exp-mmmu", "Running")


async def test_suspend_stops_every_child_and_resume_restarts_them(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        await c.create_experiment(rollout={"backend": "service"}, datasets=[{"name": "mmmu", "path": "/data/m.json"}])
        await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("reason") == "WaitingForRollout", "the rollout wait")
        assert c.get(JOBS, "exp-mmmu-trainer") is None  # the trainer waits for the rollout service
        await c.rollout_ready("exp-mmmu")
        await c.wait(lambda: c.get(JOBS, "exp-mmmu-trainer"), "the trainer once the rollout is ready")
        await c.job_conditions("exp-mmmu-trainer", condition("Running"))
        await c.wait_phase("exp-mmmu", "Running")

        await c.edit_experiment({"suspend": True})
        await c.wait_phase("exp", "Suspended", EXPERIMENTS)
        await c.wait_phase("exp-mmmu", "Suspended")
        await c.wait(lambda: c.get(DEPLOYMENTS, "exp-mmmu-rollout")["spec"]["replicas"] == 0, "the rollout at zero")
        # The operator writes the Deployment and then the PyTorchJob, two requests: wait for the second too.
        await c.wait(lambda: c.get(JOBS, "exp-mmmu-trainer")["spec"]["runPolicy"]["suspend"] is True, "the suspend")
        assert c.get(RUNS, "exp-mmmu")["spec"]["suspend"] is True

        await c.edit_experiment({"suspend": False})
        await c.wait(lambda: c.get(JOBS, "exp-mmmu-trainer")["spec"]["runPolicy"]["suspend"] is False, "the resume")
        assert c.get(DEPLOYMENTS, "exp-mmmu-rollout")["spec"]["replicas"] == 1
        await c.job_conditions("exp-mmmu-trainer", condition("Suspended", False), condition("Running"))
        await c.wait_phase("exp-mmmu", "Running")
        await c.wait_phase("exp", "Running", EXPERIMENTS)


async def test_a_disallowed_spec_change_is_rejected_and_nothing_half_applied(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        await c.create_experiment(maxParallelRuns=1)
        await c.wait_phase("exp-mmmu", "Queued")
        accepted = c.get(EXPERIMENTS, "exp")["metadata"]["annotations"][ACCEPTED_ANNOTATION]

        datasets = [{"name": "mmmu", "path": "/data/mmmu.json"}, {"name": "shapes", "path": "/data/elsewhere.json"}]
        # The CRD's transition rule refuses the change at the API (tests/test_cel_rules.py); an API server that
        # ignores the CRD's rules lets it through, and the operator still applies none of it:
        with pytest.raises(kmock.KubernetesError, match="datasets cannot change while the experiment exists"):
            await c.edit_experiment({"maxParallelRuns": 2, "datasets": datasets})
        c.api.cel = False
        await c.edit_experiment({"maxParallelRuns": 2, "datasets": datasets})

        def rejected():
            status = c.status(EXPERIMENTS, "exp")
            found = [x for x in status.get("conditions", []) if x["type"] == "SpecChangeRejected"]
            return found and found[0]["status"] == "True" and status.get("observedGeneration") == 2 and found[0]

        condition_ = await c.wait(rejected, "SpecChangeRejected")
        assert condition_["message"].startswith("datasets[1].path cannot change while the experiment exists")
        assert c.get(EXPERIMENTS, "exp")["metadata"]["annotations"][ACCEPTED_ANNOTATION] == accepted
        await asyncio.sleep(0.6)  # a poll later: still no second run, though maxParallelRuns says 2
        assert c.get(RUNS, "exp-shapes") is None
        assert "datasets[1].path" in await c.wait_event("exp", "Warning", "SpecChangeRejected")

        datasets[1]["path"] = "/data/shapes.json"  # back to the accepted datasets, keeping maxParallelRuns 2
        await c.edit_experiment({"datasets": datasets})
        await c.wait(lambda: c.get(RUNS, "exp-shapes"), "the second run, now that the change is allowed")
        status = c.status(EXPERIMENTS, "exp")
        assert next(x for x in status["conditions"] if x["type"] == "SpecChangeRejected")["status"] == "False"


async def test_an_operator_restart_loses_nothing_and_duplicates_nothing(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c:
        async with operator(c):
            await c.create_experiment(rollout={"backend": "service"}, maxParallelRuns=2)
            for run in ("exp-mmmu", "exp-shapes"):
                # The status is written before the children are created (reconcile.apply): wait for the Deployment too.
                await c.wait(lambda run=run: c.status(RUNS, run).get("reason") == "WaitingForRollout" and
                             c.get(DEPLOYMENTS, f"{run}-rollout"), run)
            await c.rollout_ready("exp-mmmu")
            await c.wait(lambda: c.get(JOBS, "exp-mmmu-trainer"), "the first trainer")
            await c.job_conditions("exp-mmmu-trainer", condition("Restarting", reason="PyTorchJobRestarting"))
            await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("restarts") == 1, "a counted restart")
        before = c.children()

        # While the operator is away: the second rollout becomes ready, the first trainer runs again.
        await c.rollout_ready("exp-shapes")
        await c.job_conditions("exp-mmmu-trainer", condition("Running"))

        async with operator(c):
            await c.wait(lambda: c.get(JOBS, "exp-shapes-trainer"), "the second trainer")
            await c.wait_phase("exp-mmmu", "Running")
            await c.job_conditions("exp-shapes-trainer", condition("Running"))
            await c.wait_phase("exp-shapes", "Running")
            await c.wait(lambda: c.status(EXPERIMENTS, "exp").get("datasetsRunning") == 2, "the table")
        after = c.children()
        # everything that existed is the same object; the only new one is what was missing
        assert {k: v for k, v in after.items() if k in before} == before
        assert set(after) - set(before) == {f"{JOBS}/exp-shapes-trainer"}
        assert c.status(RUNS, "exp-mmmu")["restarts"] == 1  # counted once, across the restart


async def test_deleting_the_experiment_deletes_everything_it_made(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        await c.create_experiment(rollout={"backend": "service"}, maxParallelRuns=2)
        await c.wait(lambda: len(c.children()) == 2 + 2 * 4, "two runs and their children")
        assert c.get(EXPERIMENTS, "exp")["metadata"]["finalizers"] == ["ttrv.io/operator"]
        await c.api.delete_object(EXPERIMENTS, NS, "exp")
        await c.wait(lambda: c.get(EXPERIMENTS, "exp") is None and not c.children(), "the cascade")


async def test_a_run_name_another_experiment_holds_fails_only_that_dataset(monkeypatch, tmp_path):
    """`exp-a` with dataset `b` and `exp` with dataset `a-b` both name their run `exp-a-b`: the later one's
    dataset fails with the fix (its create would be refused forever), its other dataset runs, and the run of
    `exp-a` is left alone. The operator finds the holder with a set-based label selector on the run name."""
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        await c.create_experiment("exp-a", datasets=[{"name": "b", "path": "/data/b.json"}])
        await c.wait(lambda: c.get(RUNS, "exp-a-b"), "exp-a's run")
        await c.create_experiment(maxParallelRuns=2, datasets=[{"name": "a-b", "path": "/data/ab.json"},
                                                               {"name": "c", "path": "/data/c.json"}])
        await c.wait(lambda: c.get(RUNS, "exp-c"), "exp's other run")
        rows = await c.wait(lambda: (rows := c.status(EXPERIMENTS, "exp").get("datasets")) and
                            rows[0]["phase"] == "Failed" and rows, "the clash in exp's status")
        assert "RunNameConflict" in rows[0]["message"] and "experiment exp-a" in rows[0]["message"]
        assert "rename" in await c.wait_event("exp", "Warning", "DatasetFailed")
        assert c.get(RUNS, "exp-a-b")["spec"]["experiment"] == "exp-a"


async def test_a_spec_that_cannot_run_fails_the_experiment(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        # The CRD's CEL rule refuses it at the API (tests/test_cel_rules.py); past an API server without the rules:
        with pytest.raises(kmock.KubernetesError, match=r"groupSize \(8\) > votes \(4\)"):
            await c.create_experiment(rollout={"votes": 4, "groupSize": 8})
        c.api.cel = False
        await c.create_experiment(rollout={"votes": 4, "groupSize": 8})
        await c.wait_phase("exp", "Failed", EXPERIMENTS)
        assert "groupSize (8) > votes (4)" in c.status(EXPERIMENTS, "exp")["message"]
        assert c.api.items(RUNS, NS) == []


@pytest.mark.parametrize("served, requested, fix", [
    ("pytorchjob", "trainjob", "install it and restart the ttrv operator, or set scheduling.trainerApi: pytorchjob"),
    ("trainjob", "pytorchjob", "install it and restart the ttrv operator, or set scheduling.trainerApi: trainjob"),
])
async def test_a_training_api_the_cluster_lacks_is_a_condition_with_the_fix(monkeypatch, tmp_path, served, requested,
                                                                           fix):
    async with cluster(monkeypatch, tmp_path, trainer_api=served) as c, operator(c):
        await c.create_experiment(scheduling={"trainerApi": requested}, rollout={"backend": "service"},
                                  datasets=[{"name": "mmmu", "path": "/data/mmmu.json"}])
        await c.wait(lambda: c.status(RUNS, "exp-mmmu").get("reason") == "TrainerAPIMissing", "TrainerAPIMissing")
        status = c.status(RUNS, "exp-mmmu")
        assert status["phase"] == "Queued" and fix in status["message"]
        assert "trainerApi" not in status
        ready = next(x for x in status["conditions"] if x["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "TrainerAPIMissing")
        await asyncio.sleep(1.0)  # two polls: still nothing created, no GPUs held for a trainer that cannot exist
        assert c.get(c.jobs, "exp-mmmu-trainer") is None and c.get(DEPLOYMENTS, "exp-mmmu-rollout") is None
        assert c.status(RUNS, "exp-mmmu")["reason"] == "TrainerAPIMissing"


@pytest.mark.parametrize("served, requested, expected", [
    ("trainjob", "auto", ("trainjob", None)),
    ("pytorchjob", "auto", ("pytorchjob", None)),
    ("trainjob", "pytorchjob", (None, "pytorchjob")),
])
async def test_the_operator_discovers_the_training_apis_at_start_and_logs_its_choice(monkeypatch, tmp_path, served,
                                                                                     requested, expected):
    import io
    import json

    import kopf

    from operators.kube import Kube
    from operators.ttrv_operator import discover_trainer_apis
    from ttrv import log

    async with cluster(monkeypatch, tmp_path, trainer_api=served):
        monkeypatch.setenv("TTRV_TRAINER_API", requested)
        stream = io.StringIO()
        log.configure(stream=stream)
        kube = Kube.from_environment()
        try:  # the client is synchronous and the stand-in serves from this event loop
            apis, auto, runtime = await asyncio.to_thread(discover_trainer_apis, kube)
            assert apis == frozenset({served})
            assert auto == (None if requested == "auto" else requested)
            assert (runtime.kind, runtime.name) == ("ClusterTrainingRuntime", "ttrv-trainer")
            [line] = [json.loads(text[text.index("{"):]) for text in stream.getvalue().splitlines()
                      if "trainer_apis_discovered" in text]
            assert (line["served"], line["auto_choice"]) == ([served], expected[0])
            assert line["level"] == ("info" if expected[0] else "warning")
            monkeypatch.setenv("TTRV_TRAINER_API", "pytorchjobs")
            with pytest.raises(kopf.PermanentError, match="TTRV_TRAINER_API: 'pytorchjobs'.*trainer.api"):
                await asyncio.to_thread(discover_trainer_apis, kube)
        finally:
            kube.close()
