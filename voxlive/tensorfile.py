"""Safetensors files read with plain positioned reads, validated before any tensor is used.

Each tensor is read straight into its destination buffer: no mmap that would keep the whole file
resident beside the copy, no dictionary of every tensor at once. So loading the 8.9 GB bf16 model
costs ~9 GB of RSS, not twice that. A header that does not match the file's size, and a set of
tensors that is not exactly the expected one, are reported with the file and the tensor named.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


# safetensors dtype name -> (numpy storage dtype, bytes per element). bf16 has no numpy dtype: it
# is read as uint16 bit patterns and reinterpreted by the backend.
DTYPES = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "U32": (np.uint32, 4),
    "I32": (np.int32, 4),
    "U8": (np.uint8, 1),
    "I8": (np.int8, 1),
    "I64": (np.int64, 8),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsFile:
    """Header of a safetensors file, validated against the file's size, and reads of its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{self.path}: truncated or not a safetensors file (header of {n} bytes)")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            try:
                dtype, shape, (lo, hi) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
            if hi - lo != nbytes or lo < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {hi - lo} bytes of data for shape {list(shape)} {dtype}"
                )
            if base + hi > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {base + hi} but the file has {size}"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + lo, nbytes)

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Read tensor ``name`` into ``out`` (a C-contiguous array of the right byte size)."""
        info = self.tensors[name]
        view = memoryview(out.reshape(-1).view(np.uint8))
        if view.nbytes != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r}: buffer of {view.nbytes} bytes for {info.nbytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                done += got
        return out

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new numpy array in its storage dtype (bf16 as uint16 bits)."""
        info = self.tensors[name]
        return self.read_into(name, np.empty(info.shape, dtype=DTYPES[info.dtype][0]))


FLOAT_DTYPES = ("F32", "F16", "BF16")


class ShardedSafetensors:
    """Several safetensors files read as one (the converted layout's shards)."""

    def __init__(self, paths: list[Path]):
        self.files = [SafetensorsFile(p) for p in paths]
        self.path = paths[0] if len(paths) == 1 else paths[0].parent
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name, info in f.tensors.items():
                self.tensors[name] = info
                self._owner[name] = f

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        return self._owner[name].read_into(name, out)

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)


def check_tensors(path, expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]], found: dict,
                   source: str) -> None:
    """Exactly the ``expected`` tensors (name -> shape, allowed dtypes), with shapes from ``source``."""
    _check_names(path, expected, found)
    for name, (shape, dtypes) in expected.items():
        info = found[name]
        if info.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from {source}"
            )
        if info.dtype not in dtypes:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.dtype}, expected {' or '.join(dtypes)}")


def _check_names(path, expected: dict, found: dict) -> None:
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}{more}")
