"""Reading checkpoint tensors into torch buffers of the target dtype and device, quantized or not.

Tensors are asked for by their native names whatever the layout on disk (``voxlive.layouts``):
the checkpoint says under which name each is stored and whether a conv weight is stored in MLX's
[out, kernel, in] order. Matrices stored MLX-quantized are not read here (``voxlive.load`` sends
such checkpoints to the MLX backend).
"""

from __future__ import annotations

import torch

from ...checkpoint import Checkpoint
from ...layouts.torch_quantized import scheme_for
from .quant import QUANTIZED, STORED, Bf16Weight, Weight, quantize, uses_kernel


class WeightReader:
    """Reads tensors one at a time into their final buffers (so peak memory is the model plus one matrix).

    ``mode`` (None, "int8", "int4") quantizes linear weights as they are read from a float
    checkpoint; a quantized checkpoint (``voxlive convert``) already holds them in stored form.
    """

    _FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8,
                    "U8": torch.uint8}

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, mode: str | None = None):
        self.ckpt, self.file, self.dtype, self.device = ckpt, ckpt.weights, dtype, device
        self.mode = mode
        self.prequantized = ckpt.quantize is not None

    def _fill(self, out: torch.Tensor, name: str) -> None:
        stored = self.ckpt.names[name]
        info = self.file.tensors[stored]
        src_dtype = self._FILE_DTYPES[info.dtype]
        transposed = name in self.ckpt.transposed
        if out.device.type == "cpu" and src_dtype == out.dtype and out.is_contiguous() and not transposed:
            # Straight from the file into the final buffer: no intermediate copy.
            self.file.read_into(stored, out.view(torch.uint8).numpy() if out.dtype != torch.float32 else out.numpy())
            return
        raw = torch.from_numpy(self.file.read(stored))
        if info.dtype == "BF16":
            raw = raw.view(torch.bfloat16)
        out.copy_(raw.permute(0, 2, 1) if transposed else raw.view(out.shape))

    def get(self, name: str) -> torch.Tensor:
        out = torch.empty(self.ckpt.native_shape(name), dtype=self.dtype, device=self.device)
        self._fill(out, name)
        return out

    def fused(self, names: list[str | tuple[int, ...]], *, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> torch.Tensor:
        """Concatenation along dim 0 of several tensors, filled in place; a shape means zeros."""
        shapes = [n if isinstance(n, tuple) else self.ckpt.native_shape(n) for n in names]
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=dtype or self.dtype,
                          device=device or self.device)
        row = 0
        for name, shape in zip(names, shapes):
            part = out[row:row + shape[0]]
            if isinstance(name, tuple):
                part.zero_()
            else:
                self._fill(part, name)
            row += shape[0]
        return out

    def stored(self, names: list[str], scheme: str) -> dict[str, torch.Tensor]:
        """The stored (quantized) form of the rows of ``names`` stacked, read or computed on the CPU."""
        if self.prequantized:
            cpu = torch.device("cpu")
            return {part: self.fused([f"{n}.{part}" for n in names], dtype=dtype, device=cpu)
                    for part, dtype in STORED[scheme].items()}
        source_dtype = self._FILE_DTYPES[self.file.tensors[self.ckpt.names[names[0]]].dtype]
        return quantize(self.fused(names, dtype=source_dtype, device=torch.device("cpu")), scheme)

    def matrix(self, names: list[str]) -> Weight:
        """A linear layer's weight: the rows of ``names`` stacked, quantized as the mode says."""
        scheme = scheme_for(names[0], self.mode)
        if scheme is None:
            return Bf16Weight.wrap(self.fused(names), many_rows=not uses_kernel(names[0]))
        return QUANTIZED[scheme].from_stored(self.stored(names, scheme), self.dtype, self.device,
                                             kernel=uses_kernel(names[0]))
