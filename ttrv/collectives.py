"""The trainer's collectives, in one place, with every tensor they carry on the engine's device.

NCCL, the backend on GPU, reduces only tensors on the rank's CUDA device: an all_reduce of a host tensor fails at the
first step on more than one GPU. gloo, the backend on CPU, takes host tensors, so such a mistake never shows on a CPU
machine. The trainer therefore never calls torch.distributed itself (tests/test_multirank.py checks the sources):
it goes through `Collectives`, which refuses (CollectiveDeviceError) a tensor that is not on its device instead of
moving it quietly.

On CPU every tensor is on the device, so the device check alone cannot fail there. In strict mode
(TTRV_STRICT_COLLECTIVES=1, which the tests set) a tensor must also have been made by `tensor` or `place`, the two
ways onto the engine's device: a tensor built on the host and handed to a collective fails on CPU just as it would
under NCCL.

Objects (`all_gather_object`) are pickled by torch into byte tensors on the device that the backend needs: for NCCL
`torch.cuda.current_device()` (torch/distributed/distributed_c10d.py, `_get_object_coll_device` and the note on
all_gather_object: "it is the user's responsibility to ensure that this is set so that each rank has an individual
GPU, via torch.cuda.set_device()"), which ttrv.train.init_distributed sets.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

import torch

STRICT_ENV = "TTRV_STRICT_COLLECTIVES"


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective is not on the engine's device (or, in strict mode, was not placed there)."""


class Collectives:
    """all_reduce, all_gather_object and barrier over the default process group, for a world of `size` ranks whose
    tensors live on `device`. A world of one runs no collective but checks its tensors all the same."""

    def __init__(self, size: int, device: torch.device | str, strict: bool | None = None):
        self.size = size
        self.device = torch.device(device)
        self.strict = os.environ.get(STRICT_ENV) == "1" if strict is None else strict
        # id -> weak reference (a WeakSet would compare tensors with ==, which is elementwise)
        self._placed: dict[int, weakref.ref] = {}

    @property
    def active(self) -> bool:
        return self.size > 1 and torch.distributed.is_initialized()

    # ------------------------------------------------------------------ onto the device
    def tensor(self, values: Sequence[float] | float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A new tensor on the engine's device."""
        return self._mark(torch.tensor(values, dtype=dtype, device=self.device))

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the engine's device, as a tensor of its own (a collective reduces in place)."""
        return self._mark(tensor.detach().to(self.device, copy=True))

    def _mark(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.strict:
            self._placed = {key: ref for key, ref in self._placed.items() if ref() is not None}
            self._placed[id(tensor)] = weakref.ref(tensor)
        return tensor

    def check(self, tensor: torch.Tensor, what: str) -> None:
        if not _same_device(tensor.device, self.device):
            raise CollectiveDeviceError(f"{what}: a tensor on {tensor.device} was handed to a collective whose "
                                        f"engine runs on {self.device}; make it with Collectives.tensor or .place")
        ref = self._placed.get(id(tensor))
        if self.strict and (ref is None or ref() is not tensor):
            raise CollectiveDeviceError(f"{what}: a tensor that was not placed on the engine's device ({self.device}) "
                                        "was handed to a collective (it would be a host tensor under NCCL); make it "
                                        "with Collectives.tensor or .place")

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over all ranks (`op`: sum or max); returns `tensor`."""
        self.check(tensor, f"all_reduce({op})")
        if self.active:
            reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        return bool(self.all_reduce(self.tensor([1.0 if flag else 0.0]), "max").item())

    def all_gather_object(self, value: object) -> list:
        """Every rank's `value`, in rank order."""
        if not self.active:
            return [value]
        parts: list = [None] * self.size
        torch.distributed.all_gather_object(parts, value)
        return parts

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") (no index) is the current device; compare indices only where both name one
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
