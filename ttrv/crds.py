"""CustomResourceDefinitions and the ttrv chart's values schema, generated from the pydantic models in spec.py.

Pydantic writes JSON Schema (draft 2020-12); the API server wants a *structural* OpenAPI v3 schema: every node
typed, no `$ref`, no `anyOf` over types, `nullable` instead of a null type, a boolean `exclusiveMinimum`, no
`additionalProperties: false` (unknown fields are pruned, and `kubectl apply` rejects them under strict field
validation). `structural()` converts, `structural_problems()` checks the result, and `make generate` writes
k8s/crds/ and charts/*/ from here; tests fail when the committed files drift.

The CRDs also carry CEL rules (`x-kubernetes-validations`), so that the API server refuses what the operator would
refuse, at `kubectl apply` or `helm upgrade` time, instead of accepting an object the operator then marks invalid or
SpecChangeRejected: each model validator of the spec that CEL can express (`CROSS_FIELD_RULES`; `cel_rules_of`
fails generation for a model validator with neither a rule nor a reason in `NOT_IN_CEL`), and the Experiment fields
that cannot change while it exists (`frozen_spec_rules`, transition rules on `oldSelf`).
"""

from __future__ import annotations

import copy
import json
import re
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
from ttrv.spec.pod import RESERVED_ENV, RESERVED_ENV_PREFIXES

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
    schema = model.model_json_schema(by_alias=True)
    models = _models(model)
    for name, node in [(model.__name__, schema), *schema.get("$defs", {}).items()]:
        rules = cel_rules_of(models[name])
        if rules:
            node["x-kubernetes-validations"] = rules
    return structural(schema)


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
    schema = _resource_schema(ExperimentSpec, ExperimentStatus, True)
    spec = schema["properties"]["spec"]
    # The spec's own cross-field rules (the model validators on its root), then the fields frozen while it exists.
    spec["x-kubernetes-validations"] = spec.get("x-kubernetes-validations", []) + frozen_spec_rules()
    return _crd("Experiment", "experiments", ["ttrvx"], schema, [
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


# --- CEL rules (x-kubernetes-validations) -------------------------------------------------------------------------
# Semantics relied on, as the API server implements them (kubernetes/kubernetes, staging/src/k8s.io/
# apiextensions-apiserver/pkg/apis/apiextensions/v1/types_jsonschema.go, ValidationRule; and staging/src/k8s.io/
# apiserver/pkg/cel/common/values.go, UnstructuredToVal and unstructuredMap.Find):
# - a rule is scoped to the schema node that carries it (`self`); `has(self.f)` tests a property's presence, and a
#   null-valued nullable property counts as absent;
# - a rule that names `oldSelf` is a transition rule: evaluated on UPDATE only, where the old object has a value at
#   that node (so the spec's rules below run on every update of an Experiment);
# - `messageExpression`, when it evaluates to a non-empty one-line string, is the error's message; else `message`
#   (Kubernetes 1.27 has both; the rules set no `reason` or `fieldPath`, which came in 1.28);
# - a `number` property is a CEL double even when written as an integer (1 is 1.0); x-kubernetes-int-or-string is
#   an int or a string (`string()` turns both into the string the operator compares).
# The API server applies no defaults here (the operator's pydantic does), so a rule reads an absent field as its
# pydantic default: `$name` in a rule below is the field's value or its default.

MUTABLE_SPEC_FIELDS = ("maxParallelRuns", "suspend")
"""The Experiment fields that may change while it exists; the operator rejects any other change (SpecChangeRejected,
operators/experiments.py) and the CRD's transition rules refuse it at the API server."""

# Model validator (its function's qualified name) -> its rules: (rule, messageExpression). Each mirrors the
# validator's condition and its message word for word (tests/test_crds.py checks both against pydantic's).
CROSS_FIELD_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "DataSpec._one_adaptation_source": ((
        "!(has(self.adaptPath) && size(self.adaptPath) != 0 && $singleExample)",
        '"data.adaptPath and data.singleExample both choose the adaptation prompts; set one"',
    ),),
    "RolloutSpec._group_within_votes": ((
        "$groupSize <= $votes",
        '"groupSize (" + string($groupSize) + ") > votes (" + string($votes) + "): the trained group is taken from '
        'the votes; set groupSize <= votes (reference: votes 32, groupSize 16)"',
    ), (
        "!has(self.maxModelLen) || self.maxModelLen > $maxNewTokens",
        '"maxModelLen (" + string(self.maxModelLen) + ") <= maxNewTokens (" + string($maxNewTokens) + "): vLLM\'s '
        'sequences hold the prompt and its image tokens as well as the response; raise maxModelLen, or leave it null '
        'to derive it"',
    )),
    "GRPOSpec._mini_batch_within_step": ((
        "!has(self.miniBatchPrompts) || self.miniBatchPrompts <= $promptsPerStep",
        '"miniBatchPrompts (" + string(self.miniBatchPrompts) + ") > promptsPerStep (" + string($promptsPerStep) + '
        '"): a mini-batch is part of a step\'s prompts; set miniBatchPrompts <= promptsPerStep (the reference: 1)"',
    ),),
    "ResourcesSpec._offload_needs_zero": ((
        "!($offloadOptimizer && $zeroStage == 0)",
        '"offloadOptimizer needs zeroStage 1, 2 or 3 (stage 0 keeps no optimiser partition to offload); set '
        'zeroStage: 2 or offloadOptimizer: false"',
    ),),
    "SchedulingSpec._spread_needs_pytorchjob": ((
        "size($topologySpreadConstraints) == 0 || $trainerApi == 'pytorchjob'",
        '"topologySpreadConstraints need trainerApi: pytorchjob (it is " + $trainerApi + "): a TrainJob cannot carry '
        'them; set trainerApi: pytorchjob, or spread the pods with affinity (pod anti-affinity) or Kueue\'s topology '
        'annotations in pod.annotations"',
    ),),
    "AdaptationSettings._shared_rollout_needs_lora": ((
        "!(has(self.rollout) && has(self.rollout.shared) && self.rollout.shared) || "
        "(has(self.model) && has(self.model.lora))",
        '"rollout.shared: true serves each run as a LoRA adapter of one service, but model.lora is not set; set '
        'model.lora (e.g. {rank: 16}), or rollout.shared: false"',
    ), (
        "!(has(self.rollout) && has(self.rollout.shared) && self.rollout.shared) || "
        "(has(self.rollout.backend) && self.rollout.backend == 'service')",
        '"rollout.shared: true needs rollout.backend: service (the in-process engine is each trainer\'s own); set '
        'rollout.backend: service, or rollout.shared: false"',
    )),
    "EnvVarSource._one_source": ((
        "(has(self.secretKeyRef) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.fieldRef) ? 1 : 0) == 1",
        '"valueFrom needs exactly one of secretKeyRef, configMapKeyRef and fieldRef"',
    ),),
    "EnvVar._value_or_source": ((
        "!(has(self.value) && has(self.valueFrom))",
        '"env " + self.name + ": set value or valueFrom, not both"',
    ), (
        "!(self.name in " + json.dumps(list(RESERVED_ENV)) + ")"
        + "".join(f" && !self.name.startsWith({json.dumps(prefix)})" for prefix in RESERVED_ENV_PREFIXES),
        '"env " + self.name + ": ttrv or the training operator sets this variable; remove it (the store\'s '
        'credentials come from s3Secret, the shutdown timeout from pod.terminationGracePeriodSeconds)"',
    )),
}

NOT_IN_CEL: dict[str, str] = {}
"""Model validators CEL does not express, with why (empty: every one is mirrored)."""

# CEL's reserved words, which a property name would need escaped as __word__ (types_jsonschema.go, ValidationRule).
_CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
                 "import", "let", "loop", "package", "namespace", "return"}


