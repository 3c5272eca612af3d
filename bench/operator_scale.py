"""Scale benchmark of the operator's reconcile logic: N experiments x M datasets, from creation to the end.

What runs: the reconcile loop the kopf handlers call (operators.reconcile.reconcile_experiment and reconcile_run:
read the objects, decide, apply the plan), unchanged, with a Context of its own: the in-memory API of
`ttrv experiment run --local` (operators/local/api.py), which stores objects as JSON text, so every read decodes
and every write encodes as with a real client. The cluster's controllers are simulated, one step
per tick: rollout Deployments become ready, PyTorchJobs start, their trainers' progress.json advances, and they
succeed (3% fail with a permanent exit code, 5% restart once in place). Each tick the operator reconciles every
unfinished run and experiment, as its poll timer would (kopf's change and child events add reconciles of the same
kind, not of another).

What does not run: kopf itself (watches, queues, its thread pool), HTTP and a real API server, the object store.
Events are counted instead of posted (kopf's event queue exists only inside kopf). `--http N` also drives N
experiments through the kmock API stand-in of the tests, over HTTP, to show what a network round trip adds.

Prints reconcile latency (p50/p99) per kind, the decisions alone, peak memory; the last line is
`p99_reconcile_ms=<x>` over every reconcile.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from operators import experiments, metrics, runs  # noqa: E402
from operators.local.api import MemoryKube  # noqa: E402
from operators.reconcile import Context, now, reconcile_experiment, reconcile_run  # noqa: E402
from ttrv.crds import API_VERSION  # noqa: E402
from ttrv.labels import COMPONENT_LABEL, EXPERIMENT_LABEL, RUN_LABEL, TRAINER  # noqa: E402
from ttrv.spec import EXPERIMENT_FINISHED, RUN_FINISHED  # noqa: E402

NS_COUNT = 50


class Cluster:
    """The controllers the operator relies on, one step per tick, and the trainers' progress."""

    def __init__(self, kube, seed: int):
        self.kube = kube
        self.rng = random.Random(seed)
        self.jobs: dict[str, dict] = {}  # job uid -> its simulated life
        self.progress: dict[str, dict] = {}

    def read_progress(self, uri, endpoint=None):
        return self.progress.get(uri)

    def step(self, now: str) -> None:
        for (namespace, name), text in list(self.kube.objects["Deployment"].items()):
            deployment = json.loads(text)
            ready = (deployment.get("status") or {}).get("readyReplicas", 0)
            if deployment["spec"]["replicas"] != ready:
                self.kube.patch("Deployment", namespace, name, {"status": {"readyReplicas": deployment["spec"]["replicas"]}},
                                status=True)
        for (namespace, name), text in list(self.kube.objects["PyTorchJob"].items()):
            job = json.loads(text)
            uid = job["metadata"]["uid"]
            life = self.jobs.setdefault(uid, {"age": 0, "fate": self.rng.choices(
                ("succeed", "fail", "restart"), (92, 3, 5))[0], "run": job["metadata"]["labels"][RUN_LABEL]})
            if job["spec"]["runPolicy"].get("suspend") or life.get("done"):
                continue
            life["age"] += 1
            age = life["age"]
            conditions = [cond("Created")]
            if life["fate"] == "fail" and age == 2:
                conditions += [cond("Running", False), cond("Failed", message='"Master" replica(s) failed.')]
                self.trainer_exit(namespace, life["run"], 2)
                life["done"] = True
            elif life["fate"] == "restart" and age == 2:
                conditions += [cond("Restarting", at=now)]
            elif age >= 5:
                conditions += [cond("Running", False), cond("Succeeded")]
                life["done"] = True
            else:
                conditions += [cond("Running")]
            self.kube.patch("PyTorchJob", namespace, name, {"status": {"conditions": conditions}}, status=True)
            uri = f"s3://ttrv/bench/{namespace}/{life['run']}"
            self.progress[uri] = {"progressPercentage": min(100.0, age * 25.0), "step": age, "totalSteps": 4,
                                  "estimatedRemainingSeconds": max(0, 4 - age) * 600, "weightVersion": age,
                                  "checkpointStep": age, "baseAccuracy": 0.4, "accuracy": 0.4 + 0.02 * age}

    def trainer_exit(self, namespace: str, run: str, code: int) -> None:
        self.kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"{run}-trainer-master-0", "namespace": namespace,
            "labels": {RUN_LABEL: run, COMPONENT_LABEL: TRAINER}},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "pytorch", "state": {"terminated": {
                "exitCode": code, "message": "bad spec"}}}]}})


