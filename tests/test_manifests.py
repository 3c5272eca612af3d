"""The pure builders of ttrv/manifests/ and `ttrv render`: every object valid against the real schemas, and
each feature of the contract (names, owners, Kueue, security, network policy, secrets) checked on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import MappingProxyType

import pytest
import yaml
from k8s_util import (
    DNS_LABEL,
    ROOT,
    credential_problems,
    is_pod_selected,
    pod_templates,
    security_problems,
    trainjob_pod_template,
    validate_object,
)

from ttrv.manifests import (
    RUN_NAME_MAX,
    RuntimeRef,
    adaptation_run,
    experiment_objects,
    resolve_trainer_api,
    resource_dump,
    run_children,
    run_name,
    run_store_uri,
    training_runtime,
)
from ttrv.manifests.trainjob import _typed
from ttrv.spec import (
    RESERVED_MOUNT_PATHS,
    AdaptationRunSpec,
    ExperimentSpec,
    SpecError,
    load_experiment,
    load_run_spec,
    parse_spec,
)

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure

META = {"name": "exp", "namespace": "team-a", "uid": "0d6c4a0e-4a7b-4c39-9f0e-6a4b8f3c2d11"}


def experiment(**overrides) -> ExperimentSpec:
    base = {
        "storage": {"uri": "s3://bucket/prefix", "endpoint": "http://minio.store.svc:9000"},
        "datasets": [{"name": "mmmu", "path": "/data/mmmu.json"}, {"name": "shapes", "path": "ttrv://tiny-shapes/test"}],
    }
    return ExperimentSpec.model_validate(base | overrides)


def children(spec: ExperimentSpec, dataset: str = "mmmu") -> dict[str, dict]:
    run = adaptation_run(META, spec, dataset)
    run["metadata"]["uid"] = "7f1e8b52-0000-4000-8000-000000000001"
    return {obj["kind"]: obj for obj in run_children(run)}


SERVICE = {"rollout": {"backend": "service"}}
GPU8 = {"resources": {"nodes": 3, "gpusPerNode": 8, "rolloutGpus": 2}}


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def trainer_container(job: dict, replica: str = "Master") -> dict:
    return job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]["containers"][0]


# --- names and the store prefix -----------------------------------------------------------------------------

def test_store_prefix_isolates_namespaces_and_experiments():
    assert run_store_uri("s3://b/p/", "team-a", "exp", "mmmu") == "s3://b/p/team-a/exp/mmmu"
    uris = {run_store_uri("s3://b/p", ns, "exp", "d") for ns in ("team-a", "team-b")}
    assert len(uris) == 2


def test_adaptation_run_carries_the_resolved_run_spec():
    spec = experiment()
    run = adaptation_run(META, spec, "mmmu")
    body = AdaptationRunSpec.model_validate(run["spec"])
    expected = spec.run_spec("mmmu", storage_uri="s3://bucket/prefix/team-a/exp/mmmu")
    assert body.run == expected
    assert (body.experiment, body.dataset, body.image, body.scheduling, body.s3_secret) == (
        "exp", "mmmu", spec.image, spec.scheduling, spec.s3_secret)
    assert run["metadata"]["name"] == "exp-mmmu"
    assert run["metadata"]["ownerReferences"] == [{
        "apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "name": "exp", "uid": META["uid"],
        "controller": True, "blockOwnerDeletion": True}]
    validate_object(run)


def test_run_names_are_short_unique_dns_labels():
    long_experiment = "e" * 40
    names = {run_name(long_experiment, f"dataset-{i}") for i in range(20)}
    assert len(names) == 20
    for name in names | {run_name("a" * 63, "b" * 63)}:
        assert len(name) <= RUN_NAME_MAX and DNS_LABEL.match(name), name
    assert run_name("exp", "mmmu") == "exp-mmmu"
    # The longest object names derived from a run stay DNS labels (pods and Services of the trainer).
    assert len(f"{run_name('a' * 63, 'b' * 63)}-trainer-worker-999") <= 63


def test_a_local_store_is_rejected_naming_the_field():
    with pytest.raises(SpecError, match=r"storage\.uri: 'file://runs/store' .* s3://bucket/prefix"):
        adaptation_run(META, ExperimentSpec.model_validate({"datasets": [{"name": "d", "path": "x"}]}), "d")


def test_unknown_dataset_is_rejected():
    with pytest.raises(SpecError, match="no dataset named 'nope'"):
        adaptation_run(META, experiment(), "nope")


def test_render_without_uid_sets_no_owner():
    run = adaptation_run({"name": "exp", "namespace": "a"}, experiment(), "mmmu")
    assert "ownerReferences" not in run["metadata"]
    assert all("ownerReferences" not in child["metadata"] for child in run_children(run))


# --- children ---------------------------------------------------------------------------------------------------

# The trainer's identity for its progress reports (ttrv/manifests/access.py).
ACCESS = ["ServiceAccount", "Role", "RoleBinding"]


@pytest.mark.parametrize("overrides, kinds", [
    ({}, ["ConfigMap", *ACCESS, "PyTorchJob"]),
    (SERVICE, ["ConfigMap", "Deployment", "Service", "NetworkPolicy", *ACCESS, "PyTorchJob"]),
])
def test_children_by_rollout_backend(overrides, kinds):
    run = adaptation_run(META, experiment(**overrides), "mmmu")
    assert [child["kind"] for child in run_children(run)] == kinds


@pytest.mark.parametrize("overrides", [{}, SERVICE, SERVICE | GPU8, {"resources": {"gpusPerNode": 0}},
                                       SERVICE | {"scheduling": {"queueName": "q", "priorityClassName": "p",
                                                                 "nodeSelector": {"gpu": "h100"}}}])
def test_every_child_is_valid_owned_and_labelled(overrides):
    for kind, child in children(experiment(**overrides)).items():
        validate_object(child)
        labels = child["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "ttrv"
        assert labels["app.kubernetes.io/instance"] == labels["ttrv.io/experiment"] == "exp"
        assert (labels["ttrv.io/run"], labels["ttrv.io/dataset"]) == ("exp-mmmu", "mmmu")
        if kind != "ConfigMap":  # the spec is shared by trainer and rollout
            assert labels["app.kubernetes.io/component"] in ("trainer", "rollout")
        assert child["metadata"]["ownerReferences"][0]["kind"] == "AdaptationRun"
        assert child["metadata"]["namespace"] == "team-a"


def test_config_map_holds_the_run_spec_that_the_pods_load(tmp_path):
    spec = experiment(**SERVICE)
    config_map = children(spec)["ConfigMap"]
    path = tmp_path / "run.yaml"
    path.write_text(config_map["data"]["run.yaml"])
    assert load_run_spec(path) == spec.run_spec("mmmu", storage_uri="s3://bucket/prefix/team-a/exp/mmmu")
    assert config_map["metadata"]["name"] == "exp-mmmu-spec"
    # libyaml's emitter writes what the pure-Python one would
    assert config_map["data"]["run.yaml"] == yaml.safe_dump(yaml.safe_load(path.read_text()), sort_keys=False)


def test_trainer_job_shape():
    job = children(experiment(**SERVICE | GPU8))["PyTorchJob"]
    assert job["metadata"]["name"] == "exp-mmmu-trainer"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert {spec["restartPolicy"] for spec in replicas.values()} == {"ExitCode"}
    assert job["spec"]["nprocPerNode"] == "8"
    assert job["spec"]["runPolicy"] == {"backoffLimit": 3, "ttlSecondsAfterFinished": 3600,
                                        "cleanPodPolicy": "Running", "suspend": False}
    container = trainer_container(job)
    assert container["name"] == "pytorch"
    assert container["command"] == ["ttrv", "train", "--spec", "/etc/ttrv/run.yaml"]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"  # the operator reports it
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]
    env = env_of(container)
    assert env["TTRV_ROLLOUT_URL"]["value"] == "http://exp-mmmu-rollout.team-a.svc:8000"
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://minio.store.svc:9000"
    assert "DS_ACCELERATOR" not in env
    pod = replicas["Worker"]["template"]["spec"]
    assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "spec", "mountPath": "/etc/ttrv", "readOnly": True} in container["volumeMounts"]


def test_single_node_cpu_trainer():
    job = children(experiment(resources={"gpusPerNode": 0}))["PyTorchJob"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    container = trainer_container(job)
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert env_of(container)["DS_ACCELERATOR"]["value"] == "cpu"
    assert "TTRV_ROLLOUT_URL" not in env_of(container)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    # Tolerations reach every pod (a team's tainted node pool); the node selector only GPU pods.
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in pod


def test_rollout_service_shape():
    objs = children(experiment(**SERVICE | GPU8 | {"model": {"lora": {"rank": 8}}}))
    deployment, service = objs["Deployment"], objs["Service"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["ttrv", "serve", "--spec", "/etc/ttrv/run.yaml",
                                    "--host", "0.0.0.0", "--port", "8000"]
    assert container["image"] == "ghcr.io/ttrv/ttrv-trainer:0.1.0"
    assert "TTRV_VLLM_ARGS" not in env_of(container)  # vLLM's flags come from the spec (tests/test_vllm_flags.py)
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # /health fails for good once the engine died: liveness restarts a service that could not exit by itself
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    assert service["metadata"]["name"] == deployment["metadata"]["name"] == "exp-mmmu-rollout"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert is_pod_selected(service["spec"]["selector"], deployment["spec"]["template"])
    assert is_pod_selected(deployment["spec"]["selector"]["matchLabels"], deployment["spec"]["template"])


def test_network_policy_admits_only_this_runs_trainers_on_the_http_port():
    spec = experiment(**SERVICE)
    objs = children(spec)
    other = children(spec, "shapes")
    policy = objs["NetworkPolicy"]["spec"]
    rollout_pod = objs["Deployment"]["spec"]["template"]
    trainer_pod = objs["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    other_trainer_pod = other["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert is_pod_selected(policy["podSelector"]["matchLabels"], rollout_pod)
    assert not is_pod_selected(policy["podSelector"]["matchLabels"], trainer_pod)
    assert policy["policyTypes"] == ["Ingress"] and len(policy["ingress"]) == 1
    rule = policy["ingress"][0]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock: same namespace, selected pods only
    assert is_pod_selected(peer["podSelector"]["matchLabels"], trainer_pod)
    assert not is_pod_selected(peer["podSelector"]["matchLabels"], other_trainer_pod)
    assert not is_pod_selected(peer["podSelector"]["matchLabels"], rollout_pod)


def test_kueue_queue_labels_and_suspends():
    queued = children(experiment(**SERVICE | {"scheduling": {"queueName": "gpu-a"}}))
    assert queued["PyTorchJob"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-a"
    assert queued["PyTorchJob"]["spec"]["runPolicy"]["suspend"] is True
    # Gang admission: the rollout is never a Workload of its own; it starts at zero and runs only while Kueue has
    # the trainer admitted (the operator scales it).
    assert "kueue.x-k8s.io/queue-name" not in queued["Deployment"]["metadata"]["labels"]
    assert queued["Deployment"]["spec"]["replicas"] == 0
    plain = children(experiment(**SERVICE))
    for kind in ("PyTorchJob", "Deployment"):
        assert "kueue.x-k8s.io/queue-name" not in plain[kind]["metadata"]["labels"]
    assert plain["Deployment"]["spec"]["replicas"] == 1


def test_suspended_experiment_suspends_the_trainer_and_scales_the_rollout_to_zero():
    objs = children(experiment(**SERVICE | {"suspend": True}))
    assert objs["PyTorchJob"]["spec"]["runPolicy"]["suspend"] is True
    assert objs["Deployment"]["spec"]["replicas"] == 0


def test_scheduling_reaches_gpu_pods():
    objs = children(experiment(**SERVICE | {"scheduling": {
        "priorityClassName": "research", "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]}}))
    job = objs["PyTorchJob"]
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"priorityClass": "research"}
    for where, template in pod_templates(job) + pod_templates(objs["Deployment"]):
        pod = template["spec"]
        assert pod["priorityClassName"] == "research", where
        assert pod["nodeSelector"] == {"gpu": "h100"}, where
        assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]


def test_volumes_reach_every_trainer_and_rollout_pod_read_only():
    volumes = {"volumes": [{"claimName": "imagenet-variants", "mountPath": "/data"},
                           {"claimName": "models", "mountPath": "/models/", "readOnly": False}]}
    objs = children(experiment(**SERVICE | GPU8 | volumes))
    validate_object(objs["PyTorchJob"])
    validate_object(objs["Deployment"])
    templates = pod_templates(objs["PyTorchJob"]) + pod_templates(objs["Deployment"])
    assert len(templates) == 3  # Master, Worker, rollout
    for where, template in templates:
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert claims == {"volume-0": {"claimName": "imagenet-variants", "readOnly": True},
                          "volume-1": {"claimName": "models", "readOnly": False}}, where
        assert mounts["/data"] == {"name": "volume-0", "mountPath": "/data", "readOnly": True}, where
        assert mounts["/models"] == {"name": "volume-1", "mountPath": "/models", "readOnly": False}, where


def test_the_rollout_pod_has_its_own_cpu_and_memory_when_set():
    def requests(resources: dict) -> tuple[dict, dict]:
        objs = children(experiment(**SERVICE | {"resources": resources}))
        trainer = trainer_container(objs["PyTorchJob"])["resources"]["requests"]
        rollout = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]
        return trainer, rollout

    trainer, rollout = requests({"cpu": "16", "memory": "256Gi"})
    assert (rollout["cpu"], rollout["memory"]) == (trainer["cpu"], trainer["memory"]) == ("16", "256Gi")
    trainer, rollout = requests({"cpu": "16", "memory": "256Gi", "rolloutCpu": "4", "rolloutMemory": "48Gi"})
    assert (trainer["cpu"], trainer["memory"], rollout["cpu"], rollout["memory"]) == ("16", "256Gi", "4", "48Gi")


def test_reserved_mount_paths_are_the_pods_own_mounts():
    """The spec refuses a volume over these paths; they must be exactly what the builders mount themselves."""
    trainer = trainer_container(children(experiment())["PyTorchJob"])
    assert sorted(m["mountPath"] for m in trainer["volumeMounts"]) == sorted(RESERVED_MOUNT_PATHS)


@pytest.mark.parametrize("overrides", [SERVICE | GPU8, {"resources": {"gpusPerNode": 0}}])
def test_every_pod_runs_restricted(overrides):
    for child in children(experiment(**overrides)).values():
        for where, template in pod_templates(child):
            assert security_problems(where, template) == []
            assert template["spec"]["automountServiceAccountToken"] is False


def test_credentials_only_by_secret_reference():
    objs = children(experiment(**SERVICE | {"s3Secret": {"name": "team-s3", "accessKeyKey": "id",
                                                         "secretKeyKey": "key"}}))
    containers = [trainer_container(objs["PyTorchJob"]), objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]]
    for container in containers:
        env = env_of(container)
        assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID",
                                            "valueFrom": {"secretKeyRef": {"name": "team-s3", "key": "id"}}}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "team-s3", "key": "key"}}
    assert [problem for obj in objs.values() for problem in credential_problems(obj)] == []


def test_a_none_default_is_omitted_and_a_meaningful_null_kept():
    spec = experiment(datasets=[{"name": "d", "path": "x", "subsetSize": None}])
    run = adaptation_run(META, spec, "d")
    assert run["spec"]["run"]["data"]["subsetSize"] is None
    assert "heldoutPath" not in run["spec"]["run"]["data"]
    assert "effect" in run["spec"]["scheduling"]["tolerations"][0]
    dumped = resource_dump(spec.scheduling.model_copy(update={"tolerations": []}))
    assert "queueName" not in dumped and dumped["tolerations"] == []


def test_children_share_no_objects():
    objs = run_children(adaptation_run(META, experiment(**SERVICE | GPU8), "mmmu"))
    job = next(obj for obj in objs if obj["kind"] == "PyTorchJob")
    trainer_container(job, "Master")["env"].append({"name": "X", "value": "1"})
    assert "X" not in env_of(trainer_container(job, "Worker"))
    assert "&id" not in yaml.safe_dump_all(objs)


def test_run_children_takes_any_mapping_as_kopf_hands_it():
    run = adaptation_run(META, experiment(**SERVICE), "mmmu")
    frozen = MappingProxyType(run | {"spec": MappingProxyType(run["spec"])})
    assert run_children(frozen) == run_children(run)


def test_run_children_names_a_bad_spec():
    run = adaptation_run(META, experiment(), "mmmu")
    run["spec"]["run"]["rollout"]["groupSize"] = 64
    with pytest.raises(SpecError, match=r"AdaptationRun exp-mmmu: spec: run\.rollout: groupSize \(64\) > votes"):
        run_children(run)


# --- ttrv render ------------------------------------------------------------------------------------------------

SENTINEL = "AKIASENTINEL-do-not-render"


def render(*args: str) -> subprocess.CompletedProcess:
    # Credentials in render's own environment must never reach its output.
    env = dict(os.environ, AWS_ACCESS_KEY_ID=SENTINEL, AWS_SECRET_ACCESS_KEY=SENTINEL, MINIO_ROOT_PASSWORD=SENTINEL)
    result = subprocess.run([sys.executable, "-m", "ttrv.cli", "render", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env=env)
    assert SENTINEL not in result.stdout + result.stderr
    return result


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("experiment-*.yaml")))
def test_render_examples(example):
    result = render(f"examples/{example}")
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    metadata, spec = load_experiment(ROOT / "examples" / example)
    assert objects == experiment_objects(metadata, spec)
    runs = [obj for obj in objects if obj["kind"] == "AdaptationRun"]
    assert [run["spec"]["dataset"] for run in runs] == [d.name for d in spec.datasets]
    for obj in objects:
        validate_object(obj)
        for where, template in pod_templates(obj):
            assert security_problems(where, template) == []


def test_render_namespace_flag_moves_everything():
    result = render("examples/experiment-lora-small-gpu.yaml", "-n", "elsewhere")
    objects = list(yaml.safe_load_all(result.stdout))
    assert {obj["metadata"]["namespace"] for obj in objects} == {"elsewhere"}
    run = parse_spec(objects[0]["spec"], AdaptationRunSpec)
    assert run.run.storage.uri == "s3://ttrv/experiments/elsewhere/lora-small/mmmu-val"
    assert "rollout.elsewhere.svc:8000" in result.stdout


@pytest.mark.parametrize("document, message", [
    ("spec:\n  datasets: [{name: d, path: x}]\n  rollout: {votes: 4, groupSize: 8}\n",
     r"spec: rollout: groupSize \(8\) > votes \(4\)"),
    ("spec:\n  datasets: [{name: d, path: x}]\n  rollout: {vote: 4}\n", r"spec: rollout\.vote: unknown key"),
    ("spec:\n  datasets: [{name: d, path: x}]\n", r"storage\.uri: 'file://runs/store' is a local path"),
    ("spec:\n  storage: {uri: 's3://b'}\n", r"spec: datasets: required field is missing"),
])
def test_render_bad_spec_exits_1_naming_the_field(tmp_path, document, message):
    path = tmp_path / "exp.yaml"
    path.write_text("apiVersion: ttrv.io/v1alpha1\nkind: Experiment\nmetadata: {name: exp}\n" + document)
    result = render(str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"error: {path}: ")
    assert re.search(message, result.stderr), result.stderr


# --- Kubeflow Trainer v2: the TrainJob and its runtime -------------------------------------------------------------

def trainjob_children(spec: ExperimentSpec, dataset: str = "mmmu", runtime: RuntimeRef | None = None) -> dict:
    run = adaptation_run(META, spec, dataset)
    run["metadata"]["uid"] = "7f1e8b52-0000-4000-8000-000000000001"
    return {obj["kind"]: obj for obj in run_children(run, "trainjob", runtime)}


@pytest.mark.parametrize("requested, served, chosen", [
    ("auto", None, "trainjob"),
    ("auto", frozenset({"trainjob", "pytorchjob"}), "trainjob"),
    ("auto", frozenset({"pytorchjob"}), "pytorchjob"),
    ("auto", frozenset(), None),
    ("pytorchjob", frozenset({"trainjob", "pytorchjob"}), "pytorchjob"),
    ("pytorchjob", frozenset({"trainjob"}), None),
    ("trainjob", None, "trainjob"),
])
def test_trainer_api_resolution(requested, served, chosen):
    assert resolve_trainer_api(requested, served) == chosen


@pytest.mark.parametrize("overrides", [{}, SERVICE, SERVICE | GPU8, {"resources": {"gpusPerNode": 0}},
                                       SERVICE | {"scheduling": {"queueName": "q", "nodeSelector": {"gpu": "h"}}}])
def test_every_trainjob_child_is_valid_owned_and_labelled(overrides):
    kids = trainjob_children(experiment(**overrides))
    assert "PyTorchJob" not in kids
    for child in kids.values():
        validate_object(child)
        assert child["metadata"]["ownerReferences"][0]["kind"] == "AdaptationRun"
    job = kids["TrainJob"]
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"


@pytest.mark.parametrize("overrides", [SERVICE | GPU8, {"resources": {"gpusPerNode": 0}},
                                       SERVICE | {"volumes": [{"claimName": "data", "mountPath": "/data"}],
                                                  "scheduling": {"nodeSelector": {"gpu": "h100"}}}])
def test_trainjob_pod_is_the_pytorchjob_pod(overrides):
    """What the trainer runs does not depend on the API: the pod Kubeflow Trainer makes from ttrv's runtime and the
    TrainJob's patches has the PyTorchJob master's command, env, mounts, volumes, resources, placement, labels and
    security; only the container's name (Kubeflow's `node`) and the launcher's port differ."""
    spec = experiment(**overrides)
    kids = trainjob_children(spec)
    pod = trainjob_pod_template(kids["TrainJob"], kids.get("TrainingRuntime") or training_runtime())
    master = children(spec)["PyTorchJob"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    ours, theirs = pod["spec"]["containers"][0], master["spec"]["containers"][0]
    assert ours["name"] == "node" and theirs["name"] == "pytorch"
    for field in ("image", "imagePullPolicy", "command", "resources", "securityContext", "terminationMessagePolicy"):
        assert ours[field] == theirs[field], field
    assert env_of(ours) == env_of(theirs)
    def by_name(items: list[dict]) -> dict:
        return {item["name"]: item for item in items}

    assert by_name(ours["volumeMounts"]) == by_name(theirs["volumeMounts"])
    assert by_name(pod["spec"]["volumes"]) == by_name(master["spec"]["volumes"])
    assert [p for p in ours["ports"] if p["name"] == "metrics"] == [p for p in theirs["ports"] if p["name"] == "metrics"]
    assert pod["metadata"]["labels"] == master["metadata"]["labels"]
    for field in ("securityContext", "automountServiceAccountToken", "nodeSelector", "tolerations"):
        assert pod["spec"].get(field) == master["spec"].get(field), field
    assert security_problems("TrainJob", pod) == []
    # The runtime's Job fails on the trainer's first non-zero exit; the operator applies the exit-code contract.
    assert pod["spec"]["restartPolicy"] == "Never"


def test_trainjob_shape():
    job = trainjob_children(experiment(**GPU8))["TrainJob"]
    assert job["metadata"]["name"] == "exp-mmmu-trainer"
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
                                         "name": "ttrv-trainer"}
    # A run with a rollout service references its own runtime, which carries the rollout (gang admission).
    assert trainjob_children(experiment(**SERVICE | GPU8))["TrainJob"]["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": "exp-mmmu-runtime"}
    trainer = job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (3, 8)
    assert trainer["command"] == ["ttrv", "train", "--spec", "/etc/ttrv/run.yaml"]
    assert job["spec"]["suspend"] is False
    [patch] = job["spec"]["runtimePatches"]
    assert patch["manager"] == "ttrv.io/operator"
    # The webhook refuses env for the `node` container in a patch: env travels only in spec.trainer.env.
    for replicated in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
        for container in replicated["template"]["spec"]["template"]["spec"]["containers"]:
            assert "env" not in container
    # Reserved torchrun variables are Kubeflow's to set (the torch plugin's webhook rejects them).
    assert not [name for name in env_of(trainer) if name.startswith("PET_")]


