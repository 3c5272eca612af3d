"""`ttrv run`: the embedded default. The same trainer entrypoint a PyTorchJob pod runs (`python -m ttrv.train`),
started as local processes with the environment torchrun and the training-operator would give it; with
`rollout.backend: service`, the rollout service (`ttrv serve`) beside it as a process of its own and the weight
store on an embedded S3 server (SeaweedFS), so the local run takes the cluster's path: weights travel through
object storage between two processes that share no memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import yaml

from ttrv import exitcodes, lifetime
from ttrv.fsutil import atomic_write
from ttrv.launch import accelerator_env
from ttrv.log import get_logger
from ttrv.spec import RunSpec, StorageSpec

logger = get_logger(__name__)
EMBEDDED_BUCKET = "ttrv"


def localize(spec: RunSpec, out: Path, embedded_s3: bool) -> RunSpec:
    """A spec that left the store at its default keeps its weights and checkpoints inside the run folder: on disk,
    or in the embedded S3 server's bucket."""
    if spec.storage.uri != StorageSpec().uri:
        return spec
    uri = f"s3://{EMBEDDED_BUCKET}/{spec.name}" if embedded_s3 else f"file://{(out / 'store').resolve()}"
    return spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": uri})})


def trainer_command(spec_file: Path, out: Path, nproc: int) -> list[str]:
    """One process runs the trainer entrypoint itself; several go through the pod's launcher (`ttrv train`)."""
    entry = ["--spec", str(spec_file), "--out", str(out)]
    if nproc == 1:
        return [sys.executable, "-m", "ttrv.train", *entry]
    return [sys.executable, "-m", "ttrv.cli", "train", "--standalone", f"--nproc-per-node={nproc}", *entry]


def wait_trainer(trainer: subprocess.Popen, rollout=None) -> int:
    """The trainer's exit code. A rollout service that dies meanwhile is started again at the same URL, as its
    Deployment restarts the pod in a cluster; the trainer's client retries its requests until then."""
    while True:
        try:
            return trainer.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        if rollout is not None and rollout.process.poll() is not None:
            logger.warning("rollout_service_exited", code=rollout.process.returncode, action="starting it again")
            try:
                rollout.start()
            except RuntimeError as error:  # the trainer's retry budget decides how long it waits for the service
                logger.error("rollout_service_restart_failed", error=str(error))
                rollout = None


def run_local(spec: RunSpec, out: Path, nproc: int | None = None, embedded_s3: bool | None = None) -> int:
    """Run one adaptation on this machine; the trainer's exit code (ttrv.exitcodes). Refuses (RunFolderError) an
    `out` that another run holds, or that cannot be written, before writing anything.

    Every child ends with this process, even when it is SIGKILLed (ttrv.lifetime): the trainer gets SIGTERM,
    checkpoints after its step and exits 143; it holds `out`'s lock until then, and the S3 server and the rollout
    service, which it still needs for that, stop once the lock is free."""
    from ttrv.objectserver import EmbeddedS3
    from ttrv.rollout.supervisor import ServeProcess

    service = spec.rollout.backend == "service"
    embedded_s3 = service if embedded_s3 is None else embedded_s3
    # Only a store the spec left at its default is ours to start; a store the spec names is the user's.
    start_s3 = embedded_s3 and spec.storage.uri == StorageSpec().uri
    with lifetime.RunLock(out) as lock:
        spec = localize(spec, out, embedded_s3)
        if spec.storage.uri.startswith("file://"):  # found now, not at the first publish after the model loaded
            lifetime.check_writable(Path(spec.storage.uri.removeprefix("file://")), "storage.uri")
        spec_file = out / "run.yaml"
        atomic_write(spec_file, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode())
        env = accelerator_env(os.environ)  # cuda on a machine with a GPU, unless DS_ACCELERATOR says otherwise
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with ExitStack() as stack:
            if start_s3:
                s3 = stack.enter_context(EmbeddedS3(out / "s3", run_lock=lock.path))
                env |= s3.env()
            if service:
                rollout = ServeProcess(spec_file, out / "rollout.log",
                                       env=env | {lifetime.RUN_LOCK_ENV: str(lock.path)})
                stack.callback(rollout.stop)
                rollout.start()
                env["TTRV_ROLLOUT_URL"] = rollout.url
                logger.info("rollout_service_started", url=rollout.url, log=str(out / "rollout.log"))
            nproc = nproc or spec.resources.nproc_per_node
            logger.info("local_run", out=str(out), processes=nproc, store=spec.storage.uri,
                        rollout="service" if service else "in-process")
            process = lifetime.start(trainer_command(spec_file, out, nproc), holds=lock, env=env,
                                     start_new_session=True)
            try:
                return exitcodes.of_process(wait_trainer(process, rollout if service else None))
            except KeyboardInterrupt:
                os.killpg(process.pid, signal.SIGTERM)
                return exitcodes.of_process(process.wait())
