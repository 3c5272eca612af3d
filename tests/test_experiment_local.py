"""`ttrv experiment run --local`: an experiment's rendered objects executed on this machine (operators/local/).

End to end on the bundled tiny benchmark and model: the same dataset twice under two subset seeds stands for two
datasets. Each run's trainer is `ttrv train` as the PyTorchJob runs it, with the training operator's env."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from operators import reconcile
from operators.conditions import parse_time
from operators.local import controller, pods
from operators.local.cluster import LocalCluster
from ttrv.manifests import ROLLOUT_PORT, adaptation_run, run_children
from ttrv.objectserver import EmbeddedS3
from ttrv.spec import ExperimentSpec

TINY = {
    "rollout": {"votes": 4, "groupSize": 2, "maxNewTokens": 3},
    "grpo": {"lr": 1e-3, "epochs": 1, "promptsPerStep": 4, "microBatchSize": 16},
    "eval": {"limit": 8, "majVotes": 4},
    "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"},
}
SHAPES = "ttrv://tiny-shapes/test"


def experiment(name: str, datasets: list[dict], **spec) -> dict:
    return {"apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name},
            "spec": TINY | {"datasets": datasets} | spec}


def statuses(document: dict) -> dict[str, dict]:
    return {run["spec"]["dataset"]: run["status"] for run in document["runs"]}


def run_local(folder: Path, spec: dict, *args: str) -> subprocess.CompletedProcess:
    """`ttrv experiment run folder/experiment.yaml --local --out folder/out`, as a user types it, with a bare
    environment (PYTHONPATH kept, so a worktree tests its own code)."""
    (folder / "experiment.yaml").write_text(yaml.safe_dump(spec))
    env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run([sys.executable, "-m", "ttrv.cli", "experiment", "run", str(folder / "experiment.yaml"),
                           "--local", "--out", str(folder / "out"), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_two_datasets_run_one_after_the_other_with_the_rollout_service(tmp_path):
    """The chart's full path, one run at a time: ConfigMap, rollout Deployment (`ttrv serve`), Service and
    PyTorchJob (a Master and a Worker node) of each dataset executed locally, scheduled by the operator's own
    decisions."""
    spec = experiment("tiny", [{"name": "shapes-a", "path": SHAPES, "subsetSize": 8, "subsetSeed": 1},
                               {"name": "shapes-b", "path": SHAPES, "subsetSize": 8, "subsetSeed": 2}],
                      maxParallelRuns=1)
    spec["spec"]["rollout"] |= {"backend": "service", "engine": "hf"}
    spec["spec"]["resources"] |= {"nodes": 2}  # the Worker replica is a second local node
    out = tmp_path / "out"
    result = run_local(tmp_path, spec, "-n", "team-a")
    assert result.returncode == 0, result.stderr[-4000:]

    assert "tiny   Succeeded" in result.stdout  # the `kubectl get experiments` line
    document = json.loads((out / "status.json").read_text())
    overall = document["experiment"]["status"]
    assert (overall["phase"], overall["datasetsDone"], overall["datasetsFailed"]) == ("Succeeded", 2, 0)
    runs = statuses(document)
    for dataset, status in runs.items():
        assert status["phase"] == "Succeeded", status
        assert status["baseAccuracy"] is not None and status["accuracy"] is not None
        assert status["storeUri"] == f"s3://ttrv/team-a/tiny/{dataset}"  # run_store_uri on the embedded server
        assert f"tiny-{dataset}   {dataset}   Succeeded" in result.stdout
    assert [row["baseAccuracy"] for row in overall["datasets"]] == [runs["shapes-a"]["baseAccuracy"],
                                                                   runs["shapes-b"]["baseAccuracy"]]
    # maxParallelRuns 1: the second run's trainer started only once the first had finished.
    assert parse_time(runs["shapes-b"]["startTime"]) >= parse_time(runs["shapes-a"]["completionTime"])

    run_folder = out / "tiny-shapes-a"
    mounted = yaml.safe_load((run_folder / "tiny-shapes-a-spec" / "run.yaml").read_text())
    assert mounted["storage"]["uri"] == "s3://ttrv/team-a/tiny/shapes-a"
    serve_log = (run_folder / "tiny-shapes-a-rollout-0" / "log").read_text().splitlines()
    loaded = [json.loads(line)["step"] for line in serve_log if '"weights_loaded"' in line]
    assert loaded == list(range(1, runs["shapes-a"]["totalSteps"] + 1))  # every version, through the Service
    assert any('"serve_stopping"' in line for line in serve_log)  # scaled to zero once the run succeeded
    for node in ("master", "worker"):
        learner = next(json.loads(line) for line in (run_folder / f"tiny-shapes-a-trainer-{node}-0" / "log").open()
                       if '"learner_ready"' in line)
        assert learner["world"] == 2


def test_one_failed_dataset_does_not_stop_the_other_and_a_preempted_trainer_resumes(tmp_path, monkeypatch):
    """Two runs at once: one whose data does not exist (a permanent exit), one whose trainer gets SIGTERM as a
    node drain would send it (exit 143: restarted in place, resumed). No credential lands in any file."""
    servers = []

    class RecordedS3(EmbeddedS3):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(controller, "EmbeddedS3", RecordedS3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    document = experiment("mixed", [{"name": "missing", "path": str(tmp_path / "absent.json")},
                                    {"name": "shapes", "path": SHAPES, "subsetSize": 8, "subsetSeed": 3}],
                          maxParallelRuns=2)
    spec = ExperimentSpec.model_validate(document["spec"])
    out = tmp_path / "out"
    finished: list[dict] = []
    driver = threading.Thread(target=lambda: finished.append(
        controller.run_experiment({"name": "mixed"}, spec, out, poll_seconds=0.5)))
    driver.start()
    os.kill(trainer_pid(out / "mixed-shapes" / "mixed-shapes-spec" / "run.yaml"), signal.SIGTERM)
    driver.join(timeout=600)
    assert finished, "the local experiment did not finish"

    overall = finished[0]["experiment"]["status"]
    assert (overall["phase"], overall["datasetsFailed"]) == ("PartiallySucceeded", 1)
    runs = statuses(finished[0])
    assert (runs["missing"]["phase"], runs["missing"]["reason"], runs["missing"]["exitCode"]) == \
        ("Failed", "TrainerFailed", 3)
    assert "exit code 3 (bad data)" in runs["missing"]["message"]
    assert f"{tmp_path / 'absent.json'}: no such data file" in runs["missing"]["message"]
    assert runs["shapes"]["phase"] == "Succeeded", runs["shapes"]
    assert (runs["shapes"]["restarts"], runs["shapes"]["exitCode"]) == (1, 143)
    assert runs["shapes"]["accuracy"] is not None
    assert json.loads((out / "status.json").read_text()) == finished[0]

    (server,) = servers
    secrets = [server.access_key.encode(), server.secret_key.encode()]
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) > 20  # status, the ConfigMaps, pod logs and reports, the store's objects
    leaked = [str(path) for path in files if any(secret in path.read_bytes() for secret in secrets)]
    assert leaked == []


def trainer_pid(spec_path: Path, timeout: float = 300) -> int:
    """The pid of the trainer pod's main process (`ttrv train --spec <its mounted run.yaml>`), once it runs."""
    wanted = ["ttrv.cli", "train", "--spec", str(spec_path)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().decode().split("\0")
            except (OSError, ValueError):
                continue
            if all(part in argv for part in wanted):
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no trainer for {spec_path} within {timeout} s")


def test_each_restart_of_a_failing_trainer_counts_until_the_backoff_limit(tmp_path, monkeypatch):
    """A trainer that exits 143 at once, every time: the training operator's in-place restarts, each counted by
    decide_run, until the run fails past scheduling.backoffLimit and the experiment with it."""
    def always_preempted(run, kueue_enabled, *_):  # desired_children(run, kueue, api, runtime)
        children = run_children(run)
        job = next(child for child in children if child["kind"] == "PyTorchJob")
        container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        container["command"] = ["/bin/sh", "-c", "exit 143"]
        return children

    monkeypatch.setattr(reconcile, "desired_children", always_preempted)
    spec = ExperimentSpec.model_validate(experiment("flaky", [{"name": "shapes", "path": SHAPES}],
                                                    scheduling={"backoffLimit": 2})["spec"])
    document = controller.run_experiment({"name": "flaky"}, spec, tmp_path / "out", poll_seconds=0.2)

    assert document["experiment"]["status"]["phase"] == "Failed"
    (run,) = document["runs"]
    status = run["status"]
    assert (status["phase"], status["reason"], status["restarts"], status["exitCode"]) == \
        ("Failed", "RetriesExhausted", 3, 143)
    assert "more than scheduling.backoffLimit 2" in status["message"]
    log = (tmp_path / "out" / "flaky-shapes" / "flaky-shapes-trainer-master-0" / "log")
    assert log.exists()


def test_pods_get_the_training_operators_env_the_secret_and_local_paths(tmp_path):
    """A rendered two-node PyTorchJob (two processes a node) with a rollout service, as local processes: torchrun's
    PET_* environment per node, the s3Secret resolved, the Service and the mounts mapped, the host's own
    credentials and rollout URL kept out."""
    spec = ExperimentSpec.model_validate(experiment("env", [{"name": "shapes", "path": SHAPES}])["spec"] | {
        "rollout": TINY["rollout"] | {"backend": "service"},
        "resources": TINY["resources"] | {"nodes": 2, "processesPerNode": 2},
        "storage": {"uri": "s3://ttrv", "endpoint": "http://127.0.0.1:9"},
    })
    run = adaptation_run({"name": "env", "namespace": "team-a"}, spec, "shapes")
    cluster = LocalCluster(tmp_path, {"ttrv-s3": {"AWS_ACCESS_KEY_ID": "id-of-test",
                                                        "AWS_SECRET_ACCESS_KEY": "secret-of-test"}})
    children = {child["kind"]: child for child in run_children(run)}
    for child in children.values():
        cluster.create(child)
    job, deployment = children["PyTorchJob"], children["Deployment"]
    master_port = cluster.ports[job["metadata"]["name"]][23456]
    serve_port = cluster.ports[deployment["metadata"]["name"]][ROLLOUT_PORT]
    host = {"PATH": "/usr/bin", "HOME": str(tmp_path / "home"), "AWS_SECRET_ACCESS_KEY": "the-hosts-own",
            "TTRV_ROLLOUT_URL": "http://elsewhere:1", "PET_NNODES": "9"}
    spec_file = tmp_path / "env-shapes" / "env-shapes-spec" / "run.yaml"
    assert yaml.safe_load(spec_file.read_text())["storage"]["uri"] == "s3://ttrv/team-a/env/shapes"

    nodes = []
    for replica_type in ("Master", "Worker"):
        injected = pods.training_operator_env(job, replica_type, 0, master_port)
        nodes.append(pods.pod_process(job["spec"]["pytorchReplicaSpecs"][replica_type]["template"],
                                       tmp_path / replica_type, cluster.config_maps, cluster.secrets,
                                       cluster.service_addresses(), cluster.ports[job["metadata"]["name"]],
                                       injected, pods.image_env(host)))
    for rank, node in enumerate(nodes):
        assert node.command == [sys.executable, "-m", "ttrv.cli", "train", "--spec", str(spec_file)]
        env = node.env
        assert {key: env[key] for key in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "WORLD_SIZE",
                                          "RANK", "PET_MASTER_ADDR", "MASTER_ADDR")} == {
            "PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": str(rank), "WORLD_SIZE": "4",
            "RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "MASTER_ADDR": "127.0.0.1"}
        assert env["PET_MASTER_PORT"] == env["MASTER_PORT"] == str(master_port) != "23456"
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("id-of-test", "secret-of-test")
        assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9"
        assert env["TTRV_ROLLOUT_URL"] == f"http://127.0.0.1:{serve_port}"  # the Service's name, resolved
        assert env["DS_ACCELERATOR"] == "cpu" and env["PATH"] == "/usr/bin"
        pod = tmp_path / ["Master", "Worker"][rank]
        assert env["HOME"] == str(pod / "tmp") and env["TTRV_OUT"] == str(pod / "tmp" / "ttrv-out")
        # The pod's cache is this machine's; its /tmp is its own, new for each pod.
        assert env["HF_HOME"] == str(tmp_path / "home" / ".cache" / "huggingface")
        assert node.empty_dirs == [pod / "tmp"]

    serve = pods.pod_process(deployment["spec"]["template"], tmp_path / "serve", cluster.config_maps,
                              cluster.secrets, cluster.service_addresses(), cluster.ports[deployment["metadata"]["name"]],
                              [], pods.image_env(host))
    assert serve.command == [sys.executable, "-m", "ttrv.cli", "serve", "--spec", str(spec_file),
                             "--host", "127.0.0.1", "--port", str(serve_port)]
    assert serve.readiness == ("/health", serve_port)
    assert "PET_NNODES" not in serve.env and "TTRV_ROLLOUT_URL" not in serve.env
    assert serve.env["AWS_SECRET_ACCESS_KEY"] == "secret-of-test"


def test_each_local_trainer_gets_its_own_metrics_port(tmp_path):
    """Every trainer pod is told TTRV_METRICS_PORT=9400: in a cluster each pod has its own address, here they share
    loopback, so each run's trainer must get a local port of its own (two runs once failed with EADDRINUSE)."""
    spec = ExperimentSpec.model_validate(experiment("ports", [{"name": "a", "path": SHAPES},
                                                              {"name": "b", "path": SHAPES}])["spec"]
                                         | {"storage": {"uri": "s3://ttrv"}})
    cluster = LocalCluster(tmp_path, {"ttrv-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}})
    ports = []
    for dataset in ("a", "b"):
        children = {child["kind"]: child for child in run_children(adaptation_run({"name": "ports"}, spec, dataset))}
        for child in children.values():
            cluster.create(child)
        job = children["PyTorchJob"]
        template = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        assert {"name": "TTRV_METRICS_PORT", "value": "9400"} in template["spec"]["containers"][0]["env"]
        pod = pods.pod_process(template, tmp_path / dataset, cluster.config_maps, cluster.secrets, {},
                               cluster.ports[job["metadata"]["name"]], [], {})
        ports.append(pod.env["TTRV_METRICS_PORT"])
    assert len(set(ports)) == 2 and "9400" not in ports, ports


def test_a_checkout_under_tmp_keeps_its_interpreter(monkeypatch):
    """The pod's /tmp is a folder of the run; this machine's interpreter may also lie under /tmp (a clone there) and
    must not be moved into it. Only the container's own arguments are translated."""
    monkeypatch.setattr(pods.sys, "executable", "/tmp/clone/.venv/bin/python")
    translate = pods._translator({"/tmp": Path("/runs/pod/tmp")}, {})
    command = pods.local_command(["ttrv", "train", "--out", "/tmp/ttrv-out"], translate, {})
    assert command == ["/tmp/clone/.venv/bin/python", "-m", "ttrv.cli", "train", "--out", "/runs/pod/tmp/ttrv-out"]


def test_runs_that_spend_their_budgets_stop_cleanly_and_say_why(tmp_path):
    """Budgets per experiment and per dataset (issue 19): each run stops after its first of two steps, is
    evaluated, succeeds, and its status names the limit it reached and the step it saved."""
    spec = experiment("budget", [{"name": "steps", "path": SHAPES, "subsetSize": 8},
                                 {"name": "hours", "path": SHAPES, "subsetSize": 8, "budget": {"gpuHours": 1e-9}}],
                      maxParallelRuns=2, budget={"maxSteps": 1})
    out = tmp_path / "out"
    result = run_local(tmp_path, spec)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = statuses(json.loads((out / "status.json").read_text()))
    expected = {"steps": ("MaxStepsReached", "budget.maxSteps"), "hours": ("GpuHoursSpent", "budget.gpuHours")}
    for dataset, (reason, field) in expected.items():
        status = runs[dataset]
        assert (status["phase"], status["reason"], status["stopReason"]) == ("Succeeded", reason, reason), status
        assert (status["step"], status["totalSteps"], status["stepsSaved"]) == (1, 2, 1)
        assert field in status["message"] and status["accuracy"] is not None  # evaluated after stopping
