"""The rules names must follow, one function each: Kubernetes object names by kind, label keys and values, mount
paths and container image references. Each returns the value or raises SpecError naming the field, the value, the
rule and how to fix it (`field` may be empty where pydantic names the field itself).

The Kubernetes rules are apimachinery's (k8s.io/apimachinery/pkg/util/validation/validation.go: IsDNS1123Label,
IsDNS1123Subdomain, IsDNS1035Label, IsQualifiedName, IsValidLabelValue); the image reference grammar is
distribution's (github.com/distribution/reference/reference.go, vendored in kubernetes/kubernetes)."""

from __future__ import annotations

import re
from typing import Any

from ttrv.spec.base import SpecError

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_LABEL = re.compile(_LABEL)
DNS1123_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
QUALIFIED_NAME = re.compile(_QUALIFIED)

# distribution/reference's grammar: [domain '/'] path [':' tag] ['@' digest]
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REFERENCE = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?",
                             re.ASCII)
_PATH_ONLY = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?", re.ASCII)
IMAGE_NAME_MAX = 255
"""distribution/reference's NameTotalLengthMax: the repository name (without tag and digest)."""

SYSTEM_PATHS = {
    "/proc": "the kernel's process interface",
    "/sys": "the kernel's device and driver interface",
    "/dev": "device nodes (and /dev/shm, the pods' shared memory)",
    "/etc": "the image's configuration (users, CA certificates, DNS resolution)",
    "/usr": "the image's programs and libraries",
    "/lib": "the image's shared libraries",
    "/lib64": "the image's shared libraries",
    "/bin": "the image's programs",
    "/sbin": "the image's system programs",
    "/boot": "the node's boot files",
    "/run": "runtime state (the service-account token, sockets)",
    "/var/run": "runtime state (the service-account token, sockets)",
    "/opt/ttrv": "ttrv's own Python environment in the image",
}
"""Folders a volume may not be mounted on or below (or above): the mount would hide what is there, and the
container would not start (no Python, no libraries), or would run without its kernel interfaces or CA
certificates. The pods' own mounts (/etc/ttrv, /tmp, /cache, /dev/shm) are in spec.experiment's list."""


def _prefix(field: str) -> str:
    return f"{field}: " if field else ""


def _length(value: str, limit: int, field: str, rule: str, fix: str) -> None:
    if len(value) > limit:
        raise SpecError(f"{_prefix(field)}{value[:80]!r} has {len(value)} characters, over the {limit} of {rule}; "
                        f"{fix}")


def check_dns1123_label(value: Any, field: str = "", why: str = "") -> str:
    """A DNS-1123 label (RFC 1123): namespaces, most object names ttrv derives others from."""
    if not isinstance(value, str) or len(value) > 63 or not DNS1123_LABEL.fullmatch(value):
        raise SpecError(f"{_prefix(field)}{value!r} must be a DNS label: at most 63 lowercase letters, digits and '-',"
                        f" starting and ending with a letter or digit, e.g. 'imagenet-r'{why}")
    return value


def check_dns1035_label(value: Any, field: str = "", why: str = "") -> str:
    """A DNS-1035 label (RFC 1035): Service names (apimachinery's ValidateServiceName), which must start with a
    letter."""
    if not isinstance(value, str) or len(value) > 63 or not DNS1035_LABEL.fullmatch(value):
        raise SpecError(f"{_prefix(field)}{value!r} must be a DNS-1035 label: at most 63 lowercase letters, digits "
                        f"and '-', starting with a letter and ending with a letter or digit, e.g. 'exp-1'{why}")
    return value


def check_dns1123_subdomain(value: Any, field: str = "", why: str = "") -> str:
    """A DNS-1123 subdomain: ConfigMaps, Deployments, PriorityClasses, PersistentVolumeClaims, custom resources."""
    if not isinstance(value, str) or len(value) > 253 or not DNS1123_SUBDOMAIN.fullmatch(value):
        raise SpecError(f"{_prefix(field)}{value!r} must be a Kubernetes object name: at most 253 lowercase letters, "
                        f"digits, '-' and '.', starting and ending with a letter or digit, e.g. 'imagenet-data'{why}")
    return value


OBJECT_NAME_RULES = {
    "Service": check_dns1035_label,
    "Namespace": check_dns1123_label,
    # Kubeflow Trainer's CRD: "metadata.name must match RFC 1035 DNS label format", at most 63 characters
    # (kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go, XValidation on TrainJob).
    "TrainJob": check_dns1035_label,
}
"""The rule of a kind's metadata.name where it is not a DNS-1123 subdomain (the API server's default)."""


