"""An opened checkpoint: its config, its files, and where each native tensor sits in them.

Whatever the layout on disk, the backends ask for tensors by their native Mistral names; the
layout that opened the directory says under which stored name each one is, whether it is a conv
weight stored in MLX's [out, kernel, in] order, and whether it is a matrix stored MLX-quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..tensorfile import SafetensorsFile, ShardedSafetensors


@dataclass(frozen=True)
class Packed:
    """A matrix stored in MLX's affine format: ``bits``-bit values packed into uint32 words along the
    inputs (``weight``), one scale and one offset per group of ``group_size`` inputs."""

    weight: str
    scales: str
    biases: str
    group_size: int
    bits: int


@dataclass
class Checkpoint:
    """A resolved checkpoint: its directory, config and validated weights file(s).

    ``layout`` names the layout (``voxlive.layouts``): "native", "voxmlx", "mlx-audio" or
    "torch-quantized". ``names`` maps every native tensor to its stored name; ``transposed`` holds
    the native conv weights stored [out, kernel, in]; ``packed`` the native matrices stored
    MLX-quantized. ``quantization`` is an MLX layout's quantization entry ({group_size, bits}) when
    it holds packed matrices, ``quantize`` the mode of a torch-quantized checkpoint.
    """

    directory: Path
    config: ModelConfig
    weights: SafetensorsFile | ShardedSafetensors
    layout: str
    names: dict[str, str]
    transposed: frozenset[str] = frozenset()
    packed: dict[str, Packed] = field(default_factory=dict)
    quantization: dict | None = None
    quantize: str | None = None

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tekken.json"

    def native_shape(self, native: str) -> tuple[int, ...]:
        """The shape of float tensor ``native`` in native order (conv weights turned back)."""
        shape = self.weights.tensors[self.names[native]].shape
        return (shape[0], shape[2], shape[1]) if native in self.transposed else shape
