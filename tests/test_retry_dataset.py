"""Retrying one failed dataset of an experiment, as docs/kubernetes.md ("Retry a failed dataset") tells a user to,
with the real operator under kopf against the API stand-in (kopf_util.py; the tests play the training operator).

The procedure: fix the cause, delete the dataset's AdaptationRun (`kubectl delete adaptationrun <experiment>-<dataset>`;
its trainer and rollout service go with it), and, when the experiment has finished, touch the Experiment
(`kubectl annotate experiment.ttrv.io <experiment> ttrv-retry="$(date +%s)" --overwrite`): a finished experiment is
not polled, so only a change of it makes the operator look again. The annotation's key has no prefix on purpose:
kopf leaves out of the changes it reacts to every annotation under the operator's own prefix, ttrv.io/ and
*.ttrv.io/ (kopf/_cogs/configs/diffbase.py, DiffBaseStorage.build, and conventions.py, _detect_marked_prefixes). It then creates the run anew, as for a dataset
never started; the new trainer resumes from the failed attempt's newest checkpoint in the same store prefix, if it
wrote one (ttrv/loop.py, resume).
"""

from __future__ import annotations

import asyncio

import pytest
from kopf_util import EXPERIMENTS, RUNS, cluster, operator
from operator_fixtures import NS

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


async def test_a_failed_dataset_is_retried_by_deleting_its_run(monkeypatch, tmp_path):
    async with cluster(monkeypatch, tmp_path) as c, operator(c):
        await c.create_experiment(maxParallelRuns=2, datasets=[
            {"name": "bad", "path": "/data/bad.json"}, {"name": "good", "path": "/data/good.json"}])
        for run in ("exp-bad", "exp-good"):
            await c.wait(lambda run=run: c.get(c.jobs, f"{run}-trainer"), f"{run}'s trainer")
            await c.trainer_running(f"{run}-trainer")
        await c.trainer_pod("exp-bad", 3, "data: /data/bad.json: no such file")
        await c.trainer_failed("exp-bad-trainer", 'job "exp-bad-trainer" is failing because "Master" replica(s) failed.')
        await c.trainer_succeeded("exp-good-trainer")
        await c.wait_phase("exp", "PartiallySucceeded", EXPERIMENTS)
        failed_uid = c.get(RUNS, "exp-bad")["metadata"]["uid"]

        # The user fixed the file. kubectl delete adaptationrun exp-bad: the run goes, and its trainer with it.
        await c.api.delete_object(RUNS, NS, "exp-bad")
        await c.wait(lambda: c.get(c.jobs, "exp-bad-trainer") is None, "the failed trainer's garbage collection")
        await asyncio.sleep(1.0)  # two polls: the finished experiment is not looked at by itself
        assert c.get(RUNS, "exp-bad") is None

        # kubectl annotate experiment.ttrv.io exp ttrv-retry=1 --overwrite
        await c.api.patch_object(EXPERIMENTS, NS, "exp", {"metadata": {"annotations": {"ttrv-retry": "1"}}})
        await c.wait(lambda: (c.get(RUNS, "exp-bad") or {}).get("metadata", {}).get("uid") not in (None, failed_uid),
                     "a new run for the retried dataset")
        assert c.status(EXPERIMENTS, "exp")["phase"] in ("Pending", "Running")
        await c.wait(lambda: c.get(c.jobs, "exp-bad-trainer"), "the new trainer")
        await c.trainer_running("exp-bad-trainer")
        await c.trainer_succeeded("exp-bad-trainer")
        await c.wait_phase("exp-bad", "Succeeded")
        await c.wait_phase("exp", "Succeeded", EXPERIMENTS)
        assert c.get(RUNS, "exp-good")["status"]["phase"] == "Succeeded"  # the other dataset was left alone