def check_object_name(kind: str, value: Any, field: str = "", why: str = "") -> str:
    """`value` as the metadata.name of a `kind` object."""
    return OBJECT_NAME_RULES.get(kind, check_dns1123_subdomain)(value, field, why)


def check_label_key(value: Any, field: str = "") -> str:
    """A label key: an optional DNS-1123 subdomain prefix and '/', then a name of at most 63 letters, digits, '-',
    '_' and '.', starting and ending with a letter or digit (IsQualifiedName)."""
    fix = "write a label key such as 'nvidia.com/gpu.product' or 'pool'"
    if not isinstance(value, str) or not value:
        raise SpecError(f"{_prefix(field)}{value!r} is not a label key; {fix}")
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        raise SpecError(f"{_prefix(field)}label key {value!r}: the prefix {prefix!r} must be a DNS subdomain (lowercase"
                        f" letters, digits, '-' and '.'); {fix}")
    if len(name) > 63 or not QUALIFIED_NAME.fullmatch(name):
        raise SpecError(f"{_prefix(field)}label key {value!r}: the name {name!r} must be at most 63 letters, digits, "
                        f"'-', '_' and '.', starting and ending with a letter or digit; {fix}")
    return value


def check_label_value(value: Any, field: str = "") -> str:
    """A label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting and ending with a letter or
    digit (IsValidLabelValue)."""
    if not isinstance(value, str) or len(value) > 63 or (value and not QUALIFIED_NAME.fullmatch(value)):
        raise SpecError(f"{_prefix(field)}{value!r} is not a label value: at most 63 letters, digits, '-', '_' and "
                        "'.', starting and ending with a letter or digit; write e.g. 'a100' or 'team-a'")
    return value


def check_mount_path(value: Any, field: str = "", reserved: tuple[str, ...] = ()) -> str:
    """An absolute folder without '.', '..' or empty steps, not on, below or above a system folder (SYSTEM_PATHS)
    or one of `reserved` (the pods' own mounts); returns it without a trailing '/'."""
    if not isinstance(value, str) or not value.startswith("/") or value.rstrip("/") == "":
        raise SpecError(f"{_prefix(field)}{value!r} must be an absolute path below / without '..', e.g. /data")
    path = value.rstrip("/")
    if any(part in (".", "..", "") for part in path.split("/")[1:]) or "\x00" in path:
        raise SpecError(f"{_prefix(field)}{value!r} must be an absolute path without '..', '.', '//' or NUL, "
                        "e.g. /data")
    for system, what in SYSTEM_PATHS.items():
        if path == system or path.startswith(system + "/") or system.startswith(path + "/"):
            raise SpecError(f"{_prefix(field)}{value!r} overlaps {system} ({what}): a volume there hides it and the "
                            "pod cannot run; mount it elsewhere, e.g. /data")
    for folder in reserved:
        if path == folder or path.startswith(folder + "/") or folder.startswith(path + "/"):
            raise SpecError(f"{_prefix(field)}{value!r} overlaps {folder}, which the pods use themselves; mount it "
                            "elsewhere, e.g. /data")
    return path


def check_image_reference(value: Any, field: str = "") -> str:
    """A container image reference as the kubelet's runtime parses it: [registry[:port]/]path[:tag][@digest],
    the path in lowercase."""
    fix = "write e.g. ghcr.io/ttrv/ttrv-trainer:0.1.0 or registry.local:5000/team/ttrv@sha256:<64 hex digits>"
    if not isinstance(value, str) or not IMAGE_REFERENCE.fullmatch(value):
        raise SpecError(f"{_prefix(field)}{str(value)[:200]!r} is not a container image reference; {fix}")
    first = value.split("/", 1)[0]
    # The first part is a registry only when it has a '.' or ':' or is localhost (normalize.go's splitDockerDomain);
    # otherwise it is part of the repository path, which is lowercase ("UPPER/x" is refused by docker and the
    # kubelet alike).
    if "/" in value and not ("." in first or ":" in first or first == "localhost" or first.startswith("[")) \
            and not _PATH_ONLY.fullmatch(value):
        raise SpecError(f"{_prefix(field)}{value[:200]!r} is not a container image reference: the repository path "
                        f"is lowercase; {fix}")
    name = value.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    _length(name, IMAGE_NAME_MAX, field, "an image name", fix)
    return value
