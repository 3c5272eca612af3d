"""The local cluster: an in-memory API (api.py) whose objects this machine acts on as a cluster's other controllers
and its kubelets would (the table in operators/local/__init__.py says what becomes of each kind)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from operators.conditions import is_true
from operators.local.api import MemoryKube
from operators.local.pods import LOOPBACK, LocalPod, image_env, pod_process, training_operator_env
from ttrv import exitcodes, lifetime
from ttrv.fsutil import atomic_write
from ttrv.labels import REPLICA_TYPE_LABEL, RUN_LABEL
from ttrv.log import get_logger
from ttrv.manifests import MASTER_PORT_NAME
from ttrv.net import free_port

logger = get_logger(__name__)

# The kubelet's defaults: grace after SIGTERM, and the back-off of a crashing container (10 s doubling to 5 min).
GRACE_SECONDS = 30
CRASH_BACKOFF_SECONDS, CRASH_BACKOFF_MAX = 10, 300


def _stamp() -> str:
    """A condition time with microseconds: a fast-failing pod may restart twice within one second, and each restart
    must show as a new Restarting transition for decide_run to count it."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LocalCluster(MemoryKube):
    """The API the reconciles talk to, and what happens to its objects: a ConfigMap is written out and a
    Deployment's or PyTorchJob's ports are chosen as they are created, their pods are stopped as they are deleted,
    and `sync` plays the Deployment controller, the training operator and the kubelet once."""

    def __init__(self, out: Path, secrets: Mapping[str, Mapping[str, str]], lock: lifetime.RunLock | None = None):
        super().__init__()
        self.out = out
        self.secrets = secrets
        self.lock = lock
        """The experiment's folder lock: the trainer pods hold it, the other pods live until it is free."""
        self.pods: dict[str, LocalPod] = {}
        self.stopping: list[LocalPod] = []
        self.config_maps: dict[str, Path] = {}
        self.ports: dict[str, dict[int, int]] = {}
        """Deployment or PyTorchJob name -> its pods' containerPort -> local port (kept across restarts, as a
        restarted pod keeps its Service)."""
        self.crash_backoff: dict[str, float] = {}
        """Deployment name -> when its crashed pod's container starts again."""

    # the API, with what the cluster does as objects come and go
    def create(self, obj: Mapping) -> dict | None:
        created = super().create(obj)
        if created is None:
            return None
        if created["kind"] == "ConfigMap":
            self._write_config_map(created)
        elif created["kind"] in ("Deployment", "PyTorchJob"):
            containers = [c for t in _templates(created) for c in t["spec"]["containers"]]
            self.ports[created["metadata"]["name"]] = {port["containerPort"]: free_port()
                                                       for c in containers for port in c.get("ports", [])}
        return created

    def delete(self, kind: str, namespace: str, name: str) -> None:
        if self.get(kind, namespace, name) is not None:
            super().delete(kind, namespace, name)
            for pod in self._owned(name):
                self._stop(pod)

    def list(self, kind: str, namespace: str, labels: Mapping[str, str | tuple[str, ...]]) -> list[dict]:
        """Pods are the local processes, as the API shows them."""
        if kind != "Pod":
            return super().list(kind, namespace, labels)
        wanted = {key: value if isinstance(value, tuple) else (value,) for key, value in labels.items()}
        pods = [pod.as_pod() for pod in self.pods.values()]
        return [pod for pod in pods if all(pod["metadata"]["labels"].get(k) in v for k, v in wanted.items())]

    def _all(self, kind: str) -> list[dict]:
        return [self.get(kind, *key) for key in list(self.objects[kind])]

    # the controllers
    def sync(self) -> None:
        """One pass of the controllers; each changes an object's status in place, and a changed one is written."""
        for obj in self._all("Deployment") + self._all("PyTorchJob"):
            before = json.dumps(obj.get("status"))
            if obj["kind"] == "Deployment":
                self._sync_deployment(obj)
            else:
                self._sync_job(obj)
            if json.dumps(obj.get("status")) != before:
                meta = obj["metadata"]
                self.patch(obj["kind"], meta["namespace"], meta["name"], {"status": obj["status"]}, status=True)
        self.stopping = [pod for pod in self.stopping if pod.poll() is None]

    def shutdown(self) -> None:
        """Every pod stopped as a node drain stops it: SIGTERM (the trainers checkpoint), SIGKILL after the grace."""
        for pod in list(self.pods.values()):
            self._stop(pod)
        try:
            while self.stopping:
                time.sleep(0.2)
                self.stopping = [pod for pod in self.stopping if pod.poll() is None]
        except KeyboardInterrupt:
            for pod in self.stopping:
                pod.kill()
            raise

    def _sync_deployment(self, deployment: dict) -> None:
        name = deployment["metadata"]["name"]
        pod = self.pods.get(f"{name}-0")
        if deployment["spec"].get("replicas", 1) == 0:
            if pod is not None:
                self._stop(pod)
            deployment["status"] = {"replicas": 0, "readyReplicas": 0}
            return
        if pod is None:
            pod = self._create_pod(deployment, deployment["spec"]["template"], f"{name}-0", [])
        elif pod.poll() is not None:
            due = self.crash_backoff.get(name)
            if due is None:
                delay = min(CRASH_BACKOFF_SECONDS * 2 ** pod.restarts, CRASH_BACKOFF_MAX)
                self.crash_backoff[name] = time.monotonic() + delay
                logger.warning("pod_crashed", pod=pod.name, exit_code=pod.exit_code, restart_in_s=delay,
                               log=str(pod.log_path))
            elif time.monotonic() >= due:
                del self.crash_backoff[name]
                pod.start()
        deployment["status"] = {"replicas": 1, "readyReplicas": int(pod.ready())}

    def _sync_job(self, job: dict) -> None:
        """The training operator's part: pods for the replicas, restarts by exit code, the job's conditions."""
        status = job.setdefault("status", {})
        conditions = status.get("conditions")
        if is_true(conditions, "Succeeded") or is_true(conditions, "Failed") or job["spec"]["runPolicy"].get("suspend"):
            return
        name = job["metadata"]["name"]
        replicas = list(_replicas(job))
        if "startTime" not in status:
            for replica in replicas:
                self._create_replica(job, *replica)
            status["startTime"] = _stamp()
            _set_condition(job, "Created", True, "PyTorchJobCreated", f"PyTorchJob {name} is created.")
            _set_condition(job, "Running", True, "PyTorchJobRunning", f"PyTorchJob {name} is running.")
            return
        restarted = False
        for pod_name, replica_type, index in replicas:
            pod = self.pods[pod_name]
            code = pod.poll()
            if code is None or pod.completed:
                continue
            if code == 0 and replica_type == "Master":
                _set_condition(job, "Running", False, "PyTorchJobSucceeded", "")
                _set_condition(job, "Succeeded", True, "PyTorchJobSucceeded",
                               f"PyTorchJob {name} is successfully completed.")
                self._finish(job)
                return
            if code == 0:
                pod.completed = True
            elif exitcodes.is_retryable(code):
                # restartPolicy ExitCode: the training operator deletes the pod and creates it again.
                logger.warning("pod_restarted", pod=pod_name, exit_code=code, log=str(pod.log_path))
                self._create_replica(job, pod_name, replica_type, index, previous=pod)
                _set_condition(job, "Running", False, "PyTorchJobRestarting", "")
                _set_condition(job, "Restarting", True, "PyTorchJobRestarting",
                               f"PyTorchJob {name} is restarting because 1 {replica_type} replica(s) failed.",
                               force=True)
                restarted = True
            else:
                _set_condition(job, "Running", False, "PyTorchJobFailed", "")
                _set_condition(job, "Failed", True, "PyTorchJobFailed",
                               f"PyTorchJob {name} is failed because 1 {replica_type} replica(s) failed.")
                self._finish(job)
                return
        if not restarted and is_true(conditions, "Restarting"):
            _set_condition(job, "Restarting", False, "PyTorchJobRunning", "")
            _set_condition(job, "Running", True, "PyTorchJobRunning", f"PyTorchJob {name} is running.")

    def _create_replica(self, job: Mapping, name: str, replica_type: str, index: int,
                        previous: LocalPod | None = None) -> None:
        self._create_pod(job, job["spec"]["pytorchReplicaSpecs"][replica_type]["template"], name,
                         training_operator_env(job, replica_type, index, self._master_port(job)),
                         {REPLICA_TYPE_LABEL: replica_type.lower()}, previous)

    def _finish(self, job: Mapping) -> None:
        """cleanPodPolicy Running: the replicas still running when the job ends are stopped."""
        for pod in self._owned(job["metadata"]["name"]):
            if pod.poll() is None:
                self._stop(pod)

    def _master_port(self, job: Mapping) -> int:
        master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        port = next(p["containerPort"] for p in master["ports"] if p["name"] == MASTER_PORT_NAME)
        return self.ports[job["metadata"]["name"]][port]

    # the kubelet
    def _create_pod(self, owner: Mapping, template: Mapping, name: str, injected: Sequence[tuple[str, str]],
                    extra_labels: Mapping[str, str] | None = None, previous: LocalPod | None = None) -> LocalPod:
        run = owner["metadata"]["labels"][RUN_LABEL]
        folder = self.out / run / name
        owner_name = owner["metadata"]["name"]
        process = pod_process(template, folder, self.config_maps, self.secrets, self.service_addresses(),
                              self.ports[owner_name], injected, image_env(os.environ))
        labels = dict(template["metadata"]["labels"]) | dict(extra_labels or {})
        pod = LocalPod(name, owner_name, labels, template["spec"]["containers"][0], process, folder,
                       template["spec"].get("terminationGracePeriodSeconds", GRACE_SECONDS), previous, self.lock)
        self.pods[name] = pod
        pod.start()
        return pod

    def _stop(self, pod: LocalPod) -> None:
        pod.stop()
        self.pods.pop(pod.name, None)
        self.stopping.append(pod)

    def _owned(self, owner: str) -> list[LocalPod]:
        return [pod for pod in self.pods.values() if pod.owner == owner]

    def _write_config_map(self, config_map: Mapping) -> None:
        name = config_map["metadata"]["name"]
        folder = self.out / config_map["metadata"]["labels"][RUN_LABEL] / name
        for key, text in config_map.get("data", {}).items():
            atomic_write(folder / key, text.encode())
        self.config_maps[name] = folder

    def service_addresses(self) -> dict[str, str]:
        """Cluster DNS: `<service>.<namespace>.svc...:<port>` of each Service -> the local address of the pods it
        selects (a Deployment's, by its template's labels)."""
        hosts = {}
        deployments = self._all("Deployment")
        for service in self._all("Service"):
            selector = service["spec"]["selector"]
            target = next((obj for obj in deployments
                           if selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()), None)
            if target is None:
                continue
            container = target["spec"]["template"]["spec"]["containers"][0]
            named = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
            name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
            for port in service["spec"]["ports"]:
                wanted = port.get("targetPort", port["port"])
                local = self.ports[target["metadata"]["name"]][named.get(wanted, wanted)]
                for host in (f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc",
                             f"{name}.{namespace}", name):
                    hosts[f"{host}:{port['port']}"] = f"{LOOPBACK}:{local}"
        return hosts


