"""`ttrv experiment run --local`: an experiment executed on this machine, from the objects the chart deploys.

The builders render them (`experiment_objects`, `adaptation_run`, `run_children`) and the operator's own decisions
(`decide_experiment`, `decide_run`) schedule, restart and report them, unchanged, against an in-memory API. What a
cluster's other controllers and its kubelets do with those objects is done here with local processes:

    Secret         the s3Secret, holding the embedded S3 server's generated credentials, in memory only
    ConfigMap      its keys written as files into <out>/<run>/<configmap>/, the folder that stands for its mount
    Deployment     its pod's container command as a local process, restarted with back-off when it exits (as the
                   kubelet does), ready once its readinessProbe answers
    Service        its DNS names (<name>.<namespace>.svc[.cluster.local]) resolve to the selected pod's local port
    NetworkPolicy  kept, not enforced: loopback has no pod network to police
    PyTorchJob     one local process per replica, the Master as node 0 and each Worker as a further local node, with
                   the env the training operator (v1.9) injects; restartPolicy ExitCode as it plays it: an exit
                   128-255 recreates that pod in place, 1-127 fails the job

A pod's command and env are translated, nothing else: the image's `ttrv` is this interpreter's `python -m ttrv.cli`;
a path under a volume mount is the local folder of that volume; `--host 0.0.0.0` binds loopback; `--port` and the
master port are free local ports (pods have an address each, local processes share one); the pod's cache folder
(its XDG_CACHE_HOME volume) is this machine's cache, its other emptyDirs are folders of its own. The host's
environment stands for the image's, less what the cluster sets per pod. Resource requests are not enforced: every
process sees this machine's CPUs and GPUs.

The object store is an embedded S3 server (SeaweedFS) whose objects stay in <out>/s3. An s3:// storage.uri keeps its
bucket and prefix and gets the embedded endpoint; a file:// one (the default) becomes s3://ttrv. Runs keep the
cluster's namespacing, s3://<bucket>/<prefix>/<namespace>/<experiment>/<dataset> (`run_store_uri`), so a local store
has a cluster's layout.
"""

from __future__ import annotations

import copy
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from operators.conditions import human_duration, is_true, parse_time, rfc3339
from operators.experiments import Observed as ExperimentObserved
from operators.experiments import decide_experiment
from operators.progress import parse_progress, read_progress
from operators.runs import Action, decide_run, desired_children, wants_pods, wants_progress
from operators.runs import Observed as RunObserved
from ttrv import exitcodes
from ttrv.crds import API_VERSION, adaptation_run_crd, experiment_crd
from ttrv.labels import REPLICA_TYPE_LABEL, RUN_LABEL
from ttrv.local import EMBEDDED_BUCKET
from ttrv.log import get_logger
from ttrv.manifests import GPU, MASTER_PORT_NAME, experiment_objects, resource_dump
from ttrv.objectserver import EmbeddedS3
from ttrv.report import atomic_write
from ttrv.rollout.vllm_server import free_port
from ttrv.spec import (
    EXPERIMENT_FINISHED,
    RUN_FINISHED,
    AdaptationRunStatus,
    ExperimentSpec,
    ExperimentStatus,
    SpecError,
)
from ttrv.store import StoreError

logger = get_logger("ttrv.local")

LOOPBACK = "127.0.0.1"
# The kubelet's defaults: grace after SIGTERM, and the back-off of a crashing container (10 s doubling to 5 min).
GRACE_SECONDS = 30
CRASH_BACKOFF_SECONDS, CRASH_BACKOFF_MAX = 10, 300
# FallbackToLogsOnError: the kubelet's tail of a failed container's log.
MESSAGE_LINES, MESSAGE_BYTES = 80, 2048
# What the host's environment must not hand a pod: what the cluster sets per pod, or what would point it elsewhere
# (another store's credentials, another rollout service or metrics port).
_CLUSTER_SET_PREFIXES = ("AWS_", "PET_")
_CLUSTER_SET = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "TTRV_ROLLOUT_URL", "TTRV_S3_SECRET_DIR", "TTRV_OUT", "TTRV_METRICS_PORT", "TTRV_VLLM_ARGS"}
# Memory-backed where the machine has it: the embedded server's credentials file then never reaches a disk.
_MEMORY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_experiment(metadata: Mapping, spec: ExperimentSpec, out: Path, poll_seconds: float = 1.0) -> dict:
    """Run every dataset of the experiment on this machine, at most `maxParallelRuns` at once; returns the final
    status document, which <out>/status.json holds too (rewritten as the experiment goes)."""
    check_runs_locally(metadata, on_embedded_store(spec, None))
    out.mkdir(parents=True, exist_ok=True)
    config_dir = tempfile.mkdtemp(prefix="ttrv-s3-config-", dir=_MEMORY_DIR)
    try:
        with EmbeddedS3(out / "s3", config_dir=config_dir) as s3, _environment(s3.env()):
            spec = on_embedded_store(spec, s3.endpoint)
            ref = spec.s3_secret
            secrets = {ref.name: {ref.access_key_key: s3.access_key, ref.secret_key_key: s3.secret_key}}
            return LocalController(metadata, spec, out, LocalCluster(out, secrets), poll_seconds).run()
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


