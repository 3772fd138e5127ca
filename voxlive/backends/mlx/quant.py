"""Weight-only quantization with MLX's affine group quantization (the mlx-community format).

Each row of a matrix is cut into groups of ``group_size`` inputs; each group stores ``bits``-bit
integers with one float scale and one float offset ("biases"), packed into uint32 words. MLX has
fused kernels that multiply by the packed matrix directly (``mx.quantized_matmul``), so a step
reads 4, 6 or 8 bits per weight instead of 16.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

# The names voxlive.load(quantize=...) accepts for this backend (int8 and int4 as on the PyTorch one).
BITS = {"int4": 4, "int6": 6, "int8": 8}
GROUP_SIZE = 64  # MLX's default and voxmlx's / mlx-community's


@dataclass
class QuantizedWeight:
    """A [out, in] weight matrix in MLX's packed affine format."""

    packed: mx.array  # uint32 [out, in * bits / 32]
    scales: mx.array  # [out, in / group_size]
    biases: mx.array  # [out, in / group_size]
    group_size: int
    bits: int

    @classmethod
    def quantize(cls, w: mx.array, bits: int, group_size: int = GROUP_SIZE) -> QuantizedWeight:
        packed, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        return cls(packed, scales, biases, group_size, bits)

    @classmethod
    def concatenate(cls, parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Rows of several matrices stacked (rows are quantized independently, so this is exact)."""
        first = parts[0]
        if any((p.group_size, p.bits) != (first.group_size, first.bits) for p in parts):
            raise ValueError("cannot fuse matrices quantized with different group sizes or bits")
        return cls(*(mx.concatenate([getattr(p, f) for p in parts]) for f in ("packed", "scales", "biases")),
                   first.group_size, first.bits)

    def arrays(self) -> list[mx.array]:
        return [self.packed, self.scales, self.biases]

    def matmul(self, x: mx.array) -> mx.array:
        """x [..., in] @ W^T -> [..., out]."""
        return mx.quantized_matmul(x, self.packed, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits)

    def rows(self, ids: mx.array) -> mx.array:
        """Dequantized rows ``ids`` (an embedding lookup)."""
        return mx.dequantize(self.packed[ids], self.scales[ids], self.biases[ids],
                             group_size=self.group_size, bits=self.bits)

    def dequantize(self) -> mx.array:
        return mx.dequantize(self.packed, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


Weight = mx.array | QuantizedWeight


def linear(x: mx.array, w: Weight, bias: mx.array | None = None) -> mx.array:
    """x @ w^T (+ bias), for a dense [out, in] weight or a quantized one: the one call every layer makes."""
    y = w.matmul(x) if isinstance(w, QuantizedWeight) else x @ w.T
    return y if bias is None else y + bias


def embed(w: Weight, ids: mx.array) -> mx.array:
    """Rows ``ids`` of an embedding matrix."""
    return w.rows(ids) if isinstance(w, QuantizedWeight) else w[ids]
