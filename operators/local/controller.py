"""`ttrv experiment run --local`: the experiment's objects in the local cluster (cluster.py), driven by the operator's
own reconcile loop (operators/reconcile.py) until every dataset has finished."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from operators.local.cluster import LocalCluster
from operators.progress import ProgressReader
from operators.reconcile import Context, reconcile_experiment, reconcile_run
from ttrv import lifetime
from ttrv.crds import API_VERSION
from ttrv.fsutil import atomic_write, strict_json
from ttrv.labels import EXPERIMENT_LABEL
from ttrv.local import EMBEDDED_BUCKET
from ttrv.log import get_logger
from ttrv.manifests import GPU, PYTORCHJOB, experiment_objects, resource_dump
from ttrv.objectserver import EmbeddedS3
from ttrv.spec import (
    EXPERIMENT_FINISHED,
    RUN_FINISHED,
    AdaptationRunStatus,
    ExperimentSpec,
    ExperimentStatus,
    SpecError,
)

logger = get_logger(__name__)

# Memory-backed where the machine has it: the embedded server's credentials file then never reaches a disk.
_MEMORY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def run_experiment(metadata: Mapping, spec: ExperimentSpec, out: Path, poll_seconds: float = 1.0) -> dict:
    """Run every dataset of the experiment on this machine, at most `maxParallelRuns` at once; returns the final
    status document, which <out>/status.json holds too (rewritten as the experiment goes)."""
    check_runs_locally(metadata, on_embedded_store(spec, None))
    # `out` is this experiment's alone while any of its processes lives (ttrv.lifetime): refused before anything is
    # written when another holds it. The trainer pods hold the lock with it; the S3 server and the rollout pods
    # outlive this process until they have exited (checkpointed).
    with lifetime.RunLock(out) as lock:
        config_dir = tempfile.mkdtemp(prefix="ttrv-s3-config-", dir=_MEMORY_DIR)
        try:
            with EmbeddedS3(out / "s3", config_dir=config_dir, run_lock=lock.path) as s3, _environment(s3.env()):
                spec = on_embedded_store(spec, s3.endpoint)
                ref = spec.s3_secret
                secrets = {ref.name: {ref.access_key_key: s3.access_key, ref.secret_key_key: s3.secret_key}}
                return LocalController(metadata, spec, out, LocalCluster(out, secrets, lock), poll_seconds).run()
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
    for job in (obj for obj in experiment_objects(metadata, spec, PYTORCHJOB) if obj["kind"] == "PyTorchJob"):
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


class LocalController:
    """The Experiment created in the local cluster, then the operator's reconciles, one round every `poll_seconds`
    (as its poll timer would run them), until the experiment has finished."""

    def __init__(self, metadata: Mapping, spec: ExperimentSpec, out: Path, cluster: LocalCluster,
                 poll_seconds: float):
        self.out = out
        self.cluster = cluster
        self.poll_seconds = poll_seconds
        self.progress = ProgressReader()
        # Whatever a spec's scheduling.trainerApi, the local cluster runs the trainer as a PyTorchJob of local
        # processes: the pod command (`ttrv train`) and its exit codes are the same under either API.
        self.context = Context(cluster, self.progress, pinned_api=PYTORCHJOB)
        self.namespace, self.name = metadata.get("namespace") or "default", metadata["name"]
        cluster.create({"apiVersion": API_VERSION, "kind": "Experiment",
                        "metadata": {"name": self.name, "namespace": self.namespace, "annotations": {}},
                        "spec": resource_dump(spec)})
        self._written = ""

    def run(self) -> dict:
        logger.info("local_experiment_started", experiment=self.name, namespace=self.namespace, out=str(self.out),
                    store=self._experiment()["spec"]["storage"]["uri"])
        try:
            while True:
                self.cluster.sync()
                self._reconcile()
                self._write_status()
                if self._experiment()["status"].get("phase") in EXPERIMENT_FINISHED:
                    break
                time.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            logger.warning("local_experiment_interrupted", experiment=self.name,
                           hint="the trainers checkpoint as they stop; run again with the same --out to resume")
            raise
        finally:
            self.cluster.shutdown()
            self.progress.close()
        status = self._experiment()["status"]
        logger.info("local_experiment_finished", experiment=self.name, phase=status["phase"],
                    message=status.get("message", ""), status=str(self.out / "status.json"))
        return self.document()

    def _reconcile(self) -> None:
        """One round: every unfinished run (a run whose phase changes reconciles the experiment at once, as in the
        operator), the experiment, then the runs it has just created, so that they start in this round."""
        reconciled = self._reconcile_runs(skip=set())
        reconcile_experiment(self.context, self.namespace, self.name)
        self._reconcile_runs(skip=reconciled)

    def _reconcile_runs(self, skip: set[str]) -> set[str]:
        """Reconciles the unfinished runs not in `skip`; returns the names of every run there is."""
        names = set()
        for run in self._runs():
            name = run["metadata"]["name"]
            if name not in skip and (run.get("status") or {}).get("phase") not in RUN_FINISHED:
                reconcile_run(self.context, self.namespace, name)
            names.add(name)
        return names

    def _experiment(self) -> dict:
        return self.cluster.get("Experiment", self.namespace, self.name)

    def _runs(self) -> list[dict]:
        """The experiment's AdaptationRuns, in the order of its datasets (the order they are created in)."""
        order = {d["name"]: i for i, d in enumerate(self._experiment()["spec"]["datasets"])}
        runs = self.cluster.list("AdaptationRun", self.namespace, {EXPERIMENT_LABEL: self.name})
        return sorted(runs, key=lambda run: order.get(run["spec"]["dataset"], len(order)))

    def document(self) -> dict:
        """status.json: the Experiment and its AdaptationRuns with what `kubectl get -o json` shows of them (the
        statuses checked against the CRDs' models), less their specs."""
        experiment = self._experiment()
        meta = experiment["metadata"]
        return {
            "experiment": {
                "metadata": {key: meta[key] for key in ("name", "namespace", "creationTimestamp")},
                "status": resource_dump(ExperimentStatus.model_validate(experiment.get("status") or {})),
            },
            "runs": [{
                "metadata": {key: run["metadata"][key] for key in ("name", "namespace", "creationTimestamp")},
                "spec": {"experiment": run["spec"]["experiment"], "dataset": run["spec"]["dataset"]},
                "status": resource_dump(AdaptationRunStatus.model_validate(run.get("status") or {})),
            } for run in self._runs()],
        }

    def _write_status(self) -> None:
        text = strict_json(self.document(), where=str(self.out / "status.json"), indent=2) + "\n"
        if text != self._written:
            atomic_write(self.out / "status.json", text.encode())
            self._written = text
