"""A Kubernetes API server stand-in for the operator's tests: kmock's emulator, plus what the operator relies on.

kmock 0.8's KubernetesEmulator is a real aiohttp server on 127.0.0.1 that stores objects and serves discovery,
list, watch, create, merge/JSON patch and delete (with finalizers). kopf and the official client talk to it
over HTTP as to a cluster. `KubeStandIn` adds what the operator's logic depends on:

- object identity and versions: metadata.uid, creationTimestamp, a cluster-wide resourceVersion on every
  change, and metadata.generation bumped when (and only when) `spec` changes; a no-op patch changes nothing;
- the status subresource of the kinds that have one: writes to the object leave `status` alone, writes to
  `/status` change only `status`, and `status` is dropped on create;
- schema validation of custom resources: ttrv's CRDs (k8s/crds) and the vendored training CRDs (k8s/vendor:
  PyTorchJob, and Kubeflow Trainer v2's TrainJob, TrainingRuntime and ClusterTrainingRuntime) are enforced on
  every write, their CEL rules (x-kubernetes-validations, transition rules on `oldSelf` included) too
  (kube_cel.py: what it evaluates as the API server does, and what not), and a violation is answered 422 with
  nothing stored; `cel = False` plays an API server whose CRDs carry no rules. Unknown fields are
  rejected too (where a real API server prunes them silently, which is how kopf's `status.kopf` would vanish);
- a failed JSON-patch `test` (kopf's optimistic lock on resourceVersion) is a 422, as kopf expects;
- label selectors (equality and `in` terms) on list and watch, field selectors on list (kubectl describe's events);
  `generateName`; list kinds; `kubectl get` tables built from the CRDs' additionalPrinterColumns;
- the garbage collector's cascade: deleting an object deletes (background propagation) whatever names it in
  ownerReferences, finalizers respected;
- no request log: kmock's grows without bound and its reactions scan it on every request (quadratic), which
  made a long run crawl.

What a real API server does differently, and the tests cannot see:
- strategic merge patch merges lists by key; here every patch on a dict is a JSON merge patch (the operator
  only sends merge patches, so it does not depend on that);
- no admission: no defaulting of core kinds, no webhooks (Kueue's suspends labelled jobs on create; the tests
  play Kueue themselves), no RBAC (the chart's RBAC is tested on its own), no quota;
- watches replay every existing object on connect instead of resuming from a resourceVersion (kopf copes),
  and there is no 410 Gone, no bookmarks, no watch-cache delay;
- core kinds (Deployment, Pod, ...) are not validated here (the builders' tests validate them offline);
- no controllers: nothing runs pods, updates a Deployment's readyReplicas or a PyTorchJob's conditions;
  the tests write those statuses, playing the kubelet, the training operator and Kueue.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import re
import string
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import jsonschema
import kmock
import yaml
from k8s_util import ROOT, openapi_to_jsonschema
from kmock._internal import dicts as kmock_dicts
from kmock._internal.enums import action as Action
from kube_cel import CelValidator


@dataclass
class KindInfo:
    kind: str
    api_version: str
    namespaced: bool = True
    status: bool = False
    validator: jsonschema.Draft4Validator | None = None
    columns: list[dict] = field(default_factory=list)
    rules: CelValidator | None = None


def _invalid(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=422, reason="Invalid", message=message)


@attrs.define(kw_only=True)
class KubeStandIn(kmock.KubernetesEmulator):
    kinds: dict[kmock.resource, KindInfo] = attrs.field(factory=dict, init=False)
    version: int = attrs.field(default=0, init=False)
    cel: bool = attrs.field(default=True, init=False)
    """Evaluate the CRDs' CEL rules on writes (False: an API server that ignores them)."""

    # --- declarations --------------------------------------------------------------------------------------------

    def declare(self, resource: str, kind: str, *, namespaced: bool = True, status: bool = False,
                schema: dict | None = None, columns: Iterable[dict] = (), short_names: Iterable[str] = ()) -> None:
        key = kmock.resource(resource)
        api_version = f"{key.group}/{key.version}" if key.group else key.version
        self.resources[resource] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, singular=kind.lower(), shortnames=set(short_names),
            verbs={"get", "list", "watch", "create", "patch", "delete"},
            subresources={"status"} if status else set())
        validator = rules = None
        if schema is not None:
            rules = CelValidator(schema)
            schema = openapi_to_jsonschema(schema)
            # The API server checks metadata as ObjectMeta; a CRD may only constrain name and generateName.
            schema["properties"].get("metadata", {}).pop("additionalProperties", None)
            validator = jsonschema.Draft4Validator(schema)
        self.kinds[key] = KindInfo(kind, api_version, namespaced, status, validator, list(columns), rules)

    def declare_crd(self, crd: Mapping) -> None:
        names = crd["spec"]["names"]
        for version in crd["spec"]["versions"]:
            self.declare(
                f"{crd['spec']['group']}/{version['name']}/{names['plural']}", names["kind"],
                namespaced=crd["spec"]["scope"] == "Namespaced", status="status" in version.get("subresources", {}),
                schema=version["schema"]["openAPIV3Schema"], columns=version.get("additionalPrinterColumns", ()),
                short_names=names.get("shortNames", ()))

    def declare_cluster(self, trainer_apis: Iterable[str] = ("pytorchjob",)) -> None:
        """Everything the operator, kopf and kubectl touch; of the training APIs, only `trainer_apis` (trainjob:
        Kubeflow Trainer v2's CRDs, pytorchjob: the v1 training operator's), as a cluster serves what is installed."""
        self.declare("v1/namespaces", "Namespace", namespaced=False)
        self.declare("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition",
                     namespaced=False)
        self.declare("v1/events", "Event")
        self.declare("v1/pods", "Pod", status=True)
        self.declare("v1/configmaps", "ConfigMap")
        self.declare("v1/services", "Service", status=True)
        self.declare("apps/v1/deployments", "Deployment", status=True)
        self.declare("networking.k8s.io/v1/networkpolicies", "NetworkPolicy")
        self.declare("kueue.x-k8s.io/v1beta1/workloads", "Workload", status=True)
        for crd in _crds() + tuple(crd for api in trainer_apis for crd in _training_crds(api)):
            self.declare_crd(crd)

    # --- reads ---------------------------------------------------------------------------------------------------

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def items(self, resource: str, namespace: str | None = None) -> list[dict]:
        wanted = kmock.resource(resource)
        return [copy.deepcopy(obj.raw) for (res, ns, _), obj in list(self.objects.items())
                if res == wanted and not obj.deleted and (namespace is None or ns == namespace)]

    # --- writes, from the tests (playing controllers) and over HTTP ----------------------------------------------

    async def put_object(self, resource: str, body: dict) -> dict:
        """Creates an object as a client would (uid, versions, validation, watch event)."""
        async with self._lock:
            key, obj = self._create(kmock.resource(resource), body.get("metadata", {}).get("namespace"), body)
            await self._publish(key[0], "ADDED", obj)
        return copy.deepcopy(obj)

    async def patch_object(self, resource: str, namespace: str | None, name: str, patch: Mapping,
                           subresource: str | None = None) -> dict:
        """A merge patch as a client would send it (to /status when `subresource` says so)."""
        async with self._lock:
            events = self._update(kmock.resource(resource), namespace, name, "application/merge-patch+json",
                                  dict(patch), subresource)
            for res, kind, obj in events:
                await self._publish(res, kind, obj)
        return self.get(resource, namespace, name)

    async def delete_object(self, resource: str, namespace: str | None, name: str) -> None:
        async with self._lock:
            for res, kind, obj in self._delete(kmock.resource(resource), namespace, name):
                await self._publish(res, kind, obj)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # kmock logs every request and its reactions scan that log on each new one, so each request costs more
        # than the last; the tests assert on objects, not on requests: keep only the current one.
        del self._requests[:-1]
        for payload in self._payloads:
            payload._requests.clear()
        if request.resource is None or request.action not in (Action.CREATE, Action.UPDATE, Action.DELETE):
            return await super()._handle(request)
        if request.resource not in self.kinds:
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            resource = request.resource
            if request.action == Action.CREATE:
                if request.subresource:
                    raise kmock.KubernetesError(status=405, reason="MethodNotAllowed", message="create on a subresource")
                key, created = self._create(resource, request.namespace, request.data)
                await self._publish(resource, "ADDED", created)
                return aiohttp.web.json_response(created, status=201)
            if request.name is None:
                raise kmock.KubernetesError(status=405, reason="MethodNotAllowed", message="collection writes")
            key = (resource, request.namespace, request.name)
            if request.action == Action.UPDATE:
                content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
                events = self._update(resource, request.namespace, request.name, content_type, request.data,
                                      request.subresource)
            else:
                events = self._delete(resource, request.namespace, request.name)
            for res, kind, obj in events:
                await self._publish(res, kind, obj)
            obj = self.objects[key]
            return aiohttp.web.json_response(copy.deepcopy(obj.last.raw if obj.deleted else obj.raw))

    def _next_version(self) -> str:
        self.version += 1
        return str(self.version)

    def _validate(self, resource: kmock.resource, body: Mapping, old: Mapping | None = None) -> None:
        info = self.kinds[resource]
        if info.validator is None:
            return
        name = body.get("metadata", {}).get("name")
        error = jsonschema.exceptions.best_match(info.validator.iter_errors(body))
        if error is not None:
            where = ".".join(str(part) for part in error.absolute_path) or "(root)"
            raise _invalid(f"{info.kind}.{info.api_version} {name!r} is invalid: {where}: {error.message}")
        if self.cel and info.rules is not None:
            broken = info.rules.errors(body) if old is None else info.rules.errors(body, old)
            if broken:
                # The API server's wording (apimachinery's field.ErrorList in a StatusError), all rules at once.
                group = info.api_version.rpartition("/")[0]
                raise _invalid(f'{info.kind}.{group} "{name}" is invalid: ' + "; ".join(broken))

    def _create(self, resource: kmock.resource, namespace: str | None, data: Any) -> tuple[tuple, dict]:
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="the body is not an object")
        info = self.kinds.get(resource)
        if info is None:
            raise kmock.KubernetesResourceNotFoundError()
        body = copy.deepcopy(data)
        meta = body.setdefault("metadata", {})
        namespace = (namespace or meta.get("namespace")) if info.namespaced else None
        if namespace:
            meta["namespace"] = namespace
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise _invalid("metadata.name: Required value: name or generateName is required")
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        if info.status:
            body.pop("status", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1)
        key = (resource, namespace, meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(status=409, reason="AlreadyExists",
                                        message=f'{info.kind} "{meta["name"]}" already exists')
        self._validate(resource, body)
        meta["resourceVersion"] = self._next_version()
        if key in self.objects:
            self.objects[key].create(body)
        else:
            self.objects[key] = body
        return key, copy.deepcopy(body)

    def _update(self, resource: kmock.resource, namespace: str | None, name: str, content_type: str, data: Any,
                subresource: str | None) -> list[tuple]:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        info = self.kinds[resource]
        if subresource not in (None, "status") or (subresource == "status" and not info.status):
            raise kmock.KubernetesObjectNotFoundError()
        current = copy.deepcopy(self.objects[key].raw)
        if content_type == "application/json-patch+json":
            try:
                patched = jsonpatch.apply_patch(current, data)
            except jsonpatch.JsonPatchTestFailed as error:
                raise _invalid(f"the server rejected our request due to an error in our request: {error}") from None
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
                raise _invalid(f"invalid JSON patch: {error}") from None
        elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json",
                              "application/json"):
            if not isinstance(data, dict):
                raise kmock.KubernetesError(status=400, reason="BadRequest", message="a merge patch is an object")
            wanted_version = (data.get("metadata") or {}).get("resourceVersion")
            if wanted_version and wanted_version != current["metadata"]["resourceVersion"]:
                raise kmock.KubernetesError(status=409, reason="Conflict", message="the object has been modified")
            patched = dict(kmock_dicts.merge_patch_dict(current, data))
        else:
            raise kmock.KubernetesError(status=415, reason="UnsupportedMediaType", message=content_type)
        if subresource == "status":
            patched = {**current, "status": patched.get("status")}
        elif info.status:
            patched["status"] = current.get("status")
        if patched.get("status") is None:
            patched.pop("status", None)
        meta = patched["metadata"]
        for immutable in ("uid", "creationTimestamp", "name", "namespace", "generation", "resourceVersion",
                          "deletionTimestamp"):
            if immutable in current["metadata"]:
                meta[immutable] = current["metadata"][immutable]
            else:
                meta.pop(immutable, None)
        if patched == current:
            return []
        if patched.get("spec") != current.get("spec"):
            meta["generation"] = current["metadata"]["generation"] + 1
        self._validate(resource, patched, current)
        meta["resourceVersion"] = self._next_version()
        self.objects[key].history.append(patched)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key)
        return [(resource, "MODIFIED", copy.deepcopy(patched))]

    def _delete(self, resource: kmock.resource, namespace: str | None, name: str) -> list[tuple]:
        key = (resource, namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        current = copy.deepcopy(self.objects[key].raw)
        meta = current["metadata"]
        if not meta.get("finalizers"):
            return self._remove(key)
        if meta.get("deletionTimestamp"):
            return []
        meta.update(deletionTimestamp=_now(), resourceVersion=self._next_version())
        self.objects[key].history.append(current)
        return [(resource, "MODIFIED", copy.deepcopy(current))]

    def _remove(self, key: tuple) -> list[tuple]:
        """Deletes an object for good, then its dependents (the garbage collector's background propagation)."""
        obj = self.objects[key]
        last = copy.deepcopy(obj.raw)
        obj.delete()
        events = [(key[0], "DELETED", last)]
        uid = last["metadata"]["uid"]
        for other_key, other in list(self.objects.items()):
            if other.deleted:
                continue
            if any(ref.get("uid") == uid for ref in other.raw["metadata"].get("ownerReferences") or []):
                events += self._delete(*other_key)
        return events

    async def _publish(self, resource: kmock.resource, kind: str, obj: dict) -> None:
        await self._buses[resource].put({"type": kind, "object": obj})

    # --- lists, watches and tables ---------------------------------------------------------------------------

    def _matching(self, request: kmock.Request) -> list[dict]:
        labels = _parse_selector(request.params.get("labelSelector"))
        fields = _parse_selector(request.params.get("fieldSelector"))
        return [obj.raw for (res, ns, _), obj in list(self.objects.items())
                if res == request.resource and not obj.deleted
                and (request.namespace is None or ns == request.namespace)
                and _selected(obj.raw, labels, fields)]

    async def _serve_list(self, request: kmock.Request) -> Any:
        info = self.kinds.get(request.resource)
        if info is None:
            raise kmock.KubernetesResourceNotFoundError()
        async with self._lock:
            items = copy.deepcopy(self._matching(request))
            version = str(self.version)
        if "as=Table" in request.headers.get("Accept", "") and info.columns:
            return _table(info, items, version)
        return {"apiVersion": info.api_version, "kind": f"{info.kind}List", "metadata": {"resourceVersion": version},
                "items": items}

    async def _serve_watch(self, request: kmock.Request):
        yield b""  # headers first, so the client knows the stream is open
        labels = _parse_selector(request.params.get("labelSelector"))
        bus = self._buses[request.resource]
        async with self._lock:
            mark = await bus.mark()  # events after the snapshot are streamed from here, none lost
            snapshot = copy.deepcopy(self._matching(request))
        for obj in snapshot:
            yield {"type": "ADDED", "object": obj}
        async for event in bus.stream(since=mark):
            obj = event["object"]
            if (request.namespace is None or obj["metadata"].get("namespace") == request.namespace) \
                    and _selected(obj, labels, {}):
                yield event

    async def _serve_version(self, request: kmock.Request) -> Any:
        group, version = request.resource.group, request.resource.version
        resources = []
        for key, info in self.kinds.items():
            if key.group != group or key.version != version:
                continue
            discovery = self.resources[key]
            entry = {"name": key.plural, "singularName": discovery.singular, "namespaced": info.namespaced,
                     "kind": info.kind, "verbs": sorted(discovery.verbs), "shortNames": sorted(discovery.shortnames)}
            resources.append(entry)
            if info.status:
                resources.append({"name": f"{key.plural}/status", "singularName": "", "namespaced": info.namespaced,
                                  "kind": info.kind, "verbs": ["get", "patch"]})
        if not resources and group:
            raise kmock.KubernetesResourceNotFoundError()
        return {"apiVersion": "v1", "kind": "APIResourceList",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


TRAINING_CRDS = {
    "pytorchjob": ("kubeflow.org_pytorchjobs.yaml",),
    "trainjob": ("trainer.kubeflow.org_trainjobs.yaml", "trainer.kubeflow.org_trainingruntimes.yaml",
                 "trainer.kubeflow.org_clustertrainingruntimes.yaml"),
}


@functools.cache
def _crds() -> tuple[dict, ...]:
    """ttrv's generated CRDs, parsed once per process."""
    return _load(*sorted((ROOT / "k8s/crds").glob("*.yaml")))


@functools.cache
def _training_crds(api: str) -> tuple[dict, ...]:
    """The vendored CRDs of one training API, parsed once per process (they are thousands of lines)."""
    return _load(*(ROOT / "k8s/vendor" / name for name in TRAINING_CRDS[api]))


def _load(*paths) -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return tuple(crd for path in paths for crd in yaml.load_all(path.read_text(), Loader=loader))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_selector(text: str | None) -> dict[str, tuple[str, ...]]:
    """Equality (`a=b`, `c==d`) and set (`e in (f,g)`) terms: key -> the values it may have. That is all the
    operator, kopf and kubectl send here."""
    result = {}
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", text or ""):
        term = term.strip()
        if " in " in term:
            key, _, values = term.partition(" in ")
            result[key.strip()] = tuple(v.strip() for v in values.strip().strip("()").split(",") if v.strip())
        elif term:
            key, _, value = term.partition("=")
            result[key.strip()] = (value.lstrip("=").strip(),)
    return result


def _dig(obj: Mapping, dotted: str) -> Any:
    value: Any = obj
    for part in dotted.strip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _selected(obj: Mapping, labels: Mapping[str, tuple[str, ...]], fields: Mapping[str, tuple[str, ...]]) -> bool:
    own = obj.get("metadata", {}).get("labels") or {}
    return all(own.get(k) in v for k, v in labels.items()) and \
        all(str(_dig(obj, k)) in v for k, v in fields.items())


def _table(info: KindInfo, items: list[dict], version: str) -> dict:
    """What the API server answers `kubectl get` (Accept: as=Table) for a custom resource: one cell per
    additionalPrinterColumn, found by its JSONPath; a date becomes an age, a missing value null."""
    columns = [{"name": "Name", "type": "string", "format": "name", "description": "Name of the object",
                "priority": 0}]
    columns += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                 "description": c.get("description", ""), "priority": c.get("priority", 0)} for c in info.columns]
    rows = []
    for item in items:
        cells: list[Any] = [item["metadata"]["name"]]
        for column in info.columns:
            value = _dig(item, column["jsonPath"])
            if value is not None and column["type"] == "date":
                value = human_age(value)
            cells.append(value)
        rows.append({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                                "metadata": item["metadata"]}})
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": version},
            "columnDefinitions": columns, "rows": rows}


def human_age(timestamp: str, now: datetime | None = None) -> str:
    """apimachinery's HumanDuration, which the API server applies to date columns."""
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(timezone.utc)) - moment).total_seconds())
    if seconds < 0:
        return "0s"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    return f"{days}d{hours % 24}h" if days < 8 and hours % 24 else f"{days}d"


def kubeconfig(server: str) -> str:
    """A kubeconfig for the stand-in (no credentials: it asks for none)."""
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "standin",
        "clusters": [{"name": "standin", "cluster": {"server": server}}],
        "users": [{"name": "standin", "user": {}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
    })