def _models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `root` by its fields, by class name (pydantic's `$defs` keys)."""
    found: dict[str, type[BaseModel]] = {}

    def visit(kind: Any) -> None:
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            if kind.__name__ not in found:
                found[kind.__name__] = kind
                for info in kind.model_fields.values():
                    visit(info.annotation)
            return
        for arg in get_args(kind):
            visit(arg)

    visit(root)
    return found


def model_validators(model: type[BaseModel]) -> list[str]:
    """Qualified names of the model validators pydantic runs for `model` (inherited ones too)."""
    return [decorator.func.__qualname__ for decorator in model.__pydantic_decorators__.model_validators.values()]


def _cel_name(alias: str) -> str:
    if alias in _CEL_RESERVED or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", alias):
        raise ValueError(f"property {alias!r} needs escaping in CEL; rename it or escape it here")
    return alias


def cel_literal(value: Any, schema: dict) -> str:
    """A JSON default as a CEL literal of the property's type (`number` → double, as the API server reads it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if schema.get("type") == "number":
        return repr(float(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes (\\", \\\\, \\n, \\uXXXX) are CEL's too
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return "[" + ", ".join(cel_literal(v, schema.get("items", {})) for v in value) + "]"
    if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        values = schema.get("additionalProperties") or {}
        return "{" + ", ".join(f"{json.dumps(k)}: {cel_literal(v, values)}" for k, v in value.items()) + "}"
    raise ValueError(f"no CEL literal for {value!r}")


def _with_defaults(template: str, model: type[BaseModel]) -> str:
    """`$field` (a camelCase name) → the field's value, or its pydantic default when absent."""
    properties = structural(model.model_json_schema(by_alias=True))["properties"]
    aliases = {info.alias or name: info for name, info in model.model_fields.items()}

    def value(match: re.Match) -> str:
        alias = _cel_name(match.group(1))
        if alias not in aliases:
            raise ValueError(f"{model.__name__} has no field {alias!r} (a CEL rule names it)")
        default = aliases[alias].get_default(call_default_factory=True)
        if default is None:
            raise ValueError(f"{model.__name__}.{alias} defaults to null: write has(self.{alias}) in the rule")
        return f"(has(self.{alias}) ? self.{alias} : {cel_literal(default, properties[alias])})"

    return re.sub(r"\$(\w+)", value, template)


def cel_rules_of(model: type[BaseModel]) -> list[dict]:
    """The x-kubernetes-validations of `model`'s schema node: a rule per expressible model validator."""
    rules = []
    for name in model_validators(model):
        if name in NOT_IN_CEL:
            continue
        if name not in CROSS_FIELD_RULES:
            raise ValueError(f"model validator {name} has no CEL rule: add one to ttrv.crds.CROSS_FIELD_RULES, or say "
                             "why CEL cannot express it in NOT_IN_CEL")
        for rule, message in CROSS_FIELD_RULES[name]:
            rules.append({"rule": _with_defaults(rule, model), "messageExpression": _with_defaults(message, model)})
    return rules


_ABSENT = object()


def _placeholder(schema: dict) -> str:
    """A literal of the property's type, for a branch taken only when presence already differs."""
    if schema.get("x-kubernetes-int-or-string"):
        return '""'
    return {"string": '""', "integer": "0", "number": "0.0", "boolean": "false", "array": "[]",
            "object": "{}"}[schema["type"]]


def _leaves(schema: dict, path: list[str], fallbacks: list[Any]):
    """(path, schema, fallbacks) of every leaf under `schema`; fallbacks[k] is the leaf's value when path[k] is
    absent (its parent present), or _ABSENT when it then has none."""
    if schema.get("type") == "object" and "properties" in schema:
        for alias, child in schema["properties"].items():
            yield from _leaves(child, [*path, _cel_name(alias)],
                               [_dig(f, alias) for f in fallbacks] + [child.get("default", _ABSENT)])
    else:
        yield path, schema, fallbacks


def _dig(value: Any, key: str) -> Any:
    return value.get(key, _ABSENT) if isinstance(value, dict) else _ABSENT


def _unchanged(path: list[str], schema: dict, fallbacks: list[Any]) -> str:
    """CEL: the leaf at `path` has the same effective value (given pydantic's defaults) in self and oldSelf."""
    literal = []
    for fallback in fallbacks:
        try:
            literal.append(_ABSENT if fallback is _ABSENT or fallback is None else cel_literal(fallback, schema))
        except ValueError:
            literal.append(_ABSENT)  # a list of objects: compared as written, so an explicit default is a change

    def nested(var: str, leaf: str, when_absent) -> str:
        """`leaf` if every level of `path` is present, else the fallback of the outermost absent level (levels
        that share a fallback share one condition)."""
        expr, depth = leaf, len(path) - 1
        while depth >= 0:
            start = depth
            while start > 0 and when_absent(start - 1) == when_absent(depth):
                start -= 1
            present = " && ".join(f"has({var}.{'.'.join(path[:level + 1])})" for level in range(start, depth + 1))
            expr = f"({present} ? {expr} : {when_absent(depth)})"
            depth = start - 1
        return expr

    def value(var: str) -> str:
        expr = nested(var, f"{var}.{'.'.join(path)}",
                      lambda depth: _placeholder(schema) if literal[depth] is _ABSENT else literal[depth])
        return f"string({expr})" if schema.get("x-kubernetes-int-or-string") else expr

    if all(item is not _ABSENT for item in literal):
        return f"{value('self')} == {value('oldSelf')}"

    def present(var: str) -> str:
        """CEL: the leaf has a value (set, or defaulted where an absent level's default holds one)."""
        expr = "true"
        for depth in reversed(range(len(path))):
            level = f"has({var}.{'.'.join(path[:depth + 1])})"
            if literal[depth] is _ABSENT:
                expr = level if expr == "true" else f"{level} && {expr}"
            elif expr != "true":
                expr = f"(!{level} || {expr})"
        return f"({expr})"

    return f"{present('self')} == {present('oldSelf')} && (!{present('self')} || {value('self')} == {value('oldSelf')})"


def _json_defaults(node: Any, defs: dict) -> Any:
    """The pydantic JSON schema with $refs and nullable unions resolved, keeping each property's `default`."""
    if isinstance(node, dict):
        node = _resolve(node, defs)
        if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
            typed = [_resolve(option, defs) for option in node["anyOf"] if option.get("type") != "null"]
            if len(typed) == 1:
                node = typed[0] | {k: v for k, v in node.items() if k in ("default", "description")}
        return {k: _json_defaults(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_json_defaults(v, defs) for v in node]
    return node


def frozen_spec_rules() -> list[dict]:
    """Transition rules on an Experiment's spec: one per field outside MUTABLE_SPEC_FIELDS, true when none of its
    values changed, reading absent values as pydantic's defaults (adding `seed: 0` changes nothing; the operator's
    comparison, operators/experiments.py resolve_spec, agrees). Lists of objects compare as written."""
    raw = ExperimentSpec.model_json_schema(by_alias=True)
    resolved = _json_defaults(raw, raw.get("$defs", {}))
    typed = structural(raw)["properties"]
    rules = []
    for alias, node in resolved["properties"].items():
        if alias in MUTABLE_SPEC_FIELDS:
            continue
        terms = []
        for path, _, fallbacks in _leaves(node, [_cel_name(alias)], [node.get("default", _ABSENT)]):
            leaf = typed[alias]
            for part in path[1:]:
                leaf = leaf["properties"][part]
            terms.append(_unchanged(path, leaf, fallbacks))
        rules.append({
            "rule": " && ".join(terms),
            "message": f"{alias} cannot change while the experiment exists (only {' and '.join(MUTABLE_SPEC_FIELDS)}"
                       " can); revert it, or delete and recreate the experiment",
        })
    return rules


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
    "helmTest": {
        "type": "object",
        "additionalProperties": False,
        "description": "`helm test`: a Pod that waits until the operator has accepted the Experiment.",
        "properties": {
            "image": {"type": "string", "minLength": 1,
                      "description": "Image with kubectl and bash (Kubernetes' own registry.k8s.io/kubectl)."},
            "timeoutSeconds": {"type": "integer", "minimum": 1,
                               "description": "How long to wait for the operator's verdict."},
        },
    },
    "monitoring": {
        "type": "object",
        "additionalProperties": False,
        "description": "Prometheus operator objects for this experiment's trainer (PodMonitor) and rollout service "
                       "(ServiceMonitor), and a NetworkPolicy letting Prometheus reach the rollout pods.",
        "properties": {
            "enabled": {"type": "boolean", "description": "Create them (needs the Prometheus operator's CRDs)."},
            # the pattern of a ServiceMonitor's endpoints[].interval (k8s/vendor/monitoring.coreos.com_servicemonitors.yaml)
            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                      r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
                         "description": "Scrape interval (a Prometheus duration, e.g. 30s)."},
            "labels": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "Labels your Prometheus selects monitors by."},
            "prometheusNamespaceLabels": {
                "type": "object", "additionalProperties": {"type": "string"}, "minProperties": 1,
                "description": "Labels of the namespace Prometheus scrapes from (the NetworkPolicy admits it)."},
        },
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