def cond(kind: str, status: bool = True, message: str = "", at: str = "2026-03-01T12:00:00Z") -> dict:
    return {"type": kind, "status": "True" if status else "False", "reason": f"PyTorchJob{kind}", "message": message,
            "lastTransitionTime": at, "lastUpdateTime": at}


def experiment_body(index: int, datasets: int, parallel: int) -> dict:
    return {"apiVersion": API_VERSION, "kind": "Experiment",
            "metadata": {"name": f"exp-{index:04d}", "namespace": f"team-{index % NS_COUNT:02d}"},
            "spec": {"storage": {"uri": "s3://ttrv/bench"}, "maxParallelRuns": parallel,
                     "rollout": {"backend": "service" if index % 2 else "inprocess"},
                     "datasets": [{"name": f"d{d:02d}", "path": f"/data/d{d:02d}.json"} for d in range(datasets)]}}


@contextlib.contextmanager
def timed_reconciles(samples: dict[str, list[float]]):
    """Records what metrics.reconciling measures (one object's read-decide-write, a nested reconcile of the
    parent not included)."""
    original = metrics.reconciling

    @contextlib.contextmanager
    def record(kind):
        started = time.perf_counter()
        with original(kind):
            yield
        samples[kind].append((time.perf_counter() - started) * 1000)

    metrics.reconciling = record
    try:
        yield
    finally:
        metrics.reconciling = original


def drive(kube, cluster: Cluster, count: int, datasets: int, parallel: int, samples, max_ticks: int) -> int:
    events = [0]
    ctx = Context(kube, cluster.read_progress, post_event=lambda body, event: events.__setitem__(0, events[0] + 1))
    names = []
    for index in range(count):
        body = kube.create(experiment_body(index, datasets, parallel))
        names.append((body["metadata"]["namespace"], body["metadata"]["name"]))
    with timed_reconciles(samples):
        for tick in range(max_ticks):
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_800_000_000 + tick * 30))
            cluster.step(now)
            for (namespace, name), text in list(kube.objects["AdaptationRun"].items()):
                if (json.loads(text).get("status") or {}).get("phase") not in RUN_FINISHED:
                    reconcile_run(ctx, namespace, name)
            unfinished = [(ns, n) for ns, n in names
                          if (kube.get("Experiment", ns, n).get("status") or {}).get("phase")
                          not in EXPERIMENT_FINISHED]
            for namespace, name in unfinished:
                reconcile_experiment(ctx, namespace, name)
            if not unfinished:
                return tick + 1
    raise SystemExit(f"not finished after {max_ticks} ticks")


def decision_samples(kube, rounds: int = 2000) -> dict[str, list[float]]:
    """The decisions alone, on objects as the finished benchmark left them."""
    out = {"decide_experiment": [], "decide_run": []}
    experiment_items = list(kube.objects["Experiment"].items())[:rounds]
    for (namespace, name), text in experiment_items:
        body = json.loads(text)
        owned = kube.list("AdaptationRun", namespace, {EXPERIMENT_LABEL: name})
        started = time.perf_counter()
        experiments.decide_experiment(experiments.Observed(body, owned, now()))
        out["decide_experiment"].append((time.perf_counter() - started) * 1000)
    for (namespace, _name), text in list(kube.objects["AdaptationRun"].items())[:rounds]:
        run = json.loads(text)
        run["status"]["phase"] = "Running"  # a finished run decides nothing; measure a live one
        wanted = runs.desired_children(run, False)
        children = {o["kind"]: kube.get(o["kind"], namespace, o["metadata"]["name"]) for o in wanted}
        children = {k: v for k, v in children.items() if v is not None}
        started = time.perf_counter()
        runs.decide_run(runs.Observed(run, now(), children, desired=wanted))
        out["decide_run"].append((time.perf_counter() - started) * 1000)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(label: str, values: list[float]) -> None:
    print(f"{label:32s} n={len(values):7d}  p50={percentile(values, 0.5):7.2f} ms  "
          f"p99={percentile(values, 0.99):7.2f} ms  mean={statistics.fmean(values):6.2f} ms")