def test_trainjob_kueue_label_suspend_and_namespaced_runtime():
    spec = experiment(scheduling={"queueName": "team-q"})
    job = trainjob_children(spec, runtime=RuntimeRef("TrainingRuntime", "team-runtime"))["TrainJob"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-q"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["runtimeRef"]["kind"] == "TrainingRuntime"
    assert job["spec"]["runtimeRef"]["name"] == "team-runtime"
    suspended = trainjob_children(experiment(suspend=True))["TrainJob"]
    assert suspended["spec"]["suspend"] is True


@pytest.mark.parametrize("kind, namespace", [("ClusterTrainingRuntime", None), ("TrainingRuntime", "team-a")])
def test_training_runtime_is_valid_and_restricted(kind, namespace):
    runtime = training_runtime(kind, namespace=namespace)
    validate_object(runtime)
    assert (runtime["kind"], runtime["metadata"].get("namespace")) == (kind, namespace)
    for where, template in pod_templates(runtime):
        assert security_problems(where, template) == []
    [job] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    assert job["template"]["spec"]["backoffLimit"] == 0


def test_a_field_trainjob_lacks_fails_by_name():
    with pytest.raises(ValueError, match=r"spec\.trainer\.numProcsPerNode"):
        _typed("TrainerV1alpha1TrainJob", {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                                           "metadata": {"name": "x"},
                                           "spec": {"runtimeRef": {"name": "r"}, "trainer": {"numProcsPerNode": 2}}})


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("experiment-*.yaml")))
def test_render_examples_with_each_trainer_api(example, api):
    result = render(f"examples/{example}", "--trainer-api", api)
    assert result.returncode == 0, result.stderr
    objects = list(yaml.safe_load_all(result.stdout))
    metadata, spec = load_experiment(ROOT / "examples" / example)
    assert objects == experiment_objects(metadata, spec, api)
    kinds = {obj["kind"] for obj in objects}
    assert ("TrainJob" in kinds, "PyTorchJob" in kinds) == (api == "trainjob", api == "pytorchjob")
    for obj in objects:
        validate_object(obj)
        for where, template in pod_templates(obj):
            assert security_problems(where, template) == []


