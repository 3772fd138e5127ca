"""``voxlive convert SRC OUT --quantize int8|int4``: write a checkpoint in voxlive's torch-quantized
layout (``voxlive.layouts.torch_quantized`` names and checks it), quantized tensor by tensor.

Loading it skips the quantization at start-up (and the bf16 read).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch

from ...checkpoint import Checkpoint, CheckpointError, expected_native_tensors
from ...layouts.torch_quantized import FORMAT, FORMAT_VERSION, expected_tensors, scheme_for
from ...layouts.torch_quantized import WEIGHTS_FILE as QUANTIZED_WEIGHTS
from ...tensorfile import DTYPES
from .quant import STORED, quantize


def write_quantized(src: Checkpoint, out: Path, mode: str) -> Path:
    """Quantize ``src`` (a float native checkpoint) tensor by tensor into directory ``out``."""
    if src.quantize is not None:
        raise CheckpointError(f"{src.directory}: already quantized ({src.quantize}); convert from the float checkpoint")
    if src.layout != "native":
        raise CheckpointError(f"{src.directory}: convert reads a checkpoint in the native Mistral layout")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    f = src.weights
    header, offset = {}, 0
    for name, (dtype, shape) in expected_tensors(src.config, mode).items():
        dtype = dtype or f.tensors[name].dtype
        n = int(torch.Size(shape).numel()) * DTYPES[dtype][1]
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
