"""CustomResourceDefinitions and the ttrv chart's values schema, generated from the pydantic models in spec.py.

Pydantic writes JSON Schema (draft 2020-12); the API server wants a *structural* OpenAPI v3 schema: every node
typed, no `$ref`, no `anyOf` over types, `nullable` instead of a null type, a boolean `exclusiveMinimum`, no
`additionalProperties: false` (unknown fields are pruned, and `kubectl apply` rejects them under strict field
validation). `structural()` converts, `structural_problems()` checks the result, and `make generate` writes
k8s/crds/ and charts/*/ from here; tests fail when the committed files drift.
"""

from __future__ import annotations

import copy
import json
from typing import Any, get_args

from pydantic import BaseModel

from ttrv.labels import APP, NAME_LABEL
from ttrv.spec import (
    NAME_PATTERN,
    AdaptationRunSpec,
    AdaptationRunStatus,
    ExperimentPhase,
    ExperimentSpec,
    ExperimentStatus,
    RunPhase,
    RunStage,
)

GROUP = "ttrv.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Keys the API server's JSONSchemaProps knows and a structural schema may carry (besides the x-kubernetes-*).
_ALLOWED_KEYS = {
    "type", "description", "anyOf", "properties", "required", "items", "additionalProperties", "enum", "nullable",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "uniqueItems", "format", "multipleOf", "minProperties", "maxProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type", "x-kubernetes-validations",
}


def _resolve(node: dict, defs: dict) -> dict:
    """Inline one `$ref` (pydantic only refers to its own `$defs`); sibling keys such as description win."""
    if "$ref" not in node:
        return node
    target = copy.deepcopy(defs[node["$ref"].removeprefix("#/$defs/")])
    return _resolve(target, defs) | {k: v for k, v in node.items() if k != "$ref"}