def on_embedded_store(spec: ExperimentSpec, endpoint: str | None) -> ExperimentSpec:
    """The spec with its store on the embedded server: an s3:// uri keeps bucket and prefix; a file:// one means a
    folder of one machine, which the builders refuse for pods, so its runs go to the bucket s3://ttrv."""
    uri = spec.storage.uri if spec.storage.uri.startswith("s3://") else f"s3://{EMBEDDED_BUCKET}"
    return spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": uri, "endpoint": endpoint})})


def check_runs_locally(metadata: Mapping, spec: ExperimentSpec) -> None:
    """Renders every object as the operator would (raising the builders' SpecError) and refuses what this machine
    cannot stand in for."""
    if spec.suspend:
        raise SpecError("suspend: true: no run would start; set suspend: false to run the experiment locally")
    if spec.volumes:
        raise SpecError(f"volumes: PersistentVolumeClaims ({', '.join(v.claim_name for v in spec.volumes)}) exist "
                        "only in a cluster; a local run reads datasets[].path and model.path on this machine: drop "
                        "volumes and point those paths at local files")
    for job in (obj for obj in experiment_objects(metadata, spec) if obj["kind"] == "PyTorchJob"):
        replicas = job["spec"]["pytorchReplicaSpecs"]
        gpus = int(replicas["Master"]["template"]["spec"]["containers"][0]["resources"]["limits"].get(GPU, 0))
        if "Worker" in replicas and gpus:
            raise SpecError(
                f"resources: nodes {spec.resources.nodes} with gpusPerNode {gpus}: the local trainer nodes would "
                "share this machine's GPUs (local pods get no devices of their own); set resources.nodes: 1 to run "
                "locally, or gpusPerNode: 0, where the Worker replicas run as further local nodes")


@contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """The store's endpoint and credentials in this process's environment while the experiment runs: the store
    client reads progress.json with them (as the operator pod does), and the log redacts every value held there."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _stamp() -> str:
    """A condition time with microseconds: a fast-failing pod may restart twice within one second, and each restart
    must show as a new Restarting transition for decide_run to count it."""
    return _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def merge_patch(target: dict, patch: Mapping) -> None:
    """A JSON merge patch (RFC 7386), as the API server applies the decisions' patches."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


# --- the controller: the operator's decisions against an in-memory API -------------------------------------------

