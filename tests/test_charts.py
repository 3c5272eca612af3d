"""Both Helm charts, rendered by the real helm binary: lint, every object valid, least-privilege RBAC, restricted
pods. Bad values are in the bad-input catalogue (tests/bad_inputs/test_chart_values.py)."""

from __future__ import annotations

import shutil

import pytest
import yaml
from k8s_util import (
    ROOT,
    credential_problems,
    helm,
    helm_template,
    pod_templates,
    security_problems,
    validate_object,
)

from ttrv.manifests import TRAINER_APIS, experiment_objects, training_runtime
from ttrv.spec import ExperimentSpec, RolloutSpec, load_experiment, parse_spec

VALUES = sorted(p.name for p in (ROOT / "examples").glob("values-*.yaml"))
OPERATOR_VARIANTS = {
    "defaults": [],
    "everything": ["--set", "minio.enabled=true", "--set", "minio.teams={team-a,team-b}", "--set", "kueue.enabled=true",
                   "--set", "metrics.serviceMonitor.enabled=true", "--set", "trainer.runtime.create=true"],
    "namespaced-runtime": ["--set", "trainer.runtime.kind=TrainingRuntime", "--set", "trainer.runtime.create=true",
                           "--set", "trainer.runtime.namespaces={team-a,team-b}"],
    # A namespaced install with two peering replicas (tests/test_tenancy.py checks what it grants).
    "namespaced-peering": ["--set", "watchNamespaces={team-a,team-b}", "--set", "replicas=2",
                           "--set", "kueue.enabled=true", "--set", "trainer.runtime.create=true"],
}


def test_values_examples_match_experiment_examples():
    assert [v.removeprefix("values-") for v in VALUES] == [
        p.name.removeprefix("experiment-") for p in sorted((ROOT / "examples").glob("experiment-*.yaml"))]


@pytest.mark.parametrize("values", VALUES)
def test_lint_ttrv_chart(values):
    helm("lint", "--strict", "charts/ttrv", "-f", f"examples/{values}")


@pytest.mark.parametrize("variant", sorted(OPERATOR_VARIANTS))
def test_lint_operator_chart(variant):
    helm("lint", "--strict", "charts/ttrv-operator", *OPERATOR_VARIANTS[variant])


@pytest.mark.parametrize("values", VALUES)
def test_ttrv_chart_renders_the_example_experiment(values):
    (experiment,) = helm_template("ttrv", "rel", "-f", f"examples/{values}")
    validate_object(experiment)
    metadata, spec = load_experiment(ROOT / "examples" / values.replace("values-", "experiment-"))
    assert experiment["metadata"]["name"] == metadata["name"]
    assert experiment["metadata"]["namespace"] == "team-a"
    assert parse_spec(experiment["spec"], ExperimentSpec) == spec
    # What the operator makes of the installed Experiment is valid and restricted too, with either trainer API.
    for api in TRAINER_APIS:
        for obj in experiment_objects(experiment["metadata"], spec, api):
            validate_object(obj)
            for where, template in pod_templates(obj):
                assert security_problems(where, template) == []


def test_release_name_names_the_experiment_by_default():
    values = yaml.safe_load((ROOT / "examples/values-one-gpu.yaml").read_text())
    assert values.pop("nameOverride") == "one-gpu"
    (experiment,) = helm_template("ttrv", "my-exp", "-f", "examples/values-one-gpu.yaml", "--set", "nameOverride=",
                                  "--set", "experimentLabels.team=a")
    assert experiment["metadata"]["name"] == "my-exp"
    assert experiment["metadata"]["labels"]["team"] == "a"
    assert experiment["spec"] == values


@pytest.mark.parametrize("variant", sorted(OPERATOR_VARIANTS))
def test_operator_chart_objects_are_valid_and_restricted(variant):
    objects = helm_template("ttrv-operator", "ttrv-operator", "--include-crds", *OPERATOR_VARIANTS[variant],
                            namespace="ttrv-system")
    for obj in objects:
        validate_object(obj)
        for where, template in pod_templates(obj):
            assert security_problems(where, template) == []
    crds = {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == "CustomResourceDefinition"
            and obj["spec"]["group"] == "ttrv.io"}  # and kopf's peering CRDs (crds/kopf.dev_peerings.yaml)
    committed = {crd["metadata"]["name"]: crd for crd in (yaml.safe_load((ROOT / "k8s/crds" / f).read_text())
                                                          for f in ("ttrv.io_experiments.yaml",
                                                                    "ttrv.io_adaptationruns.yaml"))}
    assert crds == committed


