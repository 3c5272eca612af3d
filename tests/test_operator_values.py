"""The operator chart's values.schema.json: strict, so a misspelt value fails `helm template` / `helm install`
loudly (`--set kueue.enable=true` was silently ignored), while values.yaml and every override the docs show pass.

The schema is written by hand: the operator reads its settings from the environment the chart sets
(operators/ttrv_operator.py), no model of them exists to generate it from. So the tests tie it to values.yaml:
every key there must be in the schema, and every object of the schema refuses unknown keys."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from k8s_util import ROOT, helm, helm_template, validate_object

CHART = ROOT / "charts/ttrv-operator"
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _missing(values, schema: dict, path: str) -> list[str]:
    """Keys of `values` (recursively) that `schema` does not declare."""
    missing = []
    if isinstance(values, dict):
        for key, value in values.items():
            where = f"{path}.{key}" if path else key
            child = schema.get("properties", {}).get(key)
            if child is None:
                if not isinstance(schema.get("additionalProperties"), dict):
                    missing.append(where)
                continue
            missing += _missing(value, child, where)
    elif isinstance(values, list):
        missing += [found for index, item in enumerate(values)
                    for found in _missing(item, schema.get("items", {}), f"{path}[{index}]")]
    return missing


def test_every_key_of_values_yaml_is_in_the_schema():
    assert _missing(VALUES, SCHEMA, "") == []


def test_the_key_walk_finds_an_undeclared_key():
    assert _missing({"kueue": {"enabled": True, "enable": True}, "nodeSelector": {"any": "x"}}, SCHEMA, "") == [
        "kueue.enable"]


def _open_objects(node: dict, path: str = "(root)") -> list[str]:
    """Objects with declared properties that still take unknown keys."""
    found = []
    if "properties" in node:
        if node.get("additionalProperties") is not False:
            found.append(path)
        for name, child in node["properties"].items():
            found += _open_objects(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _open_objects(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _open_objects(node["additionalProperties"], f"{path}.*")
    return found


def test_every_object_of_the_schema_refuses_unknown_keys():
    assert _open_objects(SCHEMA) == []


def _documented_overrides() -> list[str]:
    """Every `--set KEY=VALUE` of the operator chart that the docs show (a key under one of its values)."""
    text = (ROOT / "docs/kubernetes.md").read_text() + (ROOT / "README.md").read_text()
    found = []
    for key, value in re.findall(r"--set ([A-Za-z][\w.]*)=([^\s`]+)", text):
        if key.split(".")[0] in SCHEMA["properties"] and not key.startswith(("datasets", "storage")):
            found.append(f"{key}={'ttrv-store' if value == '...' else value}")
    return sorted(set(found))


def test_the_docs_show_overrides():
    assert {"kueue.enabled=true", "minio.enabled=true", "trainer.api=pytorchjob"} <= set(_documented_overrides())


@pytest.mark.parametrize("override", [None, *_documented_overrides()])
def test_defaults_and_documented_overrides_pass(override):
    args = ["--set", override] if override else []
    for obj in helm_template("ttrv-operator", "ttrv-operator", *args, namespace="ttrv-system"):
        validate_object(obj)


@pytest.mark.parametrize("args, message", [
    (["--set", "kueue.enable=true"], "kueue: Additional property enable is not allowed"),
    (["--set", "kueu.enabled=true"], "(root): Additional property kueu is not allowed"),
    (["--set", "minio.resources.request.cpu=1"], "minio.resources: Additional property request is not allowed"),
    (["--set", "metrics.serviceMonitor.enable=true"],
     "metrics.serviceMonitor: Additional property enable is not allowed"),
    (["--set", "trainer.runtime.namespace=team-a"], "trainer.runtime: Additional property namespace is not allowed"),
    (["--set", "trainer.api=TrainJob"], "trainer.api: trainer.api must be one of the following"),
    (["--set", "kueue.enabled=yes"], "kueue.enabled: Invalid type. Expected: boolean, given: string"),
    (["--set", "metrics.port=http"], "metrics.port: Invalid type. Expected: integer, given: string"),
    (["--set", "logLevel=verbose"], "logLevel: logLevel must be one of the following"),
    (["--set", "pollSeconds=0"], "pollSeconds: Must be greater than 0"),
    (["--set", "minio.storage=lots"], "minio.storage"),
    (["--set-json", 'imagePullSecrets=[{"nam": "regcred"}]'], "imagePullSecrets.0"),
])
def test_a_misspelt_or_wrong_value_fails_loudly_and_renders_nothing(args, message):
    result = helm("template", "ttrv-operator", "charts/ttrv-operator", *args, check=False)
    assert result.returncode != 0 and result.stdout == "", result.stdout[:200]
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr
