"""safetensors shards, written straight into one buffer per shard while they are uploaded, and read back as views
of the downloaded buffer."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ttrv.store.backend import Source
from ttrv.store.checksums import DEFAULT_CHECKSUM, new_hasher
from ttrv.store.errors import CorruptVersionError, StoreConfigError, StoreError

if TYPE_CHECKING:  # torch is imported where tensors are handled: the operator reads progress without it
    import torch


@cache
def _safetensors_dtypes() -> dict[torch.dtype, str]:
    import torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    return {name: dtype for dtype, name in _safetensors_dtypes().items()}


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    filled = 0
    for name, tensor in tensors.items():
        size = tensor_bytes(tensor)
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, tensor))
        filled += size
    return shards


class SafetensorsSource(Source):
    """A safetensors file built in one buffer while it is uploaded: `digest()` copies the tensors in (each once,
    from any device) and hashes each stretch right after writing it, and `chunk()` hands out a range as soon as
    it is filled, so the first parts are on the wire while the last tensors are still being copied.

    Tensors go in order of decreasing element size, so every tensor starts aligned to its element size."""

    def __init__(self, entries: list[tuple[str, torch.Tensor]]):
        self._ordered = sorted(entries, key=lambda item: -item[1].element_size())
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, tensor in self._ordered:
            if tensor.dtype not in _safetensors_dtypes():
                raise StoreConfigError(f"tensors[{name!r}]: dtype {tensor.dtype} cannot be stored in safetensors; "
                                       f"cast it to one of {sorted(str(d) for d in _safetensors_dtypes())}")
            size = tensor_bytes(tensor)
            header[name] = {"dtype": _safetensors_dtypes()[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._start = 8 + len(encoded)
        self.buffer = np.empty(self._start + offset, dtype=np.uint8)
        self.buffer[:8] = np.frombuffer(len(encoded).to_bytes(8, "little"), dtype=np.uint8)
        self.buffer[8:self._start] = np.frombuffer(encoded, dtype=np.uint8)
        self.size = len(self.buffer)
        self._filled = 0
        self._failure: BaseException | None = None
        self._ready = threading.Condition()

    def chunk(self, offset: int, length: int) -> memoryview:
        with self._ready:
            self._ready.wait_for(lambda: self._filled >= offset + length or self._failure is not None)
            if self._failure is not None:
                raise StoreError(f"serialising the weights failed: {self._failure}")
        return memoryview(self.buffer)[offset:offset + length]

    def _advance(self, filled: int) -> None:
        with self._ready:
            self._filled = filled
            self._ready.notify_all()

    def digest(self, algorithm: str) -> str:
        import torch

        hasher = new_hasher(algorithm)
        hasher.update(self.buffer[:self._start])
        self._advance(self._start)
        target = torch.from_numpy(self.buffer)
        position = self._start
        try:
            for _, tensor in self._ordered:
                end = position + tensor_bytes(tensor)
                if end > position:
                    target[position:end].copy_(tensor.detach().reshape(-1).view(torch.uint8))
                    self._advance(end)
                    hasher.update(self.buffer[position:end])
                position = end
        except BaseException as error:
            with self._ready:
                self._failure = error
                self._ready.notify_all()
            raise
        return hasher.hexdigest()


def serialize_safetensors(entries: list[tuple[str, torch.Tensor]]) -> np.ndarray:
    """One safetensors file in one buffer, as `publish_weights` writes it."""
    source = SafetensorsSource(entries)
    source.digest(DEFAULT_CHECKSUM)
    return source.buffer


def parse_safetensors(buffer: np.ndarray, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer`, as views of it (no copy where aligned)."""
    import torch

    try:
        length = int.from_bytes(buffer[:8].tobytes(), "little")
        header = json.loads(buffer[8:8 + length].tobytes())
        start = 8 + length
        base = torch.from_numpy(buffer)
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _torch_dtypes()[info["dtype"]]
            begin, end = (start + int(position) for position in info["data_offsets"])
            if not start <= begin <= end <= len(buffer):
                raise ValueError(f"tensor {name!r} lies outside the file")
            raw = base[begin:end]
            if begin % dtype.itemsize:
                raw = raw.clone()
            tensors[name] = raw.view(dtype).reshape(info["shape"])
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise CorruptVersionError(f"{where}: not a readable safetensors file ({error})") from None

