"""The spec models' common ground: name and quantity patterns, SpecError, the strict base model, and the
validation-error formatter that names each bad field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
# A positive Kubernetes resource quantity (apimachinery's resource.Quantity, without signs and exponents).
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"


def _integer_quantity(value: Any) -> Any:
    """`cpu: 8` (YAML, `helm --set`) means "8", as in a pod's resources."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else value


# int-or-string as in a pod's resources; crds.py turns the schema into the API server's x-kubernetes-int-or-string.
Quantity = Annotated[str, BeforeValidator(_integer_quantity), Field(pattern=QUANTITY_PATTERN),
                     WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0},
                                               {"type": "string", "pattern": QUANTITY_PATTERN}],
                                     "x-kubernetes-int-or-string": True})]


class SpecError(ValueError):
    """A spec that cannot run; the message names each bad field and how to fix it."""


DNS_LABEL_RULE = ("a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or "
                  "digit, e.g. 'imagenet-r'")


def repeated(names: list[str]) -> list[str]:
    """The names listed more than once, sorted (for a uniqueness check's message)."""
    return sorted({name for name in names if names.count(name) > 1})


def check_dns_label(value: Any, field: str, why: str = "") -> str:
    """`value` when it is a DNS label (RFC 1123, what Kubernetes requires of namespaces and of the names objects are
    derived from), else a SpecError naming `field` and the value, and `why` the name matters ("; it names ...")."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise SpecError(f"{field}: {value!r} must be {DNS_LABEL_RULE}{why}")
    return value


class StrictModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        # NaN and infinity in any float field: a NaN reward "succeeds" while DeepSpeed skips every step, and the
        # values end up in events.jsonl and progress.json, which strict JSON readers reject.
        allow_inf_nan=False,
    )




def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem: `source: dotted.field: message`, with the field spelled as in the YAML."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling (`ttrv spec schema` lists every field)"
        elif problem["type"] == "missing":
            message = "required field is missing; add it"
        elif problem["type"] == "finite_number":
            message = f"{problem['input']!r} is not a finite number; write a number (NaN and infinity are refused)"
        elif problem["type"] == "string_pattern_mismatch" and problem["ctx"]["pattern"] == NAME_PATTERN:
            message += f"; {DNS_LABEL_RULE}"
        elif problem["type"] == "string_pattern_mismatch" and problem["ctx"]["pattern"] == QUANTITY_PATTERN:
            message += "; a Kubernetes quantity, e.g. '8', '500m' (CPU) or '64Gi' (memory)"
        elif problem["type"] == "string_pattern_mismatch" and problem["ctx"]["pattern"] == SUBDOMAIN_PATTERN:
            message += "; a Kubernetes object name: lowercase letters, digits, '-' and '.', starting and ending " \
                       "with a letter or digit, e.g. 'imagenet-data'"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def parse_spec(document: Any, model: type[BaseModel], source: str = "spec"):
    """Validate a parsed YAML/JSON document; raises SpecError naming every bad field."""
    if not isinstance(document, dict):
        raise SpecError(f"{source}: expected a mapping of fields at the top level, got {type(document).__name__}")
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise SpecError(format_validation_error(error, source)) from None


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SpecError(f"{path}: cannot read spec ({error.strerror}); check the path") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML; fix it where shown: {error}") from None
    except ValueError as error:  # an integer over Python's int-str limit (4300 digits) raises from PyYAML's int()
        raise SpecError(f"{path}: a number in the file cannot be read ({str(error).split(':')[0]}); write a "
                        "number of a sensible size") from None

