"""Tensor maths shared by the encoder and the decoder: RMSNorm, interleaved RoPE, windowed attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .cache import RingKVCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as the reference does), scaled in the activation dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rope:
    """Interleaved ("GPT-J", traditional) rotary embedding on the raw Mistral q/k weights.

    Pairs (x[2i], x[2i+1]) of each head are rotated by angle ``pos * theta ** (-2i / head_dim)``.
    Angles are computed in float32 from absolute positions, so a stream hours long keeps exact
    positions.
    """

    def __init__(self, head_dim: int, theta: float, device: torch.device):
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Unit complex rotations [n, 1, head_dim/2] for positions [n] (broadcast over heads)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return torch.polar(torch.ones_like(freqs), freqs)[:, None, :]

    @staticmethod
    def apply(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """x [n, heads, head_dim] -> rotated (each pair as one complex number), same dtype."""
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def kernel_attends(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether voxlive's attention kernel takes these queries [heads, n, d] and keys [kv_heads, n, d]:
    with ``cpu_kernels.batch_invariant()``, on a CPU, in bfloat16 or float32. It computes each query on
    its own (PyTorch's flash attention blocks them by the call's sizes), so a stream's numbers do not
    depend on how its positions were chunked; it is slower (README, "Same tokens however the audio arrives")."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and 16 % (q.shape[0] // k.shape[0]) == 0
            and q.shape[-1] % 8 == 0 and cpu_kernels.batch_invariant())


def attend_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: RingKVCache, layer: int) -> torch.Tensor:
    """Causal sliding-window attention of n new positions of ONE sequence over its cache and themselves.

    q [heads, n, d], k/v [kv_heads, n, d] for positions cache.length .. +n. Position i attends to
    positions j with i - window < j <= i. Writes k/v into the cache; returns [n, heads * d].
    """
    n, window = q.shape[1], cache.window
    start = cache.length
    device = q.device
    if kernel_attends(q, k):
        rows = [t.transpose(0, 1).reshape(n, -1) for t in (q, k, v)]
        out = cpu_kernels.attention(*rows, cache.k[layer], cache.v[layer], start, window, q.shape[-1])
        cache.write(layer, k, v)
        return out
    if n == 1:
        cache.write(layer, k, v)
        m = min(start + 1, window)
        out = F.scaled_dot_product_attention(
            q[None], cache.k[layer, :, :m][None], cache.v[layer, :, :m][None], enable_gqa=True
        )
        return out[0].transpose(0, 1).reshape(n, -1)
    qpos = torch.arange(start, start + n, device=device)
    old = cache.valid_slots()
    if old:
        kpos = torch.cat((cache.slot_positions(device), qpos))
        keys = torch.cat((cache.k[layer, :, :old], k), dim=1)
        values = torch.cat((cache.v[layer, :, :old], v), dim=1)
    else:
        kpos, keys, values = qpos, k, v
    delta = qpos[:, None] - kpos[None, :]
    mask = (delta >= 0) & (delta < window)
    out = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, enable_gqa=True)
    cache.write(layer, k, v)
    return out[0].transpose(0, 1).reshape(n, -1)


def attend_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
    """One new position of one sequence, with shapes that do not depend on the position.

    The static-shape twin of ``attend_chunk``'s one-position case, for compiled steps: the
    position is a 0-d tensor, k/v [kv_heads, 1, d] go to slot ``position % window`` of the
    layer's ring ``cache_k``/``cache_v`` [kv_heads, window, d], and attention runs over the whole
    ring with a mask of the slots that hold a position yet (slot j holds ``position - ((position
    - j) mod window)``, which the window keeps within reach). Returns [1, heads * d].
    """
    window = cache_k.shape[1]
    slot = torch.remainder(position, window).reshape(1)
    cache_k.index_copy_(1, slot, k)
    cache_v.index_copy_(1, slot, v)
    mask = (torch.remainder(position - torch.arange(window, device=q.device), window) <= position)[None]
    out = F.scaled_dot_product_attention(q[None], cache_k[None], cache_v[None], attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(1, -1)