class LocalController:
    def __init__(self, metadata: Mapping, spec: ExperimentSpec, out: Path, cluster: LocalCluster,
                 poll_seconds: float):
        self.out = out
        self.cluster = cluster
        self.poll_seconds = poll_seconds
        self.experiment = {
            "apiVersion": API_VERSION,
            "kind": "Experiment",
            "metadata": {"name": metadata["name"], "namespace": metadata.get("namespace") or "default",
                         "uid": str(uuid.uuid4()), "generation": 1, "creationTimestamp": rfc3339(_now()),
                         "annotations": {}},
            "spec": resource_dump(spec),
            "status": {},
        }
        self.runs: list[dict] = []
        self._written = ""

    def run(self) -> dict:
        meta = self.experiment["metadata"]
        logger.info("local_experiment_started", experiment=meta["name"], namespace=meta["namespace"],
                    out=str(self.out), store=self.experiment["spec"]["storage"]["uri"])
        try:
            while True:
                self.cluster.sync()
                for run in self.runs:
                    self._reconcile_run(run)
                for run in self._reconcile_experiment():
                    self._reconcile_run(run)
                self._write_status()
                if self.experiment["status"].get("phase") in EXPERIMENT_FINISHED:
                    break
                time.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            logger.warning("local_experiment_interrupted", experiment=meta["name"],
                           hint="the trainers checkpoint as they stop; run again with the same --out to resume")
            raise
        finally:
            self.cluster.shutdown()
        status = self.experiment["status"]
        logger.info("local_experiment_finished", experiment=meta["name"], phase=status["phase"],
                    message=status.get("message", ""), status=str(self.out / "status.json"))
        return self.document()

    def _reconcile_experiment(self) -> list[dict]:
        """decide_experiment and its plan applied; returns the runs it created, to be reconciled at once."""
        plan = decide_experiment(ExperimentObserved(self.experiment, self.runs, _now()))
        created = []
        for action in plan.actions:
            if action.kind == "Experiment":
                merge_patch(self.experiment, action.body)
            elif action.verb == "create":
                run = copy.deepcopy(action.body)
                run["metadata"] |= {"uid": str(uuid.uuid4()), "generation": 1, "creationTimestamp": rfc3339(_now())}
                run["status"] = {}
                created.append(run)
                self.runs.append(run)
            else:
                merge_patch(next(run for run in self.runs if run["metadata"]["name"] == action.name), action.body)
        self.experiment["status"] = plan.status
        _post(self.experiment, plan.events)
        return created

    def _reconcile_run(self, run: dict) -> None:
        """What reconcile_run of the operator does, with this machine's cluster for the API."""
        if run["status"].get("phase") in RUN_FINISHED:
            return
        wanted = desired_children(run, kueue_enabled=False)
        children = self.cluster.children(wanted)
        job = children.get("PyTorchJob")
        pods = self.cluster.trainer_pods(job) if wants_pods(job) else ()
        progress = self._progress(run) if wants_progress(run, job) else None
        plan = decide_run(RunObserved(run, _now(), children, None, pods, progress, False, wanted))
        for action in plan.actions:
            self.cluster.apply(action)
        # The operator's merge patch removes the keys set to None.
        run["status"] = {key: value for key, value in plan.status.items() if value is not None}
        _post(run, plan.events)

    def _progress(self, run: Mapping):
        storage = run["spec"]["run"]["storage"]
        try:
            document = read_progress(storage["uri"], storage.get("endpoint"))
        except StoreError as error:
            logger.warning("progress_unreadable", run=run["metadata"]["name"], store=storage["uri"], error=str(error))
            return None
        if document is None:
            return None
        progress = parse_progress(document)
        if progress.problems:
            logger.warning("progress_breaks_contract", run=run["metadata"]["name"], problems=list(progress.problems))
        return progress

    def document(self) -> dict:
        """status.json: the Experiment and its AdaptationRuns with what `kubectl get -o json` shows of them (the
        statuses checked against the CRDs' models), less their specs."""
        meta = self.experiment["metadata"]
        return {
            "experiment": {
                "metadata": {key: meta[key] for key in ("name", "namespace", "creationTimestamp")},
                "status": resource_dump(ExperimentStatus.model_validate(self.experiment["status"])),
            },
            "runs": [{
                "metadata": {key: run["metadata"][key] for key in ("name", "namespace", "creationTimestamp")},
                "spec": {"experiment": run["spec"]["experiment"], "dataset": run["spec"]["dataset"]},
                "status": resource_dump(AdaptationRunStatus.model_validate(run["status"])),
            } for run in self.runs],
        }

    def _write_status(self) -> None:
        text = json.dumps(self.document(), indent=2) + "\n"
        if text != self._written:
            atomic_write(self.out / "status.json", text.encode())
            self._written = text


def _post(body: Mapping, events) -> None:
    """The decisions' Kubernetes Events, as log lines."""
    for event in events:
        (logger.warning if event.type == "Warning" else logger.info)(
            "event_posted", object=f"{body['kind']}/{body['metadata']['name']}", reason=event.reason,
            message=event.message)


# --- the cluster: objects, and what its controllers and kubelets do with them ------------------------------------

