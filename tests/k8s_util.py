"""Offline validation of Kubernetes objects, shared by the manifest, chart and CRD tests.

Core kinds are checked with kubernetes-validate's bundled schemas in strict mode (unknown fields fail, as under
`kubectl apply`'s strict field validation); custom resources against the openAPIV3Schema of their CRD (ttrv's
generated ones in k8s/crds/, vendored ones in k8s/vendor/), with unknown fields failing as well.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HELM = ROOT / ".tools" / "bin" / "helm"
K8S_VERSION = "1.33"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
CRD_FILES = {
    "ttrv.io": [ROOT / "k8s/crds/ttrv.io_experiments.yaml", ROOT / "k8s/crds/ttrv.io_adaptationruns.yaml"],
    "kubeflow.org": [ROOT / "k8s/vendor/kubeflow.org_pytorchjobs.yaml"],
    "trainer.kubeflow.org": [ROOT / f"k8s/vendor/trainer.kubeflow.org_{plural}.yaml"
                             for plural in ("trainjobs", "trainingruntimes", "clustertrainingruntimes")],
    "monitoring.coreos.com": [ROOT / f"k8s/vendor/monitoring.coreos.com_{plural}.yaml"
                              for plural in ("servicemonitors", "podmonitors")],
}


def openapi_to_jsonschema(node: dict) -> dict:
    """A CRD's OpenAPI v3.0 schema as JSON Schema draft 4 (whose boolean exclusiveMinimum matches OpenAPI 3.0):
    `nullable` becomes a null type, and objects with declared properties reject unknown ones."""
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if "properties" in node:
        out["properties"] = {name: openapi_to_jsonschema(child) for name, child in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = openapi_to_jsonschema(node["additionalProperties"])
    if "items" in node:
        out["items"] = openapi_to_jsonschema(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [openapi_to_jsonschema(option) for option in node[key]]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft4Validator]:
    """(apiVersion, kind) → validator, for every CRD the tests know."""
    validators = {}
    for group, paths in CRD_FILES.items():
        for path in paths:
            for crd in yaml.safe_load_all(path.read_text()):
                kind = crd["spec"]["names"]["kind"]
                for version in crd["spec"]["versions"]:
                    schema = openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
                    # The API server checks metadata as ObjectMeta; a CRD may only restrict name/generateName.
                    schema["properties"].get("metadata", {}).pop("additionalProperties", None)
                    validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft4Validator(schema)
    return validators


def validate_object(obj: dict) -> None:
    """Raises AssertionError naming the object and the first bad field."""
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    key = (obj["apiVersion"], obj["kind"])
    validator = crd_validators().get(key)
    if validator is not None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        assert error is None, f"{where}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
    else:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{where}: {'.'.join(map(str, error.path))}: {error.message}") from None
    metadata = obj["metadata"]
    assert len(metadata["name"]) <= 253 and re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", metadata["name"]), where
    for label, value in (metadata.get("labels") or {}).items():
        assert LABEL_VALUE.match(str(value)), f"{where}: label {label}={value!r} is not a valid label value"


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of every workload object; pods are made from these."""
    kind = obj["kind"]
    name = f"{kind}/{obj['metadata']['name']}"
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [(name, obj["spec"]["template"])]
    if kind == "PyTorchJob":
        return [(f"{name}/{replica}", spec["template"])
                for replica, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    if kind in ("ClusterTrainingRuntime", "TrainingRuntime", "JobSet"):
        jobset = obj["spec"]["template"]["spec"] if kind != "JobSet" else obj["spec"]
        return [(f"{name}/{job['name']}", job["template"]["spec"]["template"]) for job in jobset["replicatedJobs"]]
    if kind == "TrainJob":  # ttrv's runtime's template with the TrainJob's patches
        from ttrv.manifests import training_runtime

        return [(f"{name}/node", trainjob_pod_template(obj, training_runtime()))]
    return []


def security_problems(where: str, template: dict) -> list[str]:
    """What the restricted profile misses in a pod template, pod and container levels combined."""
    pod = template["spec"]
    pod_ctx = pod.get("securityContext", {})
    problems = []
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = pod_ctx | container.get("securityContext", {})
        at = f"{where}/{container['name']}"
        if ctx.get("runAsNonRoot") is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if ctx.get("runAsUser") != 1000:
            problems.append(f"{at}: runAsUser is not 1000")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{at}: capabilities do not drop ALL")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is writable")
        if ctx.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{at}: seccompProfile is not RuntimeDefault")
    return problems