def test_operator_runs_the_agreed_module():
    objects = helm_template("ttrv-operator", "ttrv-operator", namespace="ttrv-system")
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/ttrv/ttrv-operator:0.1.0"
    assert container["command"][:2] == ["kopf", "run"]
    assert "--all-namespaces" in container["command"]
    assert container["command"][-2:] == ["-m", "operators.ttrv_operator"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "ttrv-operator"
    service = next(obj for obj in objects if obj["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


# --- RBAC -------------------------------------------------------------------------------------------------------

# Where each kind the builders create lives in the API.
RESOURCES = {
    "AdaptationRun": ("ttrv.io", "adaptationruns"),
    "ConfigMap": ("", "configmaps"),
    "Deployment": ("apps", "deployments"),
    "Service": ("", "services"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "PyTorchJob": ("kubeflow.org", "pytorchjobs"),
    "TrainJob": ("trainer.kubeflow.org", "trainjobs"),
    "ServiceAccount": ("", "serviceaccounts"),
    "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "TrainingRuntime": ("trainer.kubeflow.org", "trainingruntimes"),  # a run's own, with its rollout (gang)
}
MANAGE = {"get", "list", "watch", "create", "patch", "delete"}
READ = {"get", "list", "watch"}
FIXED = {  # what the operator needs besides the objects it creates
    ("ttrv.io", "experiments"): READ | {"patch"},
    ("ttrv.io", "experiments/status"): {"get", "patch"},
    ("ttrv.io", "adaptationruns/status"): {"get", "patch"},
    ("ttrv.io", "experiments/finalizers"): {"update"},
    ("ttrv.io", "adaptationruns/finalizers"): {"update"},
    ("", "pods"): READ,
    ("", "events"): {"create"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
KUEUE = {("kueue.x-k8s.io", "workloads"): READ, ("kueue.x-k8s.io", "localqueues"): READ}


def granted(kueue: bool) -> dict[tuple[str, str], set[str]]:
    args = ["--set", "kueue.enabled=true"] if kueue else []
    objects = helm_template("ttrv-operator", "ttrv-operator", *args, namespace="ttrv-system")
    roles = [obj for obj in objects if obj["kind"] in ("ClusterRole", "Role")]
    assert len(roles) == 1
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in roles[0]["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize("kueue", [False, True])
def test_rbac_grants_exactly_what_the_operator_creates_and_reads(kueue):
    spec = ExperimentSpec.model_validate({
        "storage": {"uri": "s3://b"}, "rollout": {"backend": "service"}, "datasets": [{"name": "d", "path": "x"}]})
    created = {obj["kind"] for api in TRAINER_APIS
               for obj in experiment_objects({"name": "e", "namespace": "n"}, spec, api)}
    assert created == set(RESOURCES), "a builder makes a new kind: give it a rule in the ClusterRole and here"
    expected = {RESOURCES[kind]: MANAGE for kind in created} | FIXED | (KUEUE if kueue else {})
    grants = granted(kueue)
    assert all("*" not in (group + resource + "".join(verbs)) for (group, resource), verbs in grants.items())
    assert grants == expected


def test_rbac_binds_the_operator_service_account():
    objects = helm_template("ttrv-operator", "ops", namespace="ttrv-system")
    (binding,) = [obj for obj in objects if obj["kind"] == "ClusterRoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "ops"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ops", "namespace": "ttrv-system"}]


# --- MinIO ------------------------------------------------------------------------------------------------------

def test_minio_credentials_are_generated_kept_and_only_referenced():
    first, second = (helm_template("ttrv-operator", "ttrv-operator", "--set", "minio.enabled=true",
                                   namespace="ttrv-system") for _ in range(2))
    secrets = [next(obj for obj in objs if obj["kind"] == "Secret") for objs in (first, second)]
    assert secrets[0]["data"] != secrets[1]["data"]  # random per install (lookup keeps them across upgrades)
    assert secrets[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert set(secrets[0]["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    text = yaml.safe_dump_all(obj for obj in first if obj["kind"] != "Secret")
    for value in secrets[0]["data"].values():
        assert value not in text
    assert [problem for obj in first for problem in credential_problems(obj)] == []


# --- bad values -------------------------------------------------------------------------------------------------

def template_error(*args: str) -> str:
    result = helm("template", "rel", "charts/ttrv", *args, check=False)
    assert result.returncode != 0, f"helm accepted {args}"
    return result.stderr


def test_group_size_check_uses_the_models_defaults():
    """The template states RolloutSpec's defaults for unset keys; this fails when they drift apart."""
    defaults = RolloutSpec()
    base = ("--set", "storage.uri=s3://b", "--set", "datasets[0].name=d", "--set", "datasets[0].path=x")
    assert f"({defaults.votes + 1}) > rollout.votes ({defaults.votes})" in template_error(
        *base, "--set", f"rollout.groupSize={defaults.votes + 1}")
    helm("template", "rel", "charts/ttrv", *base, "--set", f"rollout.groupSize={defaults.votes}")
    assert f"({defaults.group_size}) > rollout.votes ({defaults.group_size - 1})" in template_error(
        *base, "--set", f"rollout.votes={defaults.group_size - 1}")
    helm("template", "rel", "charts/ttrv", *base, "--set", f"rollout.votes={defaults.group_size}")


# --- NOTES.txt --------------------------------------------------------------------------------------------------

def rendered_notes(tmp_path, chart: str, *args: str, namespace: str) -> str:
    """NOTES.txt as `helm install` prints it: helm template skips NOTES, so render it as an ordinary file."""
    copy = tmp_path / chart
    shutil.copytree(ROOT / "charts" / chart, copy)
    notes = copy / "templates/NOTES.txt"
    (copy / "templates/_notes.tpl").write_text('{{- define "notes" -}}\n' + notes.read_text() + "{{- end -}}\n")
    notes.unlink()
    (copy / "templates/notes.yaml").write_text('notes: |\n{{ include "notes" . | indent 2 }}\n')
    out = helm("template", "rel", str(copy), "--namespace", namespace, "--show-only", "templates/notes.yaml",
               *args).stdout
    return yaml.safe_load(out)["notes"]


def test_notes_give_the_exact_commands(tmp_path):
    notes = rendered_notes(tmp_path, "ttrv", "-f", str(ROOT / "examples/values-sixteen-kueue.yaml"),
                           namespace="team-a")
    for command in [
        "kubectl -n team-a get experiments.ttrv.io sixteen -w",
        "kubectl -n team-a get adaptationruns -l ttrv.io/experiment=sixteen -o wide",
        "kubectl -n team-a describe experiments.ttrv.io sixteen",
        "kubectl -n team-a get trainjobs,deployments,pods -l ttrv.io/experiment=sixteen,ttrv.io/dataset=imagenet-a",
        "Workload is named trainjob-<run>-trainer-",
        "kubectl -n team-a logs -f -l ttrv.io/experiment=sixteen,ttrv.io/dataset=imagenet-a,"
        "app.kubernetes.io/component=trainer --max-log-requests=32",
        "app.kubernetes.io/component=rollout",
        "kubectl -n team-a get localqueue gpu-a",
        "helm -n team-a uninstall rel",
    ]:
        assert command in notes, f"{command!r} missing from:\n{notes}"
    assert "16" in notes.splitlines()[0] and "at most 4 at once" in notes.splitlines()[0]


def test_notes_state_the_models_defaults(tmp_path):
    notes = rendered_notes(tmp_path, "ttrv", "-f", str(ROOT / "examples/values-one-gpu.yaml"), namespace="team-a")
    default_parallel = ExperimentSpec.model_fields["max_parallel_runs"].default
    assert f"one adaptation run per dataset (1), at most {default_parallel} at once" in notes
    assert ("component=rollout" in notes) == (RolloutSpec().backend == "service")
    assert "Kueue" not in notes


def test_notes_selectors_match_the_pods(tmp_path):
    spec_path = ROOT / "examples/experiment-sixteen-kueue.yaml"
    metadata, spec = load_experiment(spec_path)
    pods = [template for obj in experiment_objects(metadata, spec) for _, template in pod_templates(obj)
            if obj["metadata"]["labels"]["ttrv.io/dataset"] == "imagenet-a"]
    labels = pods[0]["metadata"]["labels"]
    assert labels["ttrv.io/experiment"] == "sixteen" and labels["ttrv.io/dataset"] == "imagenet-a"
    assert {p["metadata"]["labels"]["app.kubernetes.io/component"] for p in pods} == {"trainer", "rollout"}


def test_operator_notes_show_how_to_share_minio_credentials(tmp_path):
    """Each team gets its own user's credentials; MinIO's root credentials are never handed out."""
    notes = rendered_notes(tmp_path, "ttrv-operator", "--set", "minio.enabled=true", "--set", "minio.teams={team-a}",
                           namespace="ttrv-system")
    assert "http://rel-minio.ttrv-system.svc:9000" in notes
    assert "kubectl -n team-a create secret generic ttrv-s3" in notes
    assert "$(kubectl -n ttrv-system get secret rel-minio-team-a -o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d)" in notes
    assert "get secret rel-minio " not in notes
    without_teams = rendered_notes(tmp_path / "none", "ttrv-operator", "--set", "minio.enabled=true",
                                   namespace="ttrv-system")
    assert "minio.teams" in without_teams and "get secret" not in without_teams


@pytest.mark.parametrize("variant", sorted(OPERATOR_VARIANTS))
def test_operator_holds_no_store_credentials(variant):
    """The operator reads progress from the runs' status (operators/progress.py): no variant hands it an object
    store's credentials or endpoint, not even with the bundled MinIO."""
    objects = helm_template("ttrv-operator", "ttrv-operator", "--set", "minio.enabled=true",
                            *OPERATOR_VARIANTS[variant], namespace="ttrv-system")
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [item["name"] for item in container["env"] if item["name"].startswith("AWS_")] == []
    assert "envFrom" not in container


def test_operator_reads_every_setting_the_chart_gives_it():
    import operators.ttrv_operator

    objects = helm_template("ttrv-operator", "ttrv-operator", namespace="ttrv-system")
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    names = {item["name"] for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = {name for name in names if name.startswith("TTRV_")}
    assert settings == {"TTRV_LOG_LEVEL", "TTRV_METRICS_PORT", "TTRV_KUEUE_ENABLED", "TTRV_POLL_SECONDS",
                        "TTRV_TRAINER_API", "TTRV_TRAINING_RUNTIME_KIND", "TTRV_TRAINING_RUNTIME_NAME",
                        "TTRV_WATCH_NAMESPACES", "TTRV_PEERING_LIFETIME"}
    for name in settings:
        assert name in operators.ttrv_operator.__doc__, f"{name} is set by the chart but not documented as read"


# --- the training runtime ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, served, expected", [
    ([], [], []),  # no Trainer v2 in the cluster: nothing a helm install would fail on
    ([], ["trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime"], [("ClusterTrainingRuntime", None)]),
    (["--set", "trainer.runtime.create=true"], [], [("ClusterTrainingRuntime", None)]),
    (["--set", "trainer.runtime.create=false"], ["trainer.kubeflow.org/v1alpha1/ClusterTrainingRuntime"], []),
    (["--set", "trainer.runtime.kind=TrainingRuntime"], ["trainer.kubeflow.org/v1alpha1/TrainingRuntime"],
     [("TrainingRuntime", "ttrv-system")]),
    (["--set", "trainer.runtime.kind=TrainingRuntime", "--set", "trainer.runtime.namespaces={a,b}",
      "--set", "trainer.runtime.create=true"], [], [("TrainingRuntime", "a"), ("TrainingRuntime", "b")]),
])
def test_operator_chart_ships_the_runtime_the_builders_make(args, served, expected):
    """The chart's runtime is ttrv.manifests.training_runtime, field for field (the builders' TrainJobs reference
    it by kind and name), and it is installed only where the cluster serves its kind, unless forced."""
    api_versions = [arg for version in served for arg in ("--api-versions", version)]
    objects = helm_template("ttrv-operator", "ttrv-operator", *args, *api_versions, namespace="ttrv-system")
    runtimes = [obj for obj in objects if obj["kind"] in ("ClusterTrainingRuntime", "TrainingRuntime")]
    assert [(obj["kind"], obj["metadata"].get("namespace")) for obj in runtimes] == expected
    for runtime in runtimes:
        validate_object(runtime)
        built = training_runtime(runtime["kind"], "ttrv-trainer", runtime["metadata"].get("namespace"))
        assert runtime["spec"] == built["spec"]
        assert runtime["metadata"]["labels"].items() >= built["metadata"]["labels"].items()


def test_a_wrong_runtime_kind_fails_naming_the_value():
    result = helm("template", "x", "charts/ttrv-operator", "--set", "trainer.runtime.kind=Runtime", check=False)
    assert result.returncode != 0
    # values.schema.json refuses it before the template's own check would.
    assert "trainer.runtime.kind" in result.stderr and '"ClusterTrainingRuntime", "TrainingRuntime"' in result.stderr
