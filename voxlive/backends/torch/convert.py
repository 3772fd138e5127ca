"""Quantized checkpoints: ``voxlive convert SRC OUT --quantize int8|int4`` writes one, ``load`` reads it.

A quantized checkpoint is a directory with the source's ``params.json`` and ``tekken.json`` and a
``quantized.safetensors`` holding every native tensor under its native name, either as it was
(norms, convolutions, ...) or, for the tensors the mode quantizes (``quant.scheme_for``), as its
stored parts ``<name>.q``, ``<name>.scale`` (and ``<name>.zero`` for int4). The file's metadata
names the format, its version and the mode; a file written by another version of the format, or
whose tensors are not exactly those the code expects, is refused with the reason, so a stale file
is never silently misread. Loading it skips the quantization at start-up (and the bf16 read).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ...checkpoint import FLOAT_DTYPES, Checkpoint, CheckpointError, SafetensorsFile, expected_native_tensors
from ...config import ModelConfig, load_config
from .quant import STORED, quantize, scheme_for, stored_shapes

QUANTIZED_WEIGHTS = "quantized.safetensors"
FORMAT = "voxlive-torch-quantized"
# Bump whenever the stored layout or what a mode quantizes changes: older files are then refused.
FORMAT_VERSION = 1
_SAFE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
               torch.uint8: "U8"}


def expected_tensors(config: ModelConfig, mode: str) -> dict[str, tuple[str | None, tuple]]:
    """Name -> (safetensors dtype, shape) of every tensor of a quantized checkpoint.

    The dtype is None for a tensor kept as it was: any float type, that of the source.
    """
    out = {}
    for name, shape in expected_native_tensors(config).items():
        scheme = scheme_for(name, mode)
        if scheme is None:
            out[name] = (None, shape)
            continue
        for part, part_shape in stored_shapes(scheme, shape).items():
            out[f"{name}.{part}"] = (_SAFE_NAMES[STORED[scheme][part]], part_shape)
    return out


def write_quantized(src: Checkpoint, out: Path, mode: str) -> Path:
    """Quantize ``src`` (a float native checkpoint) tensor by tensor into directory ``out``."""
    if src.quantize is not None:
        raise CheckpointError(f"{src.directory}: already quantized ({src.quantize}); convert from the float checkpoint")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = src.weights
    header, offset = {}, 0
    for name, (dtype, shape) in expected_tensors(src.config, mode).items():
        dtype = dtype or f.tensors[name].dtype
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=_dtype(dtype)).element_size()
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "quantize": mode}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = out / (QUANTIZED_WEIGHTS + ".partial")
    with open(tmp, "wb") as w:
        w.write(struct.pack("<Q", len(blob)))
        w.write(blob)
        for name in expected_native_tensors(src.config):
            raw = f.read(name)
            scheme = scheme_for(name, mode)
            if scheme is None:
                w.write(raw.tobytes())
                continue
            t = torch.from_numpy(raw)
            parts = quantize(t.view(torch.bfloat16) if f.tensors[name].dtype == "BF16" else t, scheme)
            for part in STORED[scheme]:
                w.write(parts[part].contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(out / QUANTIZED_WEIGHTS)
    for name in ("params.json", "tekken.json"):
        shutil.copyfile(src.directory / name, out / name)
    return out


def _dtype(safe_name: str) -> torch.dtype:
    return {v: k for k, v in _SAFE_NAMES.items()}[safe_name]


def open_quantized(directory: Path) -> Checkpoint:
    """Open and validate a quantized checkpoint directory."""
    config = load_config(directory)
    weights = SafetensorsFile(directory / QUANTIZED_WEIGHTS)
    path, meta = weights.path, weights.metadata
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a voxlive quantized checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: quantized format version {meta.get('format_version')}, this voxlive reads "
                              f"version {FORMAT_VERSION}: convert the float checkpoint again with `voxlive convert`")
    mode = meta.get("quantize")
    if mode not in STORED:
        raise CheckpointError(f"{path}: unknown quantization {mode!r}")
    found = weights.tensors
    expected = expected_tensors(config, mode)
    for name, (dtype, shape) in expected.items():
        if name not in found:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        if dtype is None and found[name].dtype in FLOAT_DTYPES:
            dtype = found[name].dtype
        if (found[name].dtype, found[name].shape) != (dtype, shape):
            raise CheckpointError(f"{path}: tensor {name!r} is {found[name].dtype} {list(found[name].shape)}, "
                                  f"expected {dtype or 'a float type'} {list(shape)}")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}")
    return Checkpoint(directory, config, weights, layout="torch-quantized", quantize=mode)
