"""The pod settings of a shared cluster (ExperimentSpec.pod, image.pullSecrets, scheduling's affinity, topology
spread and tolerations): each one in every pod ttrv creates, the trainer's under TrainJob and PyTorchJob and the
rollout service's, in objects valid against Kubernetes' and the vendored CRDs' schemas."""

from __future__ import annotations

import json

import pytest
import yaml
from k8s_util import (
    ROOT,
    crd_validators,
    credential_problems,
    helm,
    helm_template,
    pod_templates,
    security_problems,
    trainjob_pod_template,
    validate_object,
)

from ttrv.manifests import adaptation_run, experiment_objects, run_children, training_runtime
from ttrv.spec import ExperimentSpec, SchedulingSpec, SpecError, parse_spec

pytestmark = pytest.mark.pure

META = {"name": "exp", "namespace": "team-a", "uid": "0d6c4a0e-4a7b-4c39-9f0e-6a4b8f3c2d11"}
BASE = {
    "storage": {"uri": "s3://bucket/prefix"},
    "datasets": [{"name": "mmmu", "path": "/data/mmmu.json"}],
    "rollout": {"backend": "service"},
    "resources": {"nodes": 2, "gpusPerNode": 8, "rolloutGpus": 2},
}
AFFINITY = {
    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]},
    ]}},
    "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "podAffinityTerm": {
        "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "trainer"}},
        "topologyKey": "kubernetes.io/hostname"}}]},
}
TOLERATIONS = [{"key": "dedicated", "operator": "Equal", "value": "vision", "effect": "NoSchedule"}]
HF_TOKEN = {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}}
NCCL = {"name": "NCCL_IB_HCA", "value": "mlx5"}
POD = {
    "serviceAccountName": "vision-runs",
    "labels": {"team": "vision"},
    "annotations": {"kueue.x-k8s.io/podset-preferred-topology": "cloud.provider.com/topology-block"},
    "env": [HF_TOKEN, NCCL],
    "extraResources": {"rdma/hca": 1},
    "rolloutExtraResources": {"example.com/nic": "2"},
    "ipcLock": True,
    "terminationGracePeriodSeconds": 1200,
    "shmSizeLimit": "16Gi",
    "ephemeralStorage": "100Gi",
}
SETTINGS = BASE | {"image": {"pullSecrets": ["registry-cred"]},
                   "scheduling": {"affinity": AFFINITY, "tolerations": TOLERATIONS}, "pod": POD}


def objects(settings: dict, api: str) -> dict[str, dict]:
    spec = ExperimentSpec.model_validate(settings)
    run = adaptation_run(META, spec, "mmmu")
    run["metadata"]["uid"] = "7f1e8b52-0000-4000-8000-000000000001"
    kids = {obj["kind"]: obj for obj in run_children(run, api)}
    for obj in [run, *kids.values()]:
        validate_object(obj)
        for where, template in pod_templates(obj):
            assert security_problems(where, template) == []
        assert credential_problems(obj) == []
    return kids


def trainer_pods(kids: dict[str, dict]) -> list[tuple[str, dict]]:
    if "TrainJob" in kids:
        return [("TrainJob/node", trainjob_pod_template(kids["TrainJob"], training_runtime()))]
    return pod_templates(kids["PyTorchJob"])


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def volume(pod: dict, name: str) -> dict:
    return next(v for v in pod["volumes"] if v["name"] == name)


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_every_pod_setting_reaches_every_pod(api):
    kids = objects(SETTINGS, api)
    trainers = trainer_pods(kids)
    # A TrainJob run's rollout pod is its runtime's `rollout` job (gang admission), a PyTorchJob run's a Deployment.
    rollout = pod_templates(kids["Deployment"]) if "Deployment" in kids else \
        [(where, t) for where, t in pod_templates(kids["TrainingRuntime"]) if where.endswith("/rollout")]
    assert len(rollout) == 1
    assert len(trainers) == (1 if api == "trainjob" else 2)  # TrainJob: one template for every node
    for where, template in trainers + rollout:
        pod, (container,) = template["spec"], template["spec"]["containers"]
        assert pod["serviceAccountName"] == "vision-runs", where
        assert pod["automountServiceAccountToken"] is False, where  # the account's token still stays out
        assert pod["imagePullSecrets"] == [{"name": "registry-cred"}], where
        assert pod["affinity"] == AFFINITY, where
        assert pod["tolerations"] == TOLERATIONS, where
        assert template["metadata"]["labels"]["team"] == "vision", where
        assert template["metadata"]["annotations"] == POD["annotations"], where
        env = env_of(container)
        assert env["HF_TOKEN"] == HF_TOKEN and env["NCCL_IB_HCA"] == NCCL, where
        assert container["resources"]["requests"]["ephemeral-storage"] == "100Gi", where
        assert "ephemeral-storage" not in container["resources"]["limits"], where
        assert volume(pod, "shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}, where
    for where, template in trainers:
        pod, (container,) = template["spec"], template["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"]["rdma/hca"] == resources["limits"]["rdma/hca"] == "1", where
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}, where
        assert pod["terminationGracePeriodSeconds"] == 1200, where
        # torch elastic's launcher SIGKILLs its workers this long after SIGTERM: before the kubelet does.
        assert env_of(container)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "1190", where
    for where, template in rollout:
        pod, (container,) = template["spec"], template["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"]["example.com/nic"] == resources["limits"]["example.com/nic"] == "2", where
        assert "rdma/hca" not in resources["requests"], where
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, where
        assert "terminationGracePeriodSeconds" not in pod, where  # nothing to save: Kubernetes' 30 s
        assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in env_of(container), where


