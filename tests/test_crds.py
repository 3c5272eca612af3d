"""The generated CRDs and values schema: in sync with ttrv/spec/, structural, and accepted by Kubernetes' schemas."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from k8s_util import K8S_VERSION, ROOT, crd_validators, validate_object

from ttrv.crds import crds, structural, structural_problems, values_schema_json
from ttrv.manifests import resource_dump
from ttrv.spec import AdaptationRunStatus, Condition, DatasetStatus, ExperimentStatus

# Pure logic, no process or server: `make test-fast` runs these.
pytestmark = pytest.mark.pure

REGENERATE = "generated from ttrv/spec/ and stale; run `make generate` and commit the result"


@pytest.mark.parametrize("name", sorted(crds()))
def test_committed_crds_match_the_models(name):
    committed = yaml.safe_load((ROOT / "k8s/crds" / name).read_text())
    assert committed == crds()[name], f"k8s/crds/{name} is {REGENERATE}"


@pytest.mark.parametrize("name", sorted(crds()))
def test_operator_chart_carries_the_same_crds(name):
    chart_copy = (ROOT / "charts/ttrv-operator/crds" / name).read_text()
    assert chart_copy == (ROOT / "k8s/crds" / name).read_text(), f"charts/ttrv-operator/crds/{name} is {REGENERATE}"


def test_committed_values_schema_matches_the_model():
    committed = (ROOT / "charts/ttrv/values.schema.json").read_text()
    assert committed == values_schema_json(), f"charts/ttrv/values.schema.json is {REGENERATE}"


def test_cli_writes_the_committed_crds(tmp_path):
    subprocess.run([sys.executable, "-m", "ttrv.cli", "spec", "crds", "--out", str(tmp_path)], check=True, cwd=ROOT)
    for name in crds():
        assert (tmp_path / name).read_text() == (ROOT / "k8s/crds" / name).read_text()


@pytest.mark.parametrize("name", sorted(crds()))
def test_crd_is_a_valid_kubernetes_object(name):
    kubernetes_validate.validate(crds()[name], K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(crds()))
def test_crd_schema_is_structural(name):
    for version in crds()[name]["spec"]["versions"]:
        assert structural_problems(version["schema"]["openAPIV3Schema"]) == []


def test_structural_check_finds_what_the_api_server_rejects():
    problems = structural_problems({
        "type": "object",
        "properties": {
            "a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "b": {"type": "object", "properties": {}, "additionalProperties": {"type": "string"}},
            "c": {"type": "array"},
            "d": {"type": "integer", "title": "D", "const": 1},
            "e": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
        },
    })
    assert problems == [
        ".a: no type",
        ".a: anyOf is only allowed as x-kubernetes-int-or-string's integer-or-string",
        ".b: properties and additionalProperties are mutually exclusive",
        ".c: an array needs items",
        ".d: key 'title' is not allowed in a structural schema",
        ".d: key 'const' is not allowed in a structural schema",
    ]


def test_conversion_inlines_refs_and_expresses_null_and_bounds_the_openapi_way():
    schema = structural({
        "$defs": {"Inner": {"title": "Inner", "type": "object", "additionalProperties": False,
                            "properties": {"n": {"type": "integer", "exclusiveMinimum": 0, "default": 3,
                                                 "description": "How many."}}}},
        "type": "object",
        "properties": {
            "inner": {"$ref": "#/$defs/Inner", "description": "The inner part."},
            "maybe": {"anyOf": [{"type": "string", "enum": ["x", "y"]}, {"type": "null"}], "default": None},
            "fixed": {"const": "only"},
        },
    })
    assert schema == {
        "type": "object",
        "properties": {
            "inner": {"type": "object", "description": "The inner part.", "properties": {
                "n": {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "description": "How many. Default: 3."},
            }},
            "maybe": {"type": "string", "enum": ["x", "y"], "nullable": True},
            "fixed": {"enum": ["only"], "type": "string"},
        },
    }


def _version(name: str) -> dict:
    return crds()[name]["spec"]["versions"][0]


def _has_path(schema: dict, json_path: str) -> bool:
    node = schema
    for part in json_path.strip(".").split("."):
        if part in ("metadata",) and node is schema:
            return True
        node = node.get("properties", {}).get(part)
        if node is None:
            return False
    return True


@pytest.mark.parametrize("name", sorted(crds()))
def test_printer_columns_point_at_schema_fields(name):
    version = _version(name)
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        assert _has_path(schema, column["jsonPath"]), f"{column['name']}: {column['jsonPath']} is not in the schema"


def test_names_short_names_and_columns():
    experiment = crds()["ttrv.io_experiments.yaml"]
    run = crds()["ttrv.io_adaptationruns.yaml"]
    assert experiment["metadata"]["name"] == "experiments.ttrv.io"
    assert experiment["spec"]["names"]["shortNames"] == ["ttrvx"]
    assert run["spec"]["names"]["shortNames"] == ["arun"]
    assert [c["name"] for c in _version("ttrv.io_experiments.yaml")["additionalPrinterColumns"]] == [
        "Phase", "Running", "Done", "Failed", "Total", "Progress", "Base", "Accuracy", "Age"]
    assert [c["name"] for c in _version("ttrv.io_adaptationruns.yaml")["additionalPrinterColumns"]] == [
        "Dataset", "Phase", "Reason", "Trainer", "Stage", "Progress", "Step", "Eval", "ETA", "Base", "Accuracy",
        "Weights", "Restarts", "Age"]
    for crd in (experiment, run):
        assert crd["spec"]["versions"][0]["subresources"] == {"status": {}}


def _experiment(**status) -> dict:
    return {
        "apiVersion": "ttrv.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "exp", "namespace": "a"},
        "spec": {"datasets": [{"name": "d", "path": "ttrv://tiny-shapes/test"}]}, **status,
    }


def test_status_written_by_the_operator_passes_the_schema():
    status = ExperimentStatus(
        phase="Running", datasets_total=2, datasets_done=1, progress=75.0, base_accuracy=0.4, accuracy=0.55,
        datasets=[DatasetStatus(name="d", run="exp-d", phase="Succeeded", progress=100.0, accuracy=0.55),
                  DatasetStatus(name="e")],
        conditions=[Condition(type="Ready", status="False", reason="RunsActive",
                              last_transition_time="2026-01-01T00:00:00Z")],
    )
    validate_object(_experiment(status=resource_dump(status)))
    run_status = AdaptationRunStatus(phase="Queued", step=3, total_steps=10, progress=30.0, restarts=1)
    run = {"apiVersion": "ttrv.io/v1alpha1", "kind": "AdaptationRun", "metadata": {"name": "exp-d"},
           "spec": {"experiment": "exp", "dataset": "d", "run": {"data": {"path": "x"}}},
           "status": resource_dump(run_status)}
    validate_object(run)


@pytest.mark.parametrize("bad, field", [
    ({"spec": {"datasets": []}}, "datasets"),
    ({"spec": {"datasets": [{"name": "D", "path": "x"}]}}, "name"),
    ({"spec": {"datasets": [{"name": "d", "path": "x"}], "rollout": {"vote": 3}}}, "vote"),
    ({"spec": {"datasets": [{"name": "d", "path": "x"}], "rollout": {"votes": 1}}}, "votes"),
    ({"spec": {"datasets": [{"name": "d", "path": "x"}], "scheduling": {"tolerations": [{"effect": None}]}}},
     "effect"),
    ({"status": {"progress": 150}}, "progress"),
    ({"status": {"phase": "Done"}}, "phase"),
])
def test_schema_rejects_what_the_models_reject(bad, field):
    with pytest.raises(AssertionError, match=field):
        validate_object(_experiment() | bad)


def test_explicit_null_that_means_something_is_accepted():
    validate_object(_experiment() | {"spec": {"datasets": [{"name": "d", "path": "x", "subsetSize": None}]}})


# sha256 of ../shared/k8s-crds/kubeflow.org_pytorchjobs.yaml, the training operator's CRD the project was given.
PYTORCHJOB_CRD_SHA256 = "eb80e57a984cdc7ceefaaf3fc561e21b673c30cbb58589f2389528d2b2760d22"


def test_vendored_pytorchjob_crd_is_the_given_one_unchanged():
    """Checked by its digest, so that a clone without ../shared (CI's) checks it too; beside ../shared, also
    against that file."""
    vendored = (ROOT / "k8s/vendor/kubeflow.org_pytorchjobs.yaml").read_bytes()
    assert hashlib.sha256(vendored).hexdigest() == PYTORCHJOB_CRD_SHA256
    shared = ROOT.parent / "shared" / "k8s-crds" / "kubeflow.org_pytorchjobs.yaml"
    if shared.exists():
        assert vendored == shared.read_bytes()


# sha256 of kubeflow/trainer's CRDs as given in ../shared/k8s-crds/ (main at 8c0f505, after v2.3.0).
TRAINER_CRD_SHA256 = {
    "trainer.kubeflow.org_trainjobs.yaml": "b04c5e3f7480ea3b38e9b557cf4f5817be19dceb2f52ae580397184f9f95468f",
    "trainer.kubeflow.org_clustertrainingruntimes.yaml":
        "3669c2bd23f6f3f371743a8913cca1aabfaec16bbe85d2f51cdd903f1e68bb65",
    "trainer.kubeflow.org_trainingruntimes.yaml": "4dc9b8e0f6fff0bfd6b406c411774a12e39427887e51d294abdb8004f918b431",
}


@pytest.mark.parametrize("name", sorted(TRAINER_CRD_SHA256))
def test_vendored_trainer_crds_are_the_given_ones_unchanged(name):
    vendored = (ROOT / "k8s/vendor" / name).read_bytes()
    assert hashlib.sha256(vendored).hexdigest() == TRAINER_CRD_SHA256[name]
    shared = ROOT.parent / "shared" / "k8s-crds" / name
    if shared.exists():
        assert vendored == shared.read_bytes()


def test_every_crd_in_the_repo_has_a_validator():
    assert {kind for _, kind in crd_validators()} == {
        "Experiment", "AdaptationRun", "PyTorchJob", "ServiceMonitor", "PodMonitor", "TrainJob", "TrainingRuntime",
        "ClusterTrainingRuntime"}


def test_values_schema_is_json_schema_with_chart_keys():
    schema = json.loads(values_schema_json())
    assert schema["required"] == ["datasets"]
    assert schema["additionalProperties"] is False
    assert {"nameOverride", "experimentLabels", "experimentAnnotations"} <= set(schema["properties"])

    def titles(node):
        if isinstance(node, dict):
            yield from (key for key, value in node.items() if key == "title" and isinstance(value, str))
            for value in node.values():
                yield from titles(value)
        elif isinstance(node, list):
            for value in node:
                yield from titles(value)

    assert list(titles(schema)) == []