def _templates(obj: Mapping) -> list[Mapping]:
    if obj["kind"] == "Deployment":
        return [obj["spec"]["template"]]
    return [replica["template"] for replica in obj["spec"]["pytorchReplicaSpecs"].values()]


def _replicas(job: Mapping) -> Iterator[tuple[str, str, int]]:
    """(pod name, replica type, index) of each replica, named as the training operator names them."""
    for replica_type in ("Master", "Worker"):
        spec = job["spec"]["pytorchReplicaSpecs"].get(replica_type)
        for index in range(spec.get("replicas", 1) if spec else 0):
            yield f"{job['metadata']['name']}-{replica_type.lower()}-{index}", replica_type, index


def _set_condition(job: dict, kind: str, status: bool, reason: str, message: str, force: bool = False) -> None:
    """A JobCondition; its lastTransitionTime moves when the status flips, or with `force` (each restart)."""
    conditions = job["status"].setdefault("conditions", [])
    value = "True" if status else "False"
    found = next((c for c in conditions if c["type"] == kind), None)
    if found is None:
        if not status:
            return
        found = {"type": kind}
        conditions.append(found)
    stamp = _stamp()
    if force or found.get("status") != value:
        found["lastTransitionTime"] = stamp
    found |= {"status": value, "reason": reason, "message": message, "lastUpdateTime": stamp}
