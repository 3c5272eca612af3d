"""Checkpoints in the object store, so a preempted trainer continues exactly where it was.

Layout under the run's store prefix, with the store's set primitive (files first, manifest last):

    checkpoints/s{step:06d}-r{rank:03d}/   one set per rank: DeepSpeed's files for that rank (module, optimizer
                                           shard, scheduler) and rank_state.pt (RNG states)
    checkpoints/s{step:06d}/               the commit, written by rank 0 after every rank's set is complete:
                                           state.json (cursor, guard, evaluation so far, events so far)

A checkpoint exists only once its commit set does; resume takes the newest commit whose rank sets all verify, so a
trainer killed while checkpointing falls back to the previous checkpoint, never to a half-written one.
"""

from __future__ import annotations

import io
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ttrv.log import get_logger

logger = get_logger(__name__)
PREFIX = "checkpoints"
_COMMIT = re.compile(r"^s(\d{6})$")


def commit_prefix(step: int) -> str:
    return f"{PREFIX}/s{step:06d}"


def rank_prefix(step: int, rank: int) -> str:
    return f"{PREFIX}/s{step:06d}-r{rank:03d}"


def rng_state() -> bytes:
    buffer = io.BytesIO()
    torch.save({
        "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, buffer)
    return buffer.getvalue()


def restore_rng(data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=False)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Restored:
    step: int
    state: dict


def committed_steps(store) -> list[int]:
    return sorted(int(m.group(1)) for name in store.list_sets(PREFIX) if (m := _COMMIT.match(name)))


def save(store, engine, step: int, state: dict, rank: int, world_size: int, barrier) -> None:
    """Every rank uploads its DeepSpeed files; after a barrier rank 0 commits `state`."""
    with tempfile.TemporaryDirectory(prefix="ttrv-ckpt-") as local:
        engine.save_checkpoint(local, tag="ckpt", save_latest=False)
        folder = Path(local) / "ckpt"
        files = {path.name: path for path in sorted(folder.iterdir()) if path.is_file()}
        files["rank_state.pt"] = rng_state()
        store.publish_set(rank_prefix(step, rank), files, {"step": step, "rank": rank})
    barrier()
    if rank == 0:
        from ttrv.fsutil import strict_json

        document = strict_json(state, where="state.json").encode()
        store.publish_set(commit_prefix(step), {"state.json": document}, {"step": step, "world_size": world_size})
        logger.info("checkpoint_saved", step=step, world_size=world_size)
    barrier()


def load_latest(store, engine, rank: int, world_size: int) -> Restored | None:
    """Restore the newest complete checkpoint into `engine` and this rank's RNG; None when there is none."""
    import json

    from ttrv.store import CorruptVersionError, SetNotFoundError
    from ttrv.store.keys import local_path

    for step in reversed(committed_steps(store)):
        manifest, commit = store.read_set(commit_prefix(step))
        saved_world = manifest.meta.get("world_size")
        if saved_world != world_size:
            raise RuntimeError(f"checkpoint at step {step} was written by {saved_world} processes, this run has "
                               f"{world_size}; keep resources.nodes/processesPerNode as they were")
        try:
            _, files = store.read_set(rank_prefix(step, rank))
        except (CorruptVersionError, SetNotFoundError) as error:
            logger.warning("checkpoint_unusable", step=step, rank=rank, error=str(error))
            continue
        local = Path(tempfile.mkdtemp(prefix="ttrv-resume-"))
        try:
            folder = local / "ckpt"
            folder.mkdir()
            for name, data in files.items():
                if name != "rank_state.pt":
                    path = local_path(folder, name, f"{rank_prefix(step, rank)}: files[{name!r}]")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(bytes(data))
            engine.load_checkpoint(str(local), tag="ckpt", load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        finally:
            shutil.rmtree(local, ignore_errors=True)
        restore_rng(bytes(files["rank_state.pt"]))
        logger.info("checkpoint_restored", step=step, rank=rank)
        return Restored(step, json.loads(bytes(commit["state.json"])))
    return None


def prune(store, keep: int, world_size: int) -> None:
    """Delete all but the newest `keep` checkpoints (commit first, so a half-deleted one is invisible)."""
    for step in committed_steps(store)[:-keep]:
        store.delete_set(commit_prefix(step))
        for rank in range(world_size):
            store.delete_set(rank_prefix(step, rank))
