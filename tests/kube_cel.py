"""The API server's CEL validation of custom resources (x-kubernetes-validations), for the API stand-in.

Rules are compiled and evaluated by cel-python (celpy, a CEL implementation checked against cel-spec's conformance
tests), on values converted as the API server converts them (kubernetes/kubernetes staging/src/k8s.io/apiserver/
pkg/cel/common/values.go, UnstructuredToVal): an object with properties is a map of its set, non-null properties
(so `has()` is false for a null one), a `number` is a double even when written as an integer, x-kubernetes-int-or-
string an int or a string. What the API server does and this does too (staging/src/k8s.io/apiextensions-apiserver/
pkg/apis/apiextensions/v1/types_jsonschema.go, ValidationRule):
- a rule naming `oldSelf` is a transition rule: evaluated on update only, where the old object has a value at the
  rule's node (object properties and map entries correlate; list items only in x-kubernetes-list-type map lists);
- the message is `messageExpression`'s value when that is a non-empty one-line string, else `message`, else
  "failed rule: <rule>";
- ratcheting (KEP-4008, on by default since 1.30): on update, a value equal to the old one is not judged again.
What it does not: type-check and cost-estimate the rules (the API server refuses a CRD whose rules do not compile
or are too costly; here only the syntax is checked), `optionalOldSelf`, the Kubernetes CEL libraries (quantity(),
isURL(), ...; none of the CRDs here uses them), string formats (date-time stays a string), and an unchanged value
is skipped for transition rules too (a rule of the kind `self == oldSelf` always passes there anyway).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import celpy
from celpy import celtypes

_MISSING = object()


@functools.cache
def _program(expression: str) -> celpy.Runner:
    """A compiled rule; cached, as the same CRDs are declared by every test."""
    environment = celpy.Environment()
    return environment.program(environment.compile(expression))


def _uses_old_self(rule: str) -> bool:
    return re.search(r"\boldSelf\b", rule) is not None


class CelValidator:
    """The x-kubernetes-validations of one structural schema (openAPIV3Schema), compiled."""

    def __init__(self, schema: Mapping):
        self.schema = schema
        for path, node in _nodes(schema, ""):
            for rule in node.get("x-kubernetes-validations", ()):
                for key in ("rule", "messageExpression"):
                    if key in rule:
                        try:
                            _program(rule[key])
                        except celpy.CELParseError as error:
                            raise ValueError(f"{path or '(root)'}: {key} {rule[key]!r} does not compile: {error}") \
                                from None

    def errors(self, new: Any, old: Any = _MISSING) -> list[str]:
        """`path: Invalid value: "type": message` for each rule `new` breaks (`old`: the stored object on update)."""
        return list(self._check(self.schema, new, old, "", root=True))

    def _check(self, schema: Mapping, value: Any, old: Any, path: str, root: bool = False) -> Iterator[str]:
        if value is None or (old is not _MISSING and old == value):
            return  # null: nothing to judge; unchanged: ratcheting
        rules = schema.get("x-kubernetes-validations", ())
        if rules:
            this = _to_cel(value, schema, root)
            previous = None if old is _MISSING or old is None else _to_cel(old, schema, root)
            for rule in rules:
                transition = _uses_old_self(rule["rule"])
                if transition and previous is None:
                    continue
                activation = {"self": this} | ({"oldSelf": previous} if transition else {})
                verdict = _evaluate(rule["rule"], activation)
                if verdict is True:
                    continue
                kind = schema.get("type") or "object"
                if isinstance(verdict, str):  # the rule could not be evaluated
                    yield f"{path or '<nil>'}: Invalid value: \"{kind}\": {verdict} evaluating rule: {rule['rule']}"
                    continue
                yield f"{path or '<nil>'}: Invalid value: \"{kind}\": {_message(rule, activation)}"
        if isinstance(value, dict):
            properties = schema.get("properties")
            for key, child in value.items():
                child_schema = properties.get(key) if properties is not None else _additional(schema)
                if child_schema is not None:
                    child_old = old.get(key, _MISSING) if isinstance(old, dict) else _MISSING
                    yield from self._check(child_schema, child, child_old, f"{path}.{key}" if path else key)
        elif isinstance(value, list) and "items" in schema:
            keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
            olds = {_key(item, keys): item for item in old} if keys and isinstance(old, list) else {}
            for index, item in enumerate(value):
                item_old = olds.get(_key(item, keys), _MISSING) if keys else _MISSING
                yield from self._check(schema["items"], item, item_old, f"{path}[{index}]")


def _additional(schema: Mapping) -> Mapping | None:
    extra = schema.get("additionalProperties")
    return extra if isinstance(extra, Mapping) else None


def _key(item: Any, keys: list[str]) -> tuple:
    return tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)


def _evaluate(expression: str, activation: dict) -> bool | str:
    """True or False, or why the rule could not be evaluated (the API server then refuses the object too)."""
    try:
        result = _program(expression).evaluate(activation)
    except celpy.CELEvalError as error:
        return f"{error.args[0] if error.args else error}"
    if isinstance(result, celpy.CELEvalError):
        return f"{result.args[0] if result.args else result}"
    if not isinstance(result, celtypes.BoolType):
        return f"the rule evaluated to {type(result).__name__}, not a bool"
    return bool(result)


def _message(rule: Mapping, activation: dict) -> str:
    """messageExpression's value when it is a non-empty one-line string, else message, else the rule's text."""
    if "messageExpression" in rule:
        try:
            text = _program(rule["messageExpression"]).evaluate(activation)
        except celpy.CELEvalError:
            text = None
        if isinstance(text, str) and text.strip() and "\n" not in text:
            return str(text)
    return rule.get("message") or f"failed rule: {rule['rule']}"


def _to_cel(value: Any, schema: Mapping, root: bool = False) -> Any:
    """`value` as the API server hands it to CEL (values.go, UnstructuredToVal)."""
    if value is None:
        return None
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.StringType(value) if isinstance(value, str) else celtypes.IntType(value)
    kind = schema.get("type")
    if kind == "object" or (kind is None and isinstance(value, dict)):
        properties = schema.get("properties")
        if properties is not None or root:
            properties = dict(properties or {})
            if root:  # of metadata, only name and generateName are visible (ValidationRule's comment)
                properties["metadata"] = {"type": "object", "properties": {
                    "name": {"type": "string"}, "generateName": {"type": "string"}}}
            return celtypes.MapType({celtypes.StringType(k): _to_cel(v, properties[k]) for k, v in value.items()
                                     if k in properties and v is not None})
        extra = _additional(schema)
        if extra is not None:
            return celtypes.MapType({celtypes.StringType(k): _to_cel(v, extra) for k, v in value.items()})
        return celpy.json_to_cel(value)  # preserved unknown fields: only equality is meaningful
    if kind == "array":
        return celtypes.ListType([_to_cel(item, schema.get("items", {})) for item in value])
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "string":
        return celtypes.StringType(value)
    return celpy.json_to_cel(value)


def _nodes(schema: Mapping, path: str) -> Iterator[tuple[str, Mapping]]:
    yield path, schema
    for key, child in (schema.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{key}" if path else key)
    if _additional(schema) is not None:
        yield from _nodes(schema["additionalProperties"], f"{path}.*")
    if isinstance(schema.get("items"), Mapping):
        yield from _nodes(schema["items"], f"{path}[]")
