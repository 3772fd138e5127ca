"""Tensor maths shared by the encoder and the decoder, in MLX: RMSNorm, interleaved RoPE, and the
one transformer block body both run (attention, over the KV pool, is the only part that varies)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..pool import Plan, rope_rotation
from .pool import KVPool
from .quant import linear


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm (MLX's fused kernel accumulates in float32, as the reference does)."""
    return mx.fast.rms_norm(x, weight, eps)


class Rope:
    """Interleaved ("GPT-J", traditional) rotary embedding on the raw Mistral q/k weights, with
    angles exact at any position (``backends.pool.rope_rotation``: float64 on the host, which
    ``mx.fast.rope``'s float32 ``offset * frequency`` is not at millions of positions)."""

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta

    def angles(self, positions: np.ndarray) -> tuple[mx.array, mx.array]:
        """cos, sin [n, 1, head_dim/2] for positions [n] (broadcast over heads)."""
        cos, sin = rope_rotation(positions, self.head_dim, self.theta)
        return mx.array(cos)[:, None], mx.array(sin)[:, None]

    @staticmethod
    def apply(x: mx.array, rotation: tuple[mx.array, mx.array]) -> mx.array:
        """x [n, heads, head_dim] -> each pair (x[2i], x[2i+1]) rotated, in float32, same dtype out."""
        cos, sin = rotation
        pairs = x.astype(mx.float32).reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return mx.stack((a * cos - b * sin, a * sin + b * cos), axis=-1).reshape(x.shape).astype(x.dtype)


def block(L, x: mx.array, rotation, pool: KVPool, layer: int, plan: Plan, c,
          ffn_scale: mx.array | None = None) -> mx.array:
    """One pre-norm transformer block on the fed rows x [rows, dim] of a batched pass.

    Two residual lines: ``x + wo(attend(rope(qkv(norm(x)))))``, then ``x + ffn(norm(x) * scale)``
    (the decoder's delay scale; the encoder has none). ``L`` is an EncoderLayer or a DecoderLayer
    (the same fields; the encoder's have biases). ``c``: the stack's config.
    """
    n = x.shape[0]
    kv_heads = getattr(c, "n_kv_heads", c.n_heads)
    qd, kvd = c.n_heads * c.head_dim, kv_heads * c.head_dim
    qkv = linear(rms_norm(x, L.attention_norm, c.norm_eps), L.wqkv, L.bqkv)
    q = Rope.apply(qkv[:, :qd].reshape(n, c.n_heads, c.head_dim), rotation)
    k = Rope.apply(qkv[:, qd:qd + kvd].reshape(n, kv_heads, c.head_dim), rotation)
    v = qkv[:, qd + kvd:].reshape(n, kv_heads, c.head_dim)
    x = x + linear(pool.attend(layer, plan, q, k, v), L.wo, L.bo)
    h = rms_norm(x, L.ffn_norm, c.norm_eps)
    if ffn_scale is not None:
        h = h * ffn_scale
    gate, up = mx.split(linear(h, L.w13), 2, axis=-1)
    return x + linear(nn.silu(gate) * up, L.w2, L.b2)