def test_trainjob_carries_the_settings_as_kubeflow_allows():
    """Per trainjob_types.go: env and resources in spec.trainer, the rest in ttrv's runtime patch (PodSpecPatch,
    PodTemplatePatch.metadata, the `node` ContainerPatch without env, which the webhook refuses there)."""
    job = objects(SETTINGS, "trainjob")["TrainJob"]
    trainer = job["spec"]["trainer"]
    assert [item for item in trainer["env"] if item["name"] in ("HF_TOKEN", "NCCL_IB_HCA")] == [HF_TOKEN, NCCL]
    assert trainer["resourcesPerNode"]["limits"]["rdma/hca"] == "1"
    [patch] = job["spec"]["runtimePatches"]
    [replicated] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    template = replicated["template"]["spec"]["template"]
    assert template["metadata"]["annotations"] == POD["annotations"]
    spec = template["spec"]
    assert {key: spec[key] for key in ("serviceAccountName", "imagePullSecrets", "affinity", "tolerations",
                                        "terminationGracePeriodSeconds")} == {
        "serviceAccountName": "vision-runs", "imagePullSecrets": [{"name": "registry-cred"}], "affinity": AFFINITY,
        "tolerations": TOLERATIONS, "terminationGracePeriodSeconds": 1200}
    [node] = spec["containers"]
    assert "env" not in node and node["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
    # The runtime's memory-backed emptyDir, merged by name: only sizeLimit is new.
    assert volume(spec, "shm") == {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}
    assert not [v for v in spec["volumes"] if v["name"] in ("tmp", "cache")]


def test_trainjob_pod_with_every_setting_is_the_pytorchjob_pod():
    trainjob = trainer_pods(objects(SETTINGS, "trainjob"))[0][1]
    master = pod_templates(objects(SETTINGS, "pytorchjob")["PyTorchJob"])[0][1]
    assert trainjob["metadata"] == master["metadata"]
    for field in ("serviceAccountName", "imagePullSecrets", "affinity", "tolerations", "nodeSelector",
                  "terminationGracePeriodSeconds", "automountServiceAccountToken", "securityContext"):
        assert trainjob["spec"].get(field) == master["spec"].get(field), field
    ours, theirs = trainjob["spec"]["containers"][0], master["spec"]["containers"][0]
    for field in ("resources", "securityContext"):
        assert ours[field] == theirs[field], field
    assert env_of(ours) == env_of(theirs)
    assert volume(trainjob["spec"], "shm") == volume(master["spec"], "shm")


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_defaults_give_a_trainer_time_to_checkpoint_and_add_nothing(api):
    kids = objects(BASE, api)
    for where, template in trainer_pods(kids):
        pod, (container,) = template["spec"], template["spec"]["containers"]
        assert pod["terminationGracePeriodSeconds"] == 900, where
        assert env_of(container)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"] == "890", where
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}, where
        # The run's own account, whose only right is its run's status (ttrv/manifests/access.py).
        assert pod["serviceAccountName"].endswith("-trainer"), where
        for field in ("imagePullSecrets", "affinity", "topologySpreadConstraints"):
            assert field not in pod, (where, field)
        assert "annotations" not in template["metadata"], where
        assert volume(pod, "shm")["emptyDir"] == {"medium": "Memory"}, where
        assert set(container["resources"]["requests"]) == {"cpu", "memory", "nvidia.com/gpu"}, where