class LocalCluster:
    def __init__(self, out: Path, secrets: Mapping[str, Mapping[str, str]]):
        self.out = out
        self.secrets = secrets
        self.objects: dict[tuple[str, str], dict] = {}
        self.pods: dict[str, LocalPod] = {}
        self.stopping: list[LocalPod] = []
        self.config_maps: dict[str, Path] = {}
        self.ports: dict[str, dict[int, int]] = {}
        """Deployment or PyTorchJob name -> its pods' containerPort -> local port (kept across restarts, as a
        restarted pod keeps its Service)."""
        self.crash_backoff: dict[str, float] = {}
        """Deployment name -> when its crashed pod's container starts again."""

    # the API
    def apply(self, action: Action) -> None:
        key = (action.kind, action.name)
        if action.verb == "create":
            obj = copy.deepcopy(dict(action.body))
            obj["metadata"] |= {"uid": str(uuid.uuid4()), "creationTimestamp": rfc3339(_now())}
            self.objects[key] = obj
            if obj["kind"] == "ConfigMap":
                self._write_config_map(obj)
            elif obj["kind"] in ("Deployment", "PyTorchJob"):
                containers = [c for t in _templates(obj) for c in t["spec"]["containers"]]
                self.ports[action.name] = {port["containerPort"]: free_port()
                                           for c in containers for port in c.get("ports", [])}
        elif action.verb == "patch":
            merge_patch(self.objects[key], action.body)
        else:
            if self.objects.pop(key, None) is not None:
                for pod in self._owned(action.name):
                    self._stop(pod)

    def children(self, wanted: Sequence[Mapping]) -> dict[str, dict]:
        found = {}
        for obj in wanted:
            existing = self.objects.get((obj["kind"], obj["metadata"]["name"]))
            if existing is not None:
                found[obj["kind"]] = existing
        return found

    def trainer_pods(self, job: Mapping | None) -> list[dict]:
        return [pod.as_pod() for pod in self._owned(job["metadata"]["name"])] if job else []

    # the controllers
    def sync(self) -> None:
        for obj in list(self.objects.values()):
            if obj["kind"] == "Deployment":
                self._sync_deployment(obj)
            elif obj["kind"] == "PyTorchJob":
                self._sync_job(obj)
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
                       template["spec"].get("terminationGracePeriodSeconds", GRACE_SECONDS), previous)
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
        for service in (obj for obj in self.objects.values() if obj["kind"] == "Service"):
            selector = service["spec"]["selector"]
            target = next((obj for obj in self.objects.values() if obj["kind"] == "Deployment"
                           and selector.items() <= obj["spec"]["template"]["metadata"]["labels"].items()), None)
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


# --- pods: the translation of a pod template into a local process ------------------------------------------------

def training_operator_env(job: Mapping, replica_type: str, index: int, master_port: int) -> list[tuple[str, str]]:
    """What the training operator (v1.9, pytorch/envvar.go) appends to a replica's container env, in its order;
    the master's address (its Service `<job>-master-0`) is loopback here, its port a free local one."""
    specs = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(spec.get("replicas", 1) for spec in specs.values())
    nproc = str(job["spec"].get("nprocPerNode") or "1")
    world = nodes * (int(nproc) if nproc.isdigit() else 1)  # "auto" and the like count as one, as there
    rank = index + 1 if replica_type == "Worker" else index
    return [
        ("PYTHONUNBUFFERED", "0"),  # the operator's value; any non-empty value unbuffers Python
        ("MASTER_PORT", str(master_port)), ("MASTER_ADDR", LOOPBACK),
        ("PET_MASTER_PORT", str(master_port)), ("PET_MASTER_ADDR", LOOPBACK),
        ("WORLD_SIZE", str(world)), ("RANK", str(rank)),
        ("PET_NPROC_PER_NODE", nproc), ("PET_NODE_RANK", str(rank)), ("PET_NNODES", str(nodes)),
    ]


def image_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The host's environment standing for the image's: PATH, PYTHONPATH, thread counts and the like pass; what the
    cluster sets per pod or what would point elsewhere does not."""
    return {name: value for name, value in environ.items()
            if name not in _CLUSTER_SET and not name.startswith(_CLUSTER_SET_PREFIXES)}


@dataclass(frozen=True)
class PodProcess:
    command: list[str]
    env: dict[str, str]
    empty_dirs: list[Path]
    """Folders standing for the pod's emptyDir volumes: new ones for each new pod."""
    readiness: tuple[str, int] | None
    """(path, local port) of the container's httpGet readinessProbe."""


