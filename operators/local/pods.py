"""Pods as local processes: a pod template translated into a command and an environment, and run as a process group.

A pod's command and env are translated, nothing else: the image's `ttrv` is this interpreter's `python -m ttrv.cli`;
a path under a volume mount is the local folder of that volume; `--host 0.0.0.0` binds loopback; `--port` and the
master port, and a `*_PORT` variable naming a container port (TTRV_METRICS_PORT), are free local ports (pods have an
address each, local processes share one); the pod's cache folder
(its XDG_CACHE_HOME volume) is this machine's cache, its other emptyDirs are folders of its own. The host's
environment stands for the image's, less what the cluster sets per pod. Resource requests are not enforced: every
process sees this machine's CPUs and GPUs.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ttrv import exitcodes, lifetime
from ttrv.labels import REPLICA_TYPE_LABEL
from ttrv.log import get_logger
from ttrv.manifests.access import STATUS_TOKEN_DIR
from ttrv.spec import SpecError

logger = get_logger(__name__)

LOOPBACK = "127.0.0.1"
# FallbackToLogsOnError: the kubelet's tail of a failed container's log.
MESSAGE_LINES, MESSAGE_BYTES = 80, 2048
# What the host's environment must not hand a pod: what the cluster sets per pod, or what would point it elsewhere
# (another store's credentials, another rollout service or metrics port).
_CLUSTER_SET_PREFIXES = ("AWS_", "PET_")
_CLUSTER_SET = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "TTRV_ROLLOUT_URL", "TTRV_S3_SECRET_DIR", "TTRV_OUT", "TTRV_METRICS_PORT", "TTRV_VLLM_ARGS"}


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
        elif "projected" in volume and path == STATUS_TOKEN_DIR:
            # The trainer's token for its status reports: there is no API server for it here (the local stand-in
            # reads progress.json from the store), and without the token ttrv/status_report.py stays off.
            continue
        elif "emptyDir" not in volume:
            raise SpecError(f"volume {mount['name']}: only configMap and emptyDir volumes have a local stand-in")
        elif volume["emptyDir"].get("medium") != "Memory":  # a Memory one is the host's /dev/shm here
            mounts[path] = folder / mount["name"]
            empty_dirs.append(folder / mount["name"])
    translate = _translator(mounts, hosts)

    env = dict(base_env)
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = _local_port(variable["name"], variable["value"], ports) or translate(variable["value"])
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


def _local_port(name: str, value: str, ports: Mapping[int, int]) -> str | None:
    """A `*_PORT` variable naming one of the container's own ports (TTRV_METRICS_PORT=9400) gets its local port:
    in a cluster each pod listens on its own address, here every pod shares loopback, so two trainers asked to bind
    9400 would collide."""
    if name.endswith("_PORT") and value.isdigit() and int(value) in ports:
        return str(ports[int(value)])
    return None


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
                 folder: Path, grace: float, previous: LocalPod | None = None, lock: lifetime.RunLock | None = None):
        self.name, self.owner, self.labels, self.container = name, owner, dict(labels), container
        self.process_spec, self.folder, self.grace, self.lock = process, folder, grace, lock
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
            # Ended with this process, even a SIGKILLed one (ttrv.lifetime): a trainer pod holds the experiment's
            # lock while it checkpoints; a rollout pod serves until no trainer holds it.
            trainer = REPLICA_TYPE_LABEL in self.labels
            self._process = lifetime.start(
                self.process_spec.command, holds=self.lock if trainer else None,
                serves=self.lock.path if self.lock is not None and not trainer else None, grace=self.grace,
                env=self.process_spec.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
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

