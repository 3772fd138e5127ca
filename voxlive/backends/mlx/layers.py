"""Tensor maths shared by the encoder and the decoder, in MLX: linear layers (dense or quantized),
RMSNorm, interleaved RoPE, windowed attention."""

from __future__ import annotations

import mlx.core as mx

from .cache import RingKVCache
from .quantize import QuantizedMatrix

Matrix = mx.array | QuantizedMatrix


def linear(x: mx.array, w: Matrix, b: mx.array | None = None) -> mx.array:
    """x @ w^T (+ b), for a dense [out, in] weight or a quantized one."""
    y = w.matmul(x) if isinstance(w, QuantizedMatrix) else x @ w.T
    return y if b is None else y + b


def rows(w: Matrix, ids: mx.array) -> mx.array:
    """Rows ``ids`` of an embedding matrix."""
    return w.rows(ids) if isinstance(w, QuantizedMatrix) else w[ids]


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm (MLX's fused kernel accumulates in float32, as the reference does)."""
    return mx.fast.rms_norm(x, weight, eps)


class Rope:
    """Interleaved ("GPT-J", traditional) rotary embedding on the raw Mistral q/k weights.

    Pairs (x[2i], x[2i+1]) of each head are rotated by angle ``pos * theta ** (-2i / head_dim)``,
    computed by MLX's fused kernel in float32 from absolute positions.
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta

    def apply(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """x [batch, heads, n, head_dim] at positions offset.. (offset: one int, or one per batch row)."""
        return mx.fast.rope(x, self.head_dim, traditional=True, base=self.theta, scale=1.0, offset=offset)


def attend_chunk(q: mx.array, k: mx.array, v: mx.array, cache: RingKVCache, layer: int) -> mx.array:
    """Causal sliding-window attention of n new positions of ONE sequence over its cache and themselves.

    q [heads, n, d], k/v [kv_heads, n, d] for positions cache.length .. +n. Position i attends to
    positions j with i - window < j <= i. Writes k/v into the cache; returns [n, heads * d].
    """
    n, window, d = q.shape[1], cache.window, q.shape[2]
    start = cache.length
    scale = d ** -0.5
    if n == 1:
        cache.write(layer, k, v)
        keys, values = cache.read(layer, min(start + 1, window))
        out = mx.fast.scaled_dot_product_attention(q[None], keys[None], values[None], scale=scale)
        return out[0].transpose(1, 0, 2).reshape(n, -1)
    qpos = mx.arange(start, start + n)
    old = cache.valid_slots()
    if old:
        kpos = mx.concatenate((cache.slot_positions(), qpos))
        old_k, old_v = cache.read(layer, old)
        keys, values = mx.concatenate((old_k, k), axis=1), mx.concatenate((old_v, v), axis=1)
    else:
        kpos, keys, values = qpos, k, v
    delta = qpos[:, None] - kpos[None, :]
    mask = (delta >= 0) & (delta < window)
    out = mx.fast.scaled_dot_product_attention(q[None], keys[None], values[None], scale=scale, mask=mask)
    cache.write(layer, k, v)
    return out[0].transpose(1, 0, 2).reshape(n, -1)