def test_an_example_uses_trainjob():
    apis = {load_experiment(path)[1].scheduling.trainer_api for path in (ROOT / "examples").glob("experiment-*.yaml")}
    assert "trainjob" in apis


# --- gang admission: a TrainJob's JobSet carries the rollout --------------------------------------------------------

def test_a_trainjob_run_with_a_rollout_service_carries_the_rollout_in_its_own_runtime():
    """The rollout pod is a replicated job of the run's TrainingRuntime, ahead of `node`, which starts once it is
    Ready (JobSet dependsOn); Kueue makes one pod set of each (one Workload), and the JobSet succeeds when `node`
    has. No Deployment: its GPUs would be admitted apart from the trainer's."""
    spec = experiment(**SERVICE | GPU8 | {"scheduling": {"queueName": "team-q"}})
    kids = trainjob_children(spec)
    assert list(kids) == ["ConfigMap", "Service", "NetworkPolicy", "ServiceAccount", "Role", "RoleBinding",
                          "TrainingRuntime", "TrainJob"]
    runtime = kids["TrainingRuntime"]
    validate_object(runtime)
    assert (runtime["metadata"]["name"], runtime["metadata"]["namespace"]) == ("exp-mmmu-runtime", "team-a")
    assert runtime["metadata"]["ownerReferences"][0]["kind"] == "AdaptationRun"
    assert "kueue.x-k8s.io/queue-name" not in runtime["metadata"]["labels"]  # the TrainJob carries it
    jobset = runtime["spec"]["template"]["spec"]
    rollout, node = jobset["replicatedJobs"]
    assert (rollout["name"], rollout["replicas"], node["name"]) == ("rollout", 1, "node")
    assert "dependsOn" not in rollout and node["dependsOn"] == [{"name": "rollout", "status": "Ready"}]
    assert jobset["successPolicy"] == {"operator": "All", "targetReplicatedJobs": ["node"]}
    # Kubeflow Trainer configures only the job labelled as the trainer ancestor.
    assert "trainer.kubeflow.org/trainjob-ancestor-step" not in rollout["template"]["metadata"]["labels"]
    assert node["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    assert runtime["spec"]["mlPolicy"]["numNodes"] == 3
    # The rollout pod is the PyTorchJob path's Deployment pod, restarted in place as a Job's pod may be.
    pod = rollout["template"]["spec"]["template"]
    deployment_pod = children(spec)["Deployment"]["spec"]["template"]
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    assert {k: v for k, v in pod["spec"].items() if k != "restartPolicy"} == deployment_pod["spec"]
    assert pod["metadata"] == deployment_pod["metadata"]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # ... so the run's Service and NetworkPolicy select it as they select the Deployment's pod.
    assert is_pod_selected(kids["Service"]["spec"]["selector"], pod)
    assert is_pod_selected(kids["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"], pod)
    assert kids["TrainJob"]["spec"]["runtimeRef"]["name"] == "exp-mmmu-runtime"
    for where, template in pod_templates(runtime):
        assert security_problems(where, template) == []
    # Without a rollout service there is nothing to gang: the shared runtime, as before.
    assert "TrainingRuntime" not in trainjob_children(experiment())


def test_the_jobset_trainer_builds_from_a_runs_runtime_validates_against_jobsets_crd():
    """The JobSet Kubeflow Trainer makes of the run's TrainingRuntime (its template, `node` as the TrainJob makes it,
    suspended, owned by the TrainJob: plugins/jobset/jobset.go Build) against JobSet's own CRD
    (../shared/k8s-crds): dependsOn and successPolicy are JobSet's fields, as JobSet spells them."""
    import copy

    import jsonschema
    from k8s_util import openapi_to_jsonschema

    crd_path = ROOT.parent / "shared" / "k8s-crds" / "jobset.x-k8s.io_jobsets.yaml"
    if not crd_path.exists():
        pytest.skip(f"{crd_path} is not here")
    kids = trainjob_children(experiment(**SERVICE | GPU8 | {"scheduling": {"queueName": "team-q"}}))
    runtime, job = kids["TrainingRuntime"], kids["TrainJob"]
    spec = copy.deepcopy(runtime["spec"]["template"]["spec"])
    for replicated in spec["replicatedJobs"]:
        if replicated["name"] == "node":
            replicated["template"]["spec"]["template"] = trainjob_pod_template(job, runtime)
            replicated["template"]["spec"]["parallelism"] = replicated["template"]["spec"]["completions"] = \
                job["spec"]["trainer"]["numNodes"]
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
              "metadata": {"name": job["metadata"]["name"], "namespace": "team-a"},
              "spec": spec | {"suspend": True}}
    schema = openapi_to_jsonschema(yaml.safe_load(crd_path.read_text())["spec"]["versions"][0]["schema"]
                                   ["openAPIV3Schema"])
    schema["properties"]["metadata"].pop("additionalProperties", None)
    error = jsonschema.exceptions.best_match(jsonschema.Draft4Validator(schema).iter_errors(jobset))
    assert error is None, f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
    assert [j["name"] for j in spec["replicatedJobs"]] == ["rollout", "node"]  # dependsOn: never the first job