def test_topology_spread_needs_pytorchjob_and_reaches_its_pods():
    spread = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "trainer"}},
               "matchLabelKeys": ["ttrv.io/run"]}]
    settings = BASE | {"scheduling": {"topologySpreadConstraints": spread, "trainerApi": "pytorchjob"}}
    kids = objects(settings, "pytorchjob")
    for where, template in pod_templates(kids["PyTorchJob"]) + pod_templates(kids["Deployment"]):
        assert template["spec"]["topologySpreadConstraints"] == spread, where
    # A TrainJob cannot carry them: refused at admission for trainjob and for auto (which may become TrainJob)...
    for api in ("trainjob", "auto"):
        with pytest.raises(SpecError, match=r"values.yaml: scheduling: topologySpreadConstraints need trainerApi: "
                                            rf"pytorchjob \(it is {api}\)"):
            parse_spec(BASE | {"scheduling": {"topologySpreadConstraints": spread, "trainerApi": api}},
                       ExperimentSpec, "values.yaml")
    # ...and by the builder, should a TrainJob be asked for anyway (`ttrv render --trainer-api trainjob`).
    with pytest.raises(SpecError, match=r"scheduling\.topologySpreadConstraints: a TrainJob cannot carry them"):
        objects(settings, "trainjob")


@pytest.mark.parametrize("pod, field, hint", [
    ({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}, "pod.env.0", "ttrv or the training operator sets"),
    ({"env": [{"name": "PET_NNODES", "value": "2"}]}, "pod.env.0", "remove it"),
    ({"env": [{"name": "HF_TOKEN", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
     "pod.env.0", "not both"),
    ({"env": [{"name": "HF_TOKEN", "valueFrom": {}}]}, "pod.env.0.valueFrom", "exactly one of secretKeyRef"),
    ({"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "keys": "k"}}}]},
     "pod.env.0.valueFrom.secretKeyRef.keys", "unknown key"),
    ({"env": [{"name": "1=x", "value": "v"}]}, "pod.env.0.name", "should match pattern"),
    ({"extraResources": {"memory": "1Gi"}}, "pod.extraResources", "set resources.memory"),
    ({"extraResources": {"rdma/hca": "lots"}}, "pod.extraResources.rdma/hca", "a Kubernetes quantity"),
    ({"rolloutExtraResources": {"Bad Name": 1}}, "pod.rolloutExtraResources", "resource name"),
    ({"labels": {"ttrv.io/run": "x"}}, "pod.labels", "set by ttrv"),
    ({"labels": {"app.kubernetes.io/component": "x"}}, "pod.labels", "set by ttrv"),
    ({"annotations": {"not a key!": "x"}}, "pod.annotations.not a key!.[key]", "label key"),
    ({"serviceAccountName": "Runs_SA"}, "pod.serviceAccountName", "Kubernetes object name"),
    ({"terminationGracePeriodSeconds": -1}, "pod.terminationGracePeriodSeconds", "greater than or equal to 0"),
    ({"shmSizeLimit": "16 GB"}, "pod.shmSizeLimit", "a Kubernetes quantity"),
    ({"ipcLock": "yes please"}, "pod.ipcLock", "valid boolean"),
    ({"serviceAccount": "x"}, "pod.serviceAccount", "unknown key"),
])
def test_bad_pod_settings_name_the_field(pod, field, hint):
    with pytest.raises(SpecError) as error:
        parse_spec(BASE | {"pod": pod}, ExperimentSpec, "values.yaml")
    assert f"values.yaml: {field}: " in str(error.value) and hint in str(error.value), str(error.value)


@pytest.mark.parametrize("scheduling, field", [
    ({"affinity": {"nodeAfinity": {}}}, "scheduling.affinity.nodeAfinity"),
    ({"affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 101, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}}},
     "scheduling.affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution.0.weight"),
    ({"affinity": {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}}},
     "scheduling.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution.0.topologyKey"),
    ({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "Sometimes"}]},
     "scheduling.topologySpreadConstraints.0.whenUnsatisfiable"),
    ({"tolerations": [{"key": "a", "effect": "NoSchedulez"}]}, "scheduling.tolerations.0.effect"),
])
def test_bad_scheduling_names_the_field(scheduling, field):
    with pytest.raises(SpecError, match=f"values.yaml: {field}: "):
        parse_spec(BASE | {"scheduling": scheduling}, ExperimentSpec, "values.yaml")


def test_the_crd_schema_takes_the_settings_and_refuses_a_misspelt_one():
    """The Experiment CRD's structural schema (generated from the same models) accepts every setting and, as
    `kubectl apply --validate=strict` would, refuses a misspelt affinity key."""
    good = {"apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "exp"}, "spec": SETTINGS}
    validate_object(json.loads(json.dumps(good)))
    bad = json.loads(json.dumps(good))
    bad["spec"]["scheduling"]["affinity"]["nodeAffinity"]["requiredDuringScheduling"] = {}
    validator = crd_validators()[("ttrv.io/v1alpha1", "Experiment")]
    assert [".".join(map(str, e.absolute_path)) for e in validator.iter_errors(bad)] == [
        "spec.scheduling.affinity.nodeAffinity"]


def test_the_ttrv_chart_passes_the_settings_through(tmp_path):
    """`helm template` of an example with every setting: the Experiment is valid, its spec is the one given, and
    what the operator builds from it carries them; values.schema.json refuses a misspelt one."""
    values = tmp_path / "pod.yaml"
    values.write_text(yaml.safe_dump({"image": SETTINGS["image"], "scheduling": SETTINGS["scheduling"], "pod": POD}))
    (experiment,) = helm_template("ttrv", "rel", "-f", "examples/values-one-gpu.yaml", "-f", str(values))
    validate_object(experiment)
    spec = parse_spec(experiment["spec"], ExperimentSpec)
    assert spec.pod == ExperimentSpec.model_validate(SETTINGS).pod
    assert spec.scheduling.affinity == ExperimentSpec.model_validate(SETTINGS).scheduling.affinity
    for obj in experiment_objects(experiment["metadata"], spec, "pytorchjob"):
        validate_object(obj)
    result = helm("template", "rel", "charts/ttrv", "-f", "examples/values-one-gpu.yaml", "-f", str(values),
                  "--set", "pod.ipcLok=true", check=False)
    assert result.returncode != 0 and "ipcLok" in result.stderr, result.stderr



# --- docs/kubernetes.md, "Pod settings" ---------------------------------------------------------------------------

DOCS = ROOT / "docs/kubernetes.md"
TABLE_BEGIN = "<!-- pod-settings:begin (generated from ttrv.spec; tests/test_pod_settings.py checks it) -->"
TABLE_END = "<!-- pod-settings:end -->"
DOCUMENTED = ("image.pullSecrets", "scheduling.tolerations", "scheduling.affinity", "scheduling.topologySpreadConstraints",
              "pod.")


def pod_settings_table() -> str:
    """The docs' table of the pod settings: the README's spec table (ttrv.docs, RunSpec only) has no room for the
    Experiment's cluster fields."""
    from ttrv.docs import _rows

    rows = [row for row in _rows(ExperimentSpec) if row.split("`")[1].startswith(DOCUMENTED)]
    return "\n".join([TABLE_BEGIN, "| field | default | meaning |", "| --- | --- | --- |", *rows, TABLE_END])


def test_docs_table_of_pod_settings_is_generated_from_the_models():
    text = DOCS.read_text()
    current = text[text.index(TABLE_BEGIN):text.index(TABLE_END) + len(TABLE_END)]
    assert current == pod_settings_table(), "docs/kubernetes.md's pod settings table is stale: regenerate it " \
                                            "(tests/test_pod_settings.py pod_settings_table)"
    assert len(current.splitlines()) == 3 + 4 + len(ExperimentSpec.model_fields["pod"].annotation.model_fields) + 1


def test_docs_example_of_pod_settings_is_valid_and_renders():
    text = DOCS.read_text().split("#### Pod settings", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    settings = yaml.safe_load(block)
    assert set(settings) == {"image", "scheduling", "pod"}
    spec = parse_spec(BASE | settings, ExperimentSpec, "docs/kubernetes.md")
    assert spec.pod.ipc_lock and spec.pod.env[0].value_from.secret_key_ref.name == "hf-token"
    for api in ("trainjob", "pytorchjob"):
        objects(BASE | settings, api)


@pytest.mark.parametrize("api", [None, "auto", "trainjob"])
def test_the_ttrv_chart_refuses_topology_spread_without_pytorchjob(tmp_path, api):
    """The chart's own check (charts/ttrv/templates/_helpers.tpl) says at `helm install` what the operator would
    say; unset, trainerApi is the model's default, which the template states."""
    assert SchedulingSpec().trainer_api == "auto"
    scheduling = {"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "zone",
                                                 "whenUnsatisfiable": "DoNotSchedule"}]}
    values = tmp_path / "spread.yaml"
    values.write_text(yaml.safe_dump({"scheduling": scheduling | ({"trainerApi": api} if api else {})}))
    example = "examples/values-tiny-shapes.yaml"  # sets no trainerApi
    assert "trainerApi" not in (ROOT / example).read_text()
    result = helm("template", "rel", "charts/ttrv", "-f", example, "-f", str(values), check=False)
    assert result.returncode != 0 and result.stdout == ""
    assert f"topologySpreadConstraints need trainerApi: pytorchjob (it is {api or 'auto'})" in result.stderr
    values.write_text(yaml.safe_dump({"scheduling": scheduling | {"trainerApi": "pytorchjob"}}))
    (experiment,) = helm_template("ttrv", "rel", "-f", example, "-f", str(values))
    parse_spec(experiment["spec"], ExperimentSpec)