def structural(node: dict, defs: dict | None = None) -> dict:
    """A pydantic JSON schema converted to a Kubernetes structural schema (see the module docstring)."""
    defs = node.get("$defs", {}) if defs is None else defs
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    if node.get("x-kubernetes-int-or-string"):
        # The one union a structural schema allows, spelled as controller-gen spells resource.Quantity.
        string = next(option for option in node["anyOf"] if option.get("type") == "string")
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
        out |= {"pattern": string["pattern"]} if "pattern" in string else {}
        out |= {"description": node["description"]} if "description" in node else {}
        return _describe_default(out, node)
    if "anyOf" in node:
        options = [_resolve(option, defs) for option in node["anyOf"]]
        typed = [option for option in options if option.get("type") != "null"]
        if len(typed) != 1:
            raise ValueError(f"cannot express a union of {len(typed)} types as a structural schema: {node}")
        out = structural(typed[0], defs)
        if len(typed) < len(options):
            out["nullable"] = True
        if "description" in node:
            out["description"] = node["description"]
        return _describe_default(out, node)
    for key, value in node.items():
        if key in ("title", "default", "$defs"):
            continue  # defaults are applied by pydantic in the operator, so one source of truth remains
        if key == "properties":
            out["properties"] = {name: structural(child, defs) for name, child in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out["additionalProperties"] = structural(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema's numeric bound is OpenAPI 3.0's bound plus a boolean flag.
            out[key.replace("exclusive", "").lower()] = value
            out[key] = True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        kinds = {type(v).__name__ for v in out["enum"]}
        out["type"] = {"str": "string", "int": "integer", "bool": "boolean", "float": "number"}[kinds.pop()]
    return _describe_default(out, node)


def _describe_default(out: dict, node: dict) -> dict:
    """One-line description, ending with the scalar default: the API server does not default (pydantic in the
    operator does), and `kubectl explain` still shows it."""
    if "description" in out:
        out["description"] = " ".join(out["description"].split())
        if node.get("default") is not None and isinstance(node["default"], (str, int, float, bool)):
            out["description"] += f" Default: {json.dumps(node['default'])}."
    return out


def structural_problems(node: dict, path: str = "") -> list[str]:
    """Why a schema is not structural (empty when it is): the rules of the apiextensions API server."""
    problems = []
    where = path or "(root)"
    for key in node:
        if key not in _ALLOWED_KEYS:
            problems.append(f"{where}: key {key!r} is not allowed in a structural schema")
    if "type" not in node and not (
        node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
    ):
        problems.append(f"{where}: no type")
    if "anyOf" in node and not (node.get("x-kubernetes-int-or-string")
                                and node["anyOf"] == [{"type": "integer"}, {"type": "string"}]):
        problems.append(f"{where}: anyOf is only allowed as x-kubernetes-int-or-string's integer-or-string")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties are mutually exclusive")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{where}: an array needs items")
    for name, child in node.get("properties", {}).items():
        problems += structural_problems(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def _model_schema(model: type[BaseModel]) -> dict:
    return structural(model.model_json_schema(by_alias=True))


def _resource_schema(spec: type[BaseModel], status: type[BaseModel], name_pattern: bool) -> dict:
    metadata: dict[str, Any] = {"type": "object"}
    if name_pattern:
        # Child object names are derived from it, so it must be a DNS label like every name in the spec.
        metadata["properties"] = {"name": {"type": "string", "maxLength": 63, "pattern": NAME_PATTERN}}
    return {
        "type": "object",
        "description": (spec.__doc__ or "").strip(),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": metadata,
            "spec": _model_schema(spec),
            "status": _model_schema(status),
        },
    }


def _column(name: str, json_path: str, kind: str, description: str, priority: int = 0) -> dict:
    column = {"name": name, "type": kind, "jsonPath": json_path, "description": description}
    return column | ({"priority": priority} if priority else {})


def _crd(kind: str, plural: str, short_names: list[str], schema: dict, columns: list[dict]) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "labels": {NAME_LABEL: APP}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["ttrv"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns + [
                    _column("Age", ".metadata.creationTimestamp", "date", "Time since creation"),
                ],
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


def _one_of(literal: Any) -> str:
    """A Literal's values as prose ("A, B or C"): the column's description says what the spec's type allows."""
    values = get_args(literal)
    return f"{', '.join(values[:-1])} or {values[-1]}"


def _accuracy_columns(base: str, adapted: str, base_priority: int) -> list[dict]:
    return [_column("Base", ".status.baseAccuracy", "number", base, priority=base_priority),
            _column("Accuracy", ".status.accuracy", "number", adapted)]


def experiment_crd() -> dict:
    return _crd("Experiment", "experiments", ["ttrvx"], _resource_schema(ExperimentSpec, ExperimentStatus, True), [
        _column("Phase", ".status.phase", "string", _one_of(ExperimentPhase)),
        _column("Running", ".status.datasetsRunning", "integer", "Datasets whose trainer is running"),
        _column("Done", ".status.datasetsDone", "integer", "Datasets whose run finished"),
        _column("Failed", ".status.datasetsFailed", "integer", "Datasets whose run failed"),
        _column("Total", ".status.datasetsTotal", "integer", "Datasets in the experiment"),
        _column("Progress", ".status.progress", "number", "Mean progress of the datasets, percent"),
        *_accuracy_columns("Mean accuracy of the base model", "Mean accuracy of the adapted models", base_priority=0),
    ])


def adaptation_run_crd() -> dict:
    return _crd(
        "AdaptationRun", "adaptationruns", ["arun"], _resource_schema(AdaptationRunSpec, AdaptationRunStatus, False), [
            _column("Dataset", ".spec.dataset", "string", "Dataset of the run", priority=1),
            _column("Phase", ".status.phase", "string", _one_of(RunPhase)),
            _column("Reason", ".status.reason", "string", "Why the run is in its phase", priority=1),
            _column("Trainer", ".status.trainerApi", "string", "The trainer's API: trainjob or pytorchjob",
                    priority=1),
            _column("Stage", ".status.stage", "string", f"What the running trainer does: {_one_of(RunStage)}"),
            _column("Progress", ".status.progress", "number", "Optimiser steps done, percent"),
            _column("Step", ".status.step", "integer", "Optimiser steps done"),
            _column("Eval", ".status.evalProgress", "number", "Prompts of the evaluation in progress done, percent"),
            _column("ETA", ".status.eta", "string", "Estimated time left"),
            *_accuracy_columns("Accuracy of the base model", "Latest accuracy of the adapted model",
                              base_priority=1),
            _column("Weights", ".status.weightVersion", "integer", "Latest weight version published", priority=1),
            _column("Restarts", ".status.restarts", "integer", "Trainer restarts after retryable failures"),
        ],
    )


def crds() -> dict[str, dict]:
    """File name → CRD object, as committed under k8s/crds/ and charts/ttrv-operator/crds/."""
    return {f"{GROUP}_{crd['spec']['names']['plural']}.yaml": crd for crd in (experiment_crd(), adaptation_run_crd())}


# Keys of the ttrv chart's values that are not part of the Experiment spec.
CHART_ONLY_VALUES = {
    "nameOverride": {
        "type": "string",
        "description": "Name of the Experiment (a DNS label); default: the release name.",
        "pattern": f"({NAME_PATTERN})|^$",
    },
    "experimentLabels": {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "Extra labels on the Experiment resource.",
    },
    "experimentAnnotations": {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "Extra annotations on the Experiment resource.",
    },
}


def values_schema() -> dict:
    """The ttrv chart's values.schema.json: the Experiment spec's JSON schema plus the chart-only keys.

    Plain JSON Schema (Helm validates values with a JSON Schema library), so unions with null and `$ref`s stay
    as pydantic writes them; titles are dropped as noise.
    """
    schema = ExperimentSpec.model_json_schema(by_alias=True)
    overlap = set(CHART_ONLY_VALUES) & set(schema["properties"])
    if overlap:
        raise ValueError(f"chart-only values {sorted(overlap)} shadow Experiment spec fields; rename them")
    schema["properties"] = schema["properties"] | CHART_ONLY_VALUES

    def drop_titles(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: drop_titles(v) for k, v in node.items() if not (k == "title" and isinstance(v, str))}
        if isinstance(node, list):
            return [drop_titles(v) for v in node]
        return node

    return {"$schema": "https://json-schema.org/draft/2020-12/schema"} | drop_titles(schema)


def values_schema_json() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"
