"""Writing a native checkpoint in the mlx-community converted layout, optionally quantized.

The output loads in voxlive (``backend="mlx"``) and follows the layout of voxmlx's converter, which
wrote the mlx-community checkpoints: renamed tensors, conv weights as [out, kernel, in], every
matrix whose inputs fill whole groups quantized, ``config.json`` = params.json + quantization,
``tekken.json`` copied. The whole converted model is held in memory once before it is saved
(~3.5 GB at 6 bits for the real model, 8.9 GB unquantized in bf16).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx

from ...checkpoint import CheckpointError, expected_native_tensors, open_checkpoint
from ...config import read_json
from ...layouts import mlx_packed, native, voxmlx
from ..runtime import pick_dtype
from .quant import BITS, GROUP_SIZE
from .runtime import DTYPES
from .thread import mlx_thread
from .weights import WeightReader


def convert(source, output, *, quantize: str | None = None, dtype: str | None = None,
            group_size: int = GROUP_SIZE) -> Path:
    """Read a native checkpoint (directory or repo id) and write it to ``output`` in the converted layout."""
    if quantize is not None and quantize not in BITS:
        raise ValueError(f"the MLX backend quantizes to {sorted(BITS)}, got {quantize!r}")
    ckpt = open_checkpoint(source)
    if ckpt.layout != "native":
        raise CheckpointError(f"{ckpt.directory}: convert reads a checkpoint in the native Mistral layout")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"{output}: exists and is not empty")
    output.mkdir(parents=True, exist_ok=True)
    bits = BITS[quantize] if quantize else None

    def write() -> None:
        reader = WeightReader(ckpt, pick_dtype(dtype, DTYPES, "bfloat16"))
        tensors: dict[str, mx.array] = {}
        for nat, shape in expected_native_tensors(ckpt.config).items():
            a = reader.get(nat)
            name = voxmlx.converted_name(nat)
            if native.is_conv_weight(nat):
                tensors[name] = a.transpose(0, 2, 1)
            elif bits is not None and voxmlx.quantizable(nat, shape, group_size):
                packed, scales, biases = mx.quantize(a, group_size=group_size, bits=bits)
                for part, value in zip(mlx_packed.parts(name), (packed, scales, biases)):
                    tensors[part] = value
            else:
                tensors[name] = a
            mx.eval(list(tensors.values())[-3:])
        mx.save_safetensors(str(output / mlx_packed.WEIGHTS_FILE), tensors, metadata={"format": "mlx"})

    mlx_thread().run(write)
    quantization = {"group_size": group_size, "bits": bits} if bits else None
    voxmlx.write_config(output, read_json(ckpt.directory / "params.json"), quantization)
    shutil.copy(ckpt.tokenizer_path, output / "tekken.json")
    return output