def pod_process(template: Mapping, folder: Path, config_maps: Mapping[str, Path],
                secrets: Mapping[str, Mapping[str, str]], hosts: Mapping[str, str], ports: Mapping[int, int],
                injected: Sequence[tuple[str, str]], base_env: Mapping[str, str]) -> PodProcess:
    """The local process of a pod template's one container: its command and env with mounted paths, Service names
    and ports translated, `secretKeyRef` values resolved from `secrets` (Secret name -> key -> value), the
    controllers' `injected` variables appended after the container's own, as they append them."""
    spec = template["spec"]
    if len(spec["containers"]) != 1:
        raise SpecError(f"a local pod runs one container; this template has {len(spec['containers'])}")
    container = spec["containers"][0]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    # The pod's cache folder (its XDG_CACHE_HOME) is this machine's: models are downloaded and extensions compiled
    # once here, not in every pod (the image's read-only root is why the pod needs a volume for it at all).
    cache = next((v.get("value") for v in container.get("env", []) if v["name"] == "XDG_CACHE_HOME"), None)
    host_cache = Path(base_env.get("XDG_CACHE_HOME") or Path(base_env.get("HOME") or Path.home()) / ".cache")
    mounts, empty_dirs = {}, []
    for mount in container.get("volumeMounts", []):
        volume, path = volumes[mount["name"]], mount["mountPath"]
        if "configMap" in volume:
            mounts[path] = config_maps[volume["configMap"]["name"]]
        elif path == cache:
            mounts[path] = host_cache
        elif "emptyDir" not in volume:
            raise SpecError(f"volume {mount['name']}: only configMap and emptyDir volumes have a local stand-in")
        elif volume["emptyDir"].get("medium") != "Memory":  # a Memory one is the host's /dev/shm here
            mounts[path] = folder / mount["name"]
            empty_dirs.append(folder / mount["name"])
    translate = _translator(mounts, hosts)

    env = dict(base_env)
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = translate(variable["value"])
            continue
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is None or ref["key"] not in secrets.get(ref["name"], {}):
            raise SpecError(f"env {variable['name']}: {variable.get('valueFrom')} cannot be resolved here; a local "
                            f"pod gets secretKeyRef values of the Secrets {sorted(secrets)} only")
        env[variable["name"]] = secrets[ref["name"]][ref["key"]]
    env.update(injected)
    if "/tmp" in mounts:
        # Temporary files, and the trainer's default out folder (/tmp/ttrv-out), lie in the pod's /tmp volume.
        env.setdefault("TMPDIR", str(mounts["/tmp"]))
        env.setdefault("TTRV_OUT", str(mounts["/tmp"] / "ttrv-out"))

    readiness = None
    probe = container.get("readinessProbe", {}).get("httpGet")
    if probe is not None:
        named = {port.get("name"): port["containerPort"] for port in container.get("ports", [])}
        readiness = (probe.get("path", "/"), ports[named.get(probe["port"], probe["port"])])
    command = local_command([*container.get("command", []), *container.get("args", [])], translate, ports)
    return PodProcess(command, env, empty_dirs, readiness)


def local_command(argv: Sequence[str], translate: Callable[[str], str], ports: Mapping[int, int]) -> list[str]:
    """The container's command on this machine: the image's `ttrv` entrypoint is this interpreter's, a server binds
    loopback instead of every interface, a `--port` of the container is its local port."""
    # The interpreter is this machine's path, never translated: a checkout under /tmp is not in the pod's /tmp.
    entry, argv = ([sys.executable, "-m", "ttrv.cli"], argv[1:]) if argv and argv[0] == "ttrv" else ([], argv)
    local = []
    for previous, arg in zip(["", *argv], argv, strict=False):
        if previous == "--host" and arg == "0.0.0.0":
            arg = LOOPBACK
        elif previous == "--port" and arg.isdigit() and int(arg) in ports:
            arg = str(ports[int(arg)])
        local.append(translate(arg))
    return entry + local


def _translator(mounts: Mapping[str, Path], hosts: Mapping[str, str]) -> Callable[[str], str]:
    longest_first = sorted(mounts, key=len, reverse=True)

    def translate(value: str) -> str:
        for path in longest_first:
            if value == path or value.startswith(path.rstrip("/") + "/"):
                value = str(mounts[path]) + value[len(path):]
                break
        for host, local in hosts.items():
            value = value.replace(f"//{host}", f"//{local}")
        return value

    return translate


