"""Reading checkpoint tensors into MLX arrays, by native name, from any layout.

The encoder, adapter and decoder ask for tensors by their native names whatever the layout on
disk: the checkpoint (``voxlive.layouts``) says under which name each is stored, which conv
weights are stored [out, kernel, in] (turned back to [out, in, kernel] here) and which matrices are
stored MLX-quantized. Matrices come back dense, or quantized: as stored, or quantized here on
load when ``bits`` is set.
"""

from __future__ import annotations

import mlx.core as mx

from ...checkpoint import Checkpoint, CheckpointError
from ...layouts.voxmlx import quantizable
from .quant import GROUP_SIZE, QuantizedWeight


class WeightReader:
    def __init__(self, ckpt: Checkpoint, dtype: mx.Dtype, bits: int | None = None, group_size: int = GROUP_SIZE):
        self.ckpt, self.file, self.dtype = ckpt, ckpt.weights, dtype
        self.bits, self.group_size = bits, group_size

    def _raw(self, name: str) -> mx.array:
        """A stored tensor as it is in the file, bf16 reinterpreted from its uint16 bits."""
        a = mx.array(self.file.read(name))
        return a.view(mx.bfloat16) if self.file.tensors[name].dtype == "BF16" else a

    def get(self, native: str) -> mx.array:
        """A float tensor in native layout and the target dtype, evaluated."""
        a = self._raw(self.ckpt.names[native])
        if native in self.ckpt.transposed:
            a = a.transpose(0, 2, 1)
        a = a.astype(self.dtype)
        mx.eval(a)
        return a

    def fused(self, names: list[str | tuple[int, ...]]) -> mx.array:
        """Concatenation along dim 0 of several tensors; a shape means zeros."""
        parts = [mx.zeros(n, self.dtype) if isinstance(n, tuple) else self.get(n) for n in names]
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts)
        mx.eval(out)
        return out

    def _stored_quantized(self, native: str) -> QuantizedWeight | None:
        p = self.ckpt.packed.get(native)
        if p is None:
            return None
        return QuantizedWeight(self._raw(p.weight), self._raw(p.scales).astype(self.dtype),
                               self._raw(p.biases).astype(self.dtype), p.group_size, p.bits)

    def matrix(self, names: list[str]) -> mx.array | QuantizedWeight:
        """A weight matrix (several fused along dim 0): quantized if stored so or if ``bits`` is set."""
        stored = [self._stored_quantized(n) for n in names]
        if any(s is not None for s in stored):
            if any(s is None for s in stored):
                raise CheckpointError(f"{self.file.path}: {names} must be all quantized or all float to be fused")
            if len({(s.group_size, s.bits) for s in stored}) > 1:
                raise CheckpointError(f"{self.file.path}: {names} are quantized with different bits or group sizes; "
                                      f"voxlive multiplies them as one matrix, so it cannot read this mixed recipe")
            m = stored[0] if len(stored) == 1 else QuantizedWeight.concatenate(stored)
            mx.eval(m.arrays())
            return m
        dense = self.fused(names)
        if self.bits is not None and quantizable(names[0], tuple(dense.shape), self.group_size):
            m = QuantizedWeight.quantize(dense, self.bits, self.group_size)
            mx.eval(m.arrays())
            return m
        return dense
