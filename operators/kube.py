"""The few Kubernetes API calls the operator makes, on plain dicts (the builders' and kopf's currency).

The official client's typed models would turn every object into classes and back; `call_api` on raw paths keeps
the dicts, and the client's configuration (in-cluster service account, else kubeconfig), TLS and retries of
idempotent requests stay those of the official client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import kubernetes


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{namespace}/{self.plural}"
        return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


KINDS = {
    "Experiment": Kind("ttrv.io", "v1alpha1", "experiments"),
    "AdaptationRun": Kind("ttrv.io", "v1alpha1", "adaptationruns"),
    "ConfigMap": Kind("", "v1", "configmaps"),
    "Service": Kind("", "v1", "services"),
    "Pod": Kind("", "v1", "pods"),
    "Deployment": Kind("apps", "v1", "deployments"),
    "NetworkPolicy": Kind("networking.k8s.io", "v1", "networkpolicies"),
    "ServiceAccount": Kind("", "v1", "serviceaccounts"),
    "Role": Kind("rbac.authorization.k8s.io", "v1", "roles"),
    "RoleBinding": Kind("rbac.authorization.k8s.io", "v1", "rolebindings"),
    "PyTorchJob": Kind("kubeflow.org", "v1", "pytorchjobs"),
    "TrainJob": Kind("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
    "TrainingRuntime": Kind("trainer.kubeflow.org", "v1alpha1", "trainingruntimes"),  # a run's own (gang admission)
    # v1beta1 is served by every Kueue that has the pytorchjob integration (v0.15 still serves it next to v1beta2).
    "Workload": Kind("kueue.x-k8s.io", "v1beta1", "workloads"),
}


class KubeError(RuntimeError):
    """An API call failed; the message names the call and the API server's answer."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str):
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout

    @classmethod
    def from_environment(cls) -> Kube:
        """The pod's service account inside a cluster, else the current kubeconfig context (as kopf logs in)."""
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # KUBECONFIG as it is now (the client reads it once, at import).
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)
        return cls(kubernetes.client.ApiClient(configuration))

    def close(self) -> None:
        """Closes the pooled keep-alive connections, which would otherwise outlive the operator's shutdown
        (urllib3 2's PoolManager.clear only forgets its pools; they close when garbage-collected)."""
        self.api.close()
        pools = self.api.rest_client.pool_manager.pools
        for key in pools.keys():
            pools[key].close()
        pools.clear()

    def _call(self, method: str, path: str, body=None, content_type: str | None = None,
              query: list[tuple[str, str]] | None = None) -> dict:
        headers = {"Accept": "application/json"} | ({"Content-Type": content_type} if content_type else {})
        try:
            # response_type "object": the decoded JSON as it is, no model classes.
            return self.api.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], response_type="object", _return_http_data_only=True,
                _request_timeout=self.timeout) or {}
        except kubernetes.client.ApiException as error:
            try:
                answer = json.loads(error.body or "{}")
            except ValueError:
                answer = {}
            raise KubeError(method, path, error.status, answer.get("reason") or error.reason or "",
                            answer.get("message") or str(error.body or "")) from None

    def serves(self, kind: str) -> bool:
        """Whether the API server serves `kind` (its group/version's discovery document lists the resource)."""
        spec = KINDS[kind]
        path = f"/apis/{spec.group}/{spec.version}" if spec.group else f"/api/{spec.version}"
        try:
            resources = self._call("GET", path).get("resources") or []
        except KubeError as error:
            if error.status in (404, 503):  # the group/version is not installed, or its aggregated server is down
                return False
            raise
        return any(resource.get("name") == spec.plural for resource in resources)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        try:
            return self._call("GET", KINDS[kind].path(namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, labels: Mapping[str, str | tuple[str, ...]]) -> list[dict]:
        """Objects whose labels match: a string value exactly, a tuple value any of its members."""
        selector = ",".join(f"{key} in ({','.join(value)})" if isinstance(value, tuple) else f"{key}={value}"
                            for key, value in sorted(labels.items()))
        answer = self._call("GET", KINDS[kind].path(namespace), query=[("labelSelector", selector)])
        return answer.get("items") or []

    def create(self, obj: Mapping) -> dict | None:
        """The created object, or None when one of that name exists already (names are deterministic, so a
        second create after a restart or a race is a no-op, never a duplicate)."""
        meta = obj["metadata"]
        try:
            return self._call("POST", KINDS[obj["kind"]].path(meta["namespace"]), body=dict(obj),
                              content_type="application/json")
        except KubeError as error:
            if error.status == 409:
                return None
            raise

    def patch(self, kind: str, namespace: str, name: str, patch: Mapping, status: bool = False) -> dict | None:
        """A JSON merge patch (RFC 7386: null deletes a key, lists are replaced); None when the object is gone."""
        try:
            return self._call("PATCH", KINDS[kind].path(namespace, name, "status" if status else None),
                              body=dict(patch), content_type="application/merge-patch+json")
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Deletes in the background (dependents by the garbage collector); an absent object is fine."""
        try:
            self._call("DELETE", KINDS[kind].path(namespace, name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
                       content_type="application/json")
        except KubeError as error:
            if error.status != 404:
                raise