class LocalPod:
    """A pod as a process group of this machine; its container's log in <folder>/log, across restarts."""

    def __init__(self, name: str, owner: str, labels: Mapping[str, str], container: Mapping, process: PodProcess,
                 folder: Path, grace: float, previous: LocalPod | None = None):
        self.name, self.owner, self.labels, self.container = name, owner, dict(labels), container
        self.process_spec, self.folder, self.grace = process, folder, grace
        self.log_path = folder / "log"
        self.restarts = previous.restarts + 1 if previous else 0
        self.last_exit = (previous.exit_code, previous.termination_message()) if previous else None
        self.exit_code: int | None = None
        self.completed = False
        self._process: subprocess.Popen | None = None
        self._log_start = 0
        self._deadline: float | None = None
        for empty_dir in process.empty_dirs:
            shutil.rmtree(empty_dir, ignore_errors=True)
            empty_dir.mkdir(parents=True)

    def start(self) -> None:
        """(Re)starts the container; a restart in the same pod keeps its emptyDirs, as the kubelet's does."""
        if self._process is not None:
            self.restarts += 1
            self.last_exit = (self.exit_code, self.termination_message())
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_start = log.tell()
            self._process = subprocess.Popen(self.process_spec.command, env=self.process_spec.env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
        self.exit_code, self._deadline = None, None
        logger.info("pod_started", pod=self.name, pid=self._process.pid, restarts=self.restarts,
                    log=str(self.log_path))

    def poll(self) -> int | None:
        """The container's exit code once it exited (killed by signal s: 128 + s, as the kubelet reports it)."""
        if self.exit_code is not None:
            return self.exit_code
        code = self._process.poll()
        if code is None:
            if self._deadline is not None and time.monotonic() > self._deadline:
                self.kill()
            return None
        # The container ends with its main process: what that left behind goes with it.
        _signal_group(self._process.pid, signal.SIGKILL)
        self.exit_code = exitcodes.of_process(code)
        return self.exit_code

    def stop(self) -> None:
        if self.poll() is None and self._deadline is None:
            _signal_group(self._process.pid, signal.SIGTERM)
            self._deadline = time.monotonic() + self.grace

    def kill(self) -> None:
        _signal_group(self._process.pid, signal.SIGKILL)

    def ready(self) -> bool:
        if self.poll() is not None:
            return False
        if self.process_spec.readiness is None:
            return True
        path, port = self.process_spec.readiness
        # http.client, not urllib: no proxy from the environment may stand between us and loopback.
        connection = http.client.HTTPConnection(LOOPBACK, port, timeout=1)
        try:
            connection.request("GET", path)
            return 200 <= connection.getresponse().status < 400
        except OSError:
            return False
        finally:
            connection.close()

    def termination_message(self) -> str:
        """terminationMessagePolicy FallbackToLogsOnError of a failed container: the tail of this start's log."""
        if not self.exit_code or self.container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return ""
        with self.log_path.open("rb") as log:
            log.seek(max(self._log_start, log.seek(0, os.SEEK_END) - MESSAGE_BYTES))
            tail = log.read()
        return b"".join(tail.splitlines(keepends=True)[-MESSAGE_LINES:]).decode("utf-8", "replace")

    def as_pod(self) -> dict:
        """The pod as the API shows it, as far as decide_run reads it."""
        def terminated(code: int, message: str) -> dict:
            return {"terminated": {"exitCode": code, "message": message}}

        status = {"name": self.container["name"], "restartCount": self.restarts,
                  "state": {"running": {}} if self.poll() is None else
                  terminated(self.exit_code, self.termination_message())}
        if self.last_exit is not None:
            status["lastState"] = terminated(*self.last_exit)
        return {"metadata": {"name": self.name, "labels": self.labels}, "status": {"containerStatuses": [status]}}


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


# --- the table -------------------------------------------------------------------------------------------------

def status_table(document: Mapping, now: datetime | None = None) -> str:
    """`kubectl get experiments` and `kubectl get adaptationruns -o wide` of a status document (the CRDs' own
    printer columns), then why each failed run failed."""
    now = now or _now()
    lines = [_table([document["experiment"]], experiment_crd(), now), "", _table(document["runs"], adaptation_run_crd(), now)]
    for run in document["runs"]:
        if run["status"].get("phase") == "Failed":
            lines += ["", f"{run['metadata']['name']} failed: {run['status'].get('message', '')}".rstrip()]
    return "\n".join(lines)


def _table(items: Sequence[Mapping], crd: Mapping, now: datetime) -> str:
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    rows = [["NAME", *(column["name"].upper() for column in columns)]]
    rows += [[item["metadata"]["name"], *(_cell(item, column, now) for column in columns)] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _cell(item: Mapping, column: Mapping, now: datetime) -> str:
    value = item
    for key in column["jsonPath"].strip(".").split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    if value is None:
        return ""
    if column["type"] == "date":
        return human_duration((now - parse_time(value)).total_seconds())
    return f"{value:g}" if isinstance(value, float) else str(value)
