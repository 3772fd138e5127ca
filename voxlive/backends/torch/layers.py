"""Tensor maths shared by the encoder and the decoder: RMSNorm, interleaved RoPE, and the one
transformer block body both run (attention, over the KV pool, is the only part that varies)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..pool import rope_rotation
from .pool import KVPool, Step
from .quant import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as the reference does), scaled in the activation dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rope:
    """Interleaved ("GPT-J", traditional) rotary embedding on the raw Mistral q/k weights, with
    angles exact at any position (``backends.pool.rope_rotation``)."""

    def __init__(self, head_dim: int, theta: float, device: torch.device):
        self.head_dim, self.theta, self.device = head_dim, theta, device

    def angles(self, positions: np.ndarray) -> torch.Tensor:
        """Unit complex rotations [n, 1, head_dim/2] for positions [n] (broadcast over heads)."""
        cos, sin = rope_rotation(positions, self.head_dim, self.theta)
        return torch.complex(torch.from_numpy(cos), torch.from_numpy(sin)).to(self.device)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x [n, heads, head_dim] -> rotated (each pair as one complex number), same dtype."""
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def block(L, x: torch.Tensor, rotation: torch.Tensor, pool: KVPool, layer: int, step: Step, c,
          ffn_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One pre-norm transformer block on the fed rows x [rows, dim] of a batched pass.

    Two residual lines: ``x + wo(attend(rope(qkv(norm(x)))))``, then ``x + ffn(norm(x) * scale)``
    (the decoder's delay scale; the encoder has none). ``L`` is an EncoderLayer or a DecoderLayer
    (the same fields; the encoder's have biases). ``c``: the stack's config.
    """
    n = x.shape[0]
    kv_heads = getattr(c, "n_kv_heads", c.n_heads)
    qd, kvd = c.n_heads * c.head_dim, kv_heads * c.head_dim
    q, k, v = linear(rms_norm(x, L.attention_norm, c.norm_eps), L.wqkv, L.bqkv).split((qd, kvd, kvd), dim=-1)
    q = Rope.apply(q.view(n, c.n_heads, c.head_dim), rotation)
    k = Rope.apply(k.view(n, kv_heads, c.head_dim), rotation)
    x = x + linear(pool.attend(layer, step, q, k, v.view(n, kv_heads, c.head_dim)), L.wo, L.bo)
    h = rms_norm(x, L.ffn_norm, c.norm_eps)
    if ffn_scale is not None:
        h = h * ffn_scale
    gate, up = linear(h, L.w13).split(c.hidden_dim, dim=-1)
    return x + linear(F.silu(gate) * up, L.w2, L.b2)