def http_sample(count: int, datasets: int, parallel: int) -> dict[str, list[float]]:
    """The same drive, through the tests' kmock API stand-in over HTTP (the client runs in a thread, as in kopf)."""
    import os
    import tempfile

    import kmock
    from kube_standin import KubeStandIn, kubeconfig

    from operators.kube import Kube

    samples: dict[str, list[float]] = defaultdict(list)

    async def main():
        async with KubeStandIn() as api, kmock.Server(api) as server:
            api.declare_cluster()
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
                handle.write(kubeconfig(str(server.url).rstrip("/")))
            os.environ["KUBECONFIG"] = handle.name
            kube = Kube.from_environment()
            mirror = HttpMirror(kube)
            await asyncio.to_thread(drive, mirror, Cluster(mirror, seed=1), count, datasets, parallel, samples, 200)
            kube.close()

    asyncio.run(main())
    return samples


class HttpMirror(MemoryKube):
    """The real client for the operator; a shadow copy for the simulated controllers to iterate over."""

    def __init__(self, kube):
        super().__init__()
        self.kube = kube

    def get(self, kind, namespace, name):
        return self.kube.get(kind, namespace, name)

    def list(self, kind, namespace, labels):
        return self.kube.list(kind, namespace, labels)

    def create(self, obj):
        created = self.kube.create(obj)
        if created is not None:
            self._shadow(created)
        return created

    def patch(self, kind, namespace, name, patch, status=False):
        patched = self.kube.patch(kind, namespace, name, patch, status)
        if patched is not None:
            self._shadow(patched)
        return patched

    def delete(self, kind, namespace, name):
        self.kube.delete(kind, namespace, name)
        super().delete(kind, namespace, name)

    def _shadow(self, obj):
        meta = obj["metadata"]
        self.objects[obj["kind"]][(meta["namespace"], meta["name"])] = json.dumps(obj)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--datasets", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=4, help="maxParallelRuns of every experiment")
    parser.add_argument("--http", type=int, default=0, metavar="N", help="also drive N experiments over HTTP")
    args = parser.parse_args()

    kube = MemoryKube()
    samples: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    ticks = drive(kube, Cluster(kube, seed=0), args.experiments, args.datasets, args.parallel, samples, 200)
    elapsed = time.perf_counter() - started
    phases = defaultdict(int)
    for text in kube.objects["Experiment"].values():
        phases[json.loads(text)["status"]["phase"]] += 1
    print(f"{args.experiments} experiments x {args.datasets} datasets (maxParallelRuns {args.parallel}): "
          f"{ticks} ticks, {sum(len(v) for v in samples.values())} reconciles, {kube.writes} API writes, "
          f"{elapsed:.1f} s; experiments by phase: {dict(phases)}")
    for kind, values in sorted(samples.items()):
        report(f"reconcile {kind} (in-memory API)", values)
    for kind, values in decision_samples(kube).items():
        report(kind, values)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"memory: peak RSS {peak:.0f} MiB, of which the in-memory API's objects {kube.stored_bytes() / 2**20:.0f} MiB "
          f"of JSON ({sum(len(t) for t in kube.objects.values())} objects)")
    if args.http:
        for kind, values in sorted(http_sample(args.http, args.datasets, args.parallel).items()):
            report(f"reconcile {kind} (HTTP stand-in)", values)
    everything = [v for values in samples.values() for v in values]
    print(f"p99_reconcile_ms={percentile(everything, 0.99):.2f}")


if __name__ == "__main__":
    main()
