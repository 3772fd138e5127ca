"""Checkpoint layouts: every way a Voxtral Realtime checkpoint directory is laid out, in one place.

- ``native``: Mistral's own (params.json, consolidated.safetensors, tekken.json);
- ``voxmlx``: mlx-community repositories written by voxmlx's converter (and ``voxlive convert
  --backend mlx``): config.json with params.json's keys, renamed tensors, MLX-quantized or not;
- ``mlx_audio``: mlx-community repositories written by mlx-audio (config.json with
  ``model_type: voxtral_realtime``), MLX-quantized or not;
- ``torch_quantized``: voxlive's own int8/int4 layout (``voxlive convert``).

Each layout names things and checks them: it opens a directory into a ``Checkpoint`` that says
where each native tensor is stored and in what form. No tensor maths and no backend here, so
opening any checkpoint imports neither torch nor MLX; reading and quantizing are the backends'.
"""

from __future__ import annotations

from pathlib import Path

from ..tensorfile import CheckpointError
from . import mlx_audio, mlx_packed, native, torch_quantized, voxmlx
from .base import Checkpoint, Packed

__all__ = ["Checkpoint", "Packed", "open_directory", "is_converted", "CONVERTED_FILES"]

# What to download of a repository in one of the MLX converters' layouts.
CONVERTED_FILES = ["*.json", "model*.safetensors"]


def is_converted(directory: Path) -> bool:
    """Whether a directory holds one of the MLX converters' layouts (voxmlx's or mlx-audio's)."""
    return voxmlx.recognizes(directory) or mlx_audio.recognizes(directory)


def open_directory(directory: Path) -> Checkpoint:
    """Open a checkpoint directory in whichever layout it holds, validated against its config."""
    directory = Path(directory)
    for layout in (torch_quantized, voxmlx, mlx_audio):
        if layout.recognizes(directory):
            return layout.read(directory)
    if mlx_packed.is_candidate(directory):
        raise CheckpointError(
            f"{directory}: has config.json but no consolidated.safetensors, and config.json is neither voxmlx's "
            f"(params.json's keys) nor mlx-audio's (model_type {mlx_audio.MODEL_TYPE!r}); supported layouts: "
            f"native Mistral (params.json, consolidated.safetensors, tekken.json), mlx-community from voxmlx or "
            f"mlx-audio (config.json, model.safetensors, tekken.json), voxlive convert (quantized.safetensors)")
    return native.read(directory)
