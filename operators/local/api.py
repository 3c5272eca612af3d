"""An API server in memory: the operator's client interface (operators.kube.Kube, reconcile.Api) over a dict of
JSON text. It keeps the API server's bookkeeping the reconciles rely on (uids, creation times, generations, the status
subresource, no second object of a name) without its network and storage. `ttrv experiment run --local` runs its
cluster on it (cluster.py), the scale bench (bench/operator_scale.py) the operator's reconciles.

Objects are stored as JSON text, so every read decodes and every write encodes as with a real client, and no caller
holds a reference into the store.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import defaultdict
from collections.abc import Mapping
from datetime import datetime, timezone

from operators.conditions import rfc3339
from ttrv.labels import EXPERIMENT_LABEL, RUN_LABEL

# Kinds whose status is a subresource: a create or an update of the object leaves its status alone.
STATUS_SUBRESOURCE = ("Experiment", "AdaptationRun", "PyTorchJob", "Deployment")
# The API server filters its watch cache in memory; parsing every stored object per list would charge the operator
# for what this stand-in stores as JSON text, so the labels the operator selects on are indexed.
INDEXED_LABELS = (EXPERIMENT_LABEL, RUN_LABEL)


def merge_patch(target: dict, patch: Mapping) -> None:
    """A JSON merge patch (RFC 7386), as the API server applies the decisions' patches."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class MemoryKube:
    """The operator's API client (operators.kube.Kube) over dicts of JSON text: the API server's bookkeeping
    (uids, creation times, generations, the status subresource, None for a second create of a name, as Kube's
    create answers the API server's 409) without its network and storage."""

    def __init__(self):
        self.objects: dict[str, dict[tuple[str, str], str]] = defaultdict(dict)
        """kind -> (namespace, name) -> the object as JSON text."""
        self.by_label: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
        self.version = 0
        self.writes = 0

    def _store(self, kind: str, obj: dict) -> None:
        self.version += 1
        self.writes += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        meta = obj["metadata"]
        self.objects[kind][(meta["namespace"], meta["name"])] = json.dumps(obj)
        for key in INDEXED_LABELS:
            value = (meta.get("labels") or {}).get(key)
            if value:
                self.by_label[(kind, meta["namespace"], key, value)].add(meta["name"])

    def get(self, kind, namespace, name):
        text = self.objects[kind].get((namespace, name))
        return None if text is None else json.loads(text)

    def list(self, kind, namespace, labels):
        wanted = {key: value if isinstance(value, tuple) else (value,) for key, value in labels.items()}
        key = next((key for key in INDEXED_LABELS if key in wanted), None)
        names = {name for value in wanted[key] for name in self.by_label[(kind, namespace, key, value)]} if key \
            else [n for (ns, n) in self.objects[kind] if ns == namespace]
        found = [self.get(kind, namespace, name) for name in sorted(names)]
        return [o for o in found if o and all(o["metadata"].get("labels", {}).get(k) in v for k, v in wanted.items())]

    def create(self, obj):
        kind, meta = obj["kind"], obj["metadata"]
        if (meta["namespace"], meta["name"]) in self.objects[kind]:
            return None
        obj = json.loads(json.dumps(obj))
        obj["metadata"].update(uid=str(uuid.uuid4()), generation=1,
                               creationTimestamp=rfc3339(datetime.now(timezone.utc)))
        if kind in STATUS_SUBRESOURCE:
            obj.pop("status", None)
        self._store(kind, obj)
        return obj

    def patch(self, kind, namespace, name, patch, status=False):
        current = self.get(kind, namespace, name)
        if current is None:
            return None
        if status:
            current["status"] = current.get("status") or {}
            merge_patch(current["status"], patch["status"])
        else:
            before = json.dumps(current.get("spec"), sort_keys=True)
            merge_patch(current, {k: v for k, v in patch.items() if k != "status"})
            if json.dumps(current.get("spec"), sort_keys=True) != before:
                current["metadata"]["generation"] += 1
        self._store(kind, current)
        return current

    def delete(self, kind, namespace, name):
        self.objects[kind].pop((namespace, name), None)

    def close(self):
        pass

    def stored_bytes(self) -> int:
        return sum(len(text) for table in self.objects.values() for text in table.values())
