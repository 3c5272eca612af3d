"""`ttrv run`: the embedded default. The same trainer entrypoint a PyTorchJob pod runs (`python -m ttrv.train`),
started as local processes with the environment torchrun and the training-operator would give it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from ttrv.log import get_logger
from ttrv.report import atomic_write
from ttrv.spec import RunSpec, StorageSpec

logger = get_logger(__name__)


def localize(spec: RunSpec, out: Path) -> RunSpec:
    """A spec that left the store at its default keeps its weights and checkpoints inside the run folder."""
    if spec.storage.uri == StorageSpec().uri:
        return spec.model_copy(update={"storage": spec.storage.model_copy(
            update={"uri": f"file://{(out / 'store').resolve()}"})})
    return spec


def trainer_command(spec_file: Path, out: Path, nproc: int) -> list[str]:
    entry = ["-m", "ttrv.train", "--spec", str(spec_file), "--out", str(out)]
    if nproc == 1:
        return [sys.executable, *entry]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *entry]


def run_local(spec: RunSpec, out: Path, nproc: int | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    spec = localize(spec, out)
    spec_file = out / "run.yaml"
    atomic_write(spec_file, yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).encode())
    nproc = nproc or spec.resources.nproc_per_node
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = trainer_command(spec_file, out, nproc)
    logger.info("local_run", out=str(out), processes=nproc, store=spec.storage.uri)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
        return process.wait()
