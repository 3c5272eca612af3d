"""`ttrv experiment run --local` with rollout.shared: both datasets' trainers sample from the experiment's one
rollout service (`ttrv serve --shared`), each from its own LoRA adapter, and the experiment Succeeds."""

from __future__ import annotations

import json

from test_experiment_local import SHAPES, experiment, run_local, statuses
from trainer_util import log_events


def test_two_lora_runs_share_one_rollout_service(tmp_path):
    spec = experiment("tiny", [{"name": "shapes-a", "path": SHAPES, "subsetSize": 8, "subsetSeed": 1},
                               {"name": "shapes-b", "path": SHAPES, "subsetSize": 8, "subsetSeed": 2}],
                      maxParallelRuns=2, model={"lora": {"rank": 4, "alpha": 8}})
    spec["spec"]["rollout"] |= {"backend": "service", "engine": "hf", "shared": True}
    out = tmp_path / "out"
    result = run_local(tmp_path, spec, "-n", "team-a")
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((out / "status.json").read_text())
    assert document["experiment"]["status"]["phase"] == "Succeeded"
    assert {dataset: status["phase"] for dataset, status in statuses(document).items()} == \
        {"shapes-a": "Succeeded", "shapes-b": "Succeeded"}
    # one rollout pod, the experiment's; none of the runs has one of its own
    assert not list(out.glob("tiny-shapes-*/tiny-shapes-*-rollout-*"))
    (log,) = out.glob("tiny-shared-rollout/tiny-shared-rollout-0/log")
    loaded = {(e["run"], e["step"]) for e in log_events(log, "adapter_loaded")}
    assert {run for run, _ in loaded} == {"shapes-a", "shapes-b"}, loaded
    finished = {e["run"] for e in log_events(log, "shared_run_finished")}
    assert finished <= {"shapes-a", "shapes-b"}  # the last run's report may come after the experiment ended