CREDENTIAL_ENV = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|ROOT_USER|CREDENTIAL", re.IGNORECASE)


def credential_problems(obj: dict) -> list[str]:
    """Where an object carries a credential other than by reference to a Secret: an env variable with a
    credential's name whose value is not a secretKeyRef, or environment taken whole from a ConfigMap."""
    problems = []
    for where, template in pod_templates(obj):
        pod = template["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            at = f"{where}/{container['name']}"
            for item in container.get("env", []):
                if CREDENTIAL_ENV.search(item["name"]) and "secretKeyRef" not in item.get("valueFrom", {}):
                    problems.append(f"{at}: env {item['name']} is not a secretKeyRef")
            problems += [f"{at}: envFrom a ConfigMap" for source in container.get("envFrom", [])
                         if "configMapRef" in source]
    return problems


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not HELM.exists():
        pytest.fail(f"{HELM.relative_to(ROOT)} is missing; `make helm` installs it (make test does)")
    result = subprocess.run([str(HELM), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


class GoYAMLLoader(yaml.SafeLoader):
    """Reads numbers as Helm and the API server (Go YAML) do: PyYAML's YAML 1.1 resolver takes `1e-05`, which
    Helm's toYaml writes, for a string."""


GoYAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def helm_template(chart: str, release: str, *args: str, namespace: str = "team-a", tests: bool = False) -> list[dict]:
    """The chart's objects as `helm install` creates them; `tests`: with its `helm test` hooks as well."""
    skip = () if tests else ("--skip-tests",)
    out = helm("template", release, f"charts/{chart}", "--namespace", namespace, *skip, *args).stdout
    return [obj for obj in yaml.load_all(out, Loader=GoYAMLLoader) if obj]


def is_pod_selected(selector: dict, template: dict) -> bool:
    labels = template["metadata"].get("labels", {})
    return all(labels.get(key) == value for key, value in selector.items())


def _merge_by(base: list, patch: list, key: str) -> list:
    """A strategic merge of two lists of objects keyed by `key` (as for volumes, containers, volumeMounts)."""
    merged = [dict(item) for item in base]
    for item in patch:
        found = next((m for m in merged if m.get(key) == item.get(key)), None)
        if found is None:
            merged.append(dict(item))
        else:
            found.update({k: v for k, v in item.items() if k != "volumeMounts"})
            if "volumeMounts" in item:
                found["volumeMounts"] = _merge_by(found.get("volumeMounts", []), item["volumeMounts"], "mountPath")
    return merged


def trainjob_pod_template(trainjob: dict, runtime: dict) -> dict:
    """The pod template Kubeflow Trainer makes for a TrainJob's trainer node from its runtime: the runtime's
    `node` template, the TrainJob's runtimePatches merged in (kubeflow/trainer pkg/runtime/core/trainingruntime.go
    mergeRuntimePatches: a strategic merge, lists by name, volumeMounts by mountPath), then spec.trainer's image,
    command, env and resourcesPerNode on the `node` container (plugins/jobset/builder.go Trainer). The PET_*
    variables and the port 29500 that the torch plugin adds are left out: they are Kubeflow's, not ttrv's."""
    import copy

    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    node = copy.deepcopy(next(job for job in jobs if job["name"] == "node")["template"]["spec"]["template"])
    for patch in trainjob["spec"].get("runtimePatches") or []:
        for job in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if job["name"] != "node":
                continue
            template = job["template"]["spec"]["template"]
            for field in ("labels", "annotations"):
                node.setdefault("metadata", {}).setdefault(field, {}).update(template.get("metadata", {}).get(field, {}))
                if not node["metadata"][field]:
                    del node["metadata"][field]
            spec = node["spec"]
            for field, value in template.get("spec", {}).items():
                if field in ("volumes", "containers", "initContainers", "imagePullSecrets"):
                    spec[field] = _merge_by(spec.get(field, []), value, "name")
                elif field == "nodeSelector":
                    spec[field] = spec.get(field, {}) | value
                else:
                    spec[field] = value
    trainer = trainjob["spec"].get("trainer") or {}
    container = next(c for c in node["spec"]["containers"] if c["name"] == "node")
    for field in ("image", "command", "args"):
        if field in trainer:
            container[field] = trainer[field]
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    container["env"] = _merge_by(container.get("env", []), trainer.get("env", []), "name")
    return node
