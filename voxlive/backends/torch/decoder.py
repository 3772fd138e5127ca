"""Mistral decoder with GQA, delay-conditioned FFN norm and tied LM head, in PyTorch.

Two entry points: ``forward`` runs many positions of one sequence (the prompt prefill, teacher
forcing), ``step`` runs one position of each of a batch of sequences. In ``step`` every weight
matrix is read once for the whole batch; only attention, whose cache is per sequence, loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...checkpoint import EMBEDDING, LAYER_MATRICES, decoder_layer_tensors, read_layer
from ...config import ModelConfig
from .cache import RingKVCache
from .layers import Rope, attend_chunk, attend_ring, rms_norm
from .quant import Weight, linear
from .weights import WeightReader


@dataclass
class DecoderLayer:
    attention_norm: torch.Tensor
    wqkv: Weight  # [(heads + 2 * kv_heads) * head_dim, dim]: wq | wk | wv fused
    wo: Weight
    ffn_norm: torch.Tensor
    ada0: torch.Tensor  # ada_rms_norm_t_cond.0 [t_cond_dim, dim]
    ada2: torch.Tensor  # ada_rms_norm_t_cond.2 [dim, t_cond_dim]
    w13: Weight  # [2 * hidden, dim]: gate (w1) | up (w3)
    w2: Weight


class Decoder:
    def __init__(self, config: ModelConfig, embedding: Weight, layers: list[DecoderLayer],
                 norm: torch.Tensor, device: torch.device):
        self.c = config.decoder
        self.embedding = embedding  # [vocab, dim], also the LM head
        self.layers = layers
        self.norm = norm
        self.rope = Rope(self.c.head_dim, self.c.rope_theta, device)

    @classmethod
    def from_weights(cls, w: WeightReader, config: ModelConfig, device: torch.device) -> Decoder:
        # First: quantizing it needs its float copy (0.8 GB) beside the result, best before the rest is in memory.
        embedding = w.matrix([EMBEDDING])
        layers = [DecoderLayer(**read_layer(w, decoder_layer_tensors(i), LAYER_MATRICES)) for i in range(config.decoder.n_layers)]
        return cls(config, embedding, layers, w.get("norm.weight"), device)

    def new_cache(self, dtype, device) -> RingKVCache:
        c = self.c
        return RingKVCache(c.n_layers, c.n_kv_heads, c.sliding_window, c.head_dim, dtype=dtype, device=device)

    def ffn_scales(self, delay_tokens: int) -> torch.Tensor:
        """Per-layer FFN-norm scale ``1 + W2 gelu(W1 t_cond)`` [n_layers, dim] for a delay (once per stream).

        t_cond is the sinusoidal embedding of the delay in tokens, computed in float32.
        """
        half = self.c.dim // 2
        device = self.norm.device
        inv_freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / half)
        angle = delay_tokens * inv_freq
        t_cond = torch.cat((angle.cos(), angle.sin())).to(self.norm.dtype)
        return torch.stack([1 + F.linear(F.gelu(F.linear(t_cond, L.ada0)), L.ada2) for L in self.layers])

    def _qkv(self, L: DecoderLayer, x: torch.Tensor, rotation: torch.Tensor):
        """Normed, projected and rotated q, k, v of n positions, each [heads, n, head_dim]."""
        c = self.c
        n = x.shape[0]
        qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q, k, v = linear(rms_norm(x, L.attention_norm, c.norm_eps), L.wqkv).split((qd, kvd, kvd), dim=-1)
        q = Rope.apply(q.view(n, c.n_heads, c.head_dim), rotation)
        k = Rope.apply(k.view(n, c.n_kv_heads, c.head_dim), rotation)
        return q.transpose(0, 1), k.transpose(0, 1), v.view(n, c.n_kv_heads, c.head_dim).transpose(0, 1)

    def forward(self, x: torch.Tensor, cache: RingKVCache, scales: torch.Tensor) -> torch.Tensor:
        """x [n, dim] (audio + token embeddings) at positions cache.length.. -> final hidden [n, dim]."""
        n = x.shape[0]
        rotation = self.rope.angles(torch.arange(cache.length, cache.length + n, device=x.device))
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, x, rotation)
            x = x + linear(attend_chunk(q, k, v, cache, i), L.wo)
            x = x + self._ffn(L, rms_norm(x, L.ffn_norm, self.c.norm_eps) * scales[i])
        cache.advance(n)
        return rms_norm(x, self.norm, self.c.norm_eps)

    def step(self, x: torch.Tensor, caches: list[RingKVCache], scales: torch.Tensor) -> torch.Tensor:
        """One position for each of B sequences: x [B, dim], scales [B, n_layers, dim] -> hidden [B, dim]."""
        rotation = self.rope.angles(torch.tensor([cache.length for cache in caches], device=x.device))
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, x, rotation)
            a = torch.cat([attend_chunk(q[:, b, None], k[:, b, None], v[:, b, None], cache, i)
                           for b, cache in enumerate(caches)])
            x = x + linear(a, L.wo)
            x = x + self._ffn(L, rms_norm(x, L.ffn_norm, self.c.norm_eps) * scales[:, i])
        for cache in caches:
            cache.advance(1)
        return rms_norm(x, self.norm, self.c.norm_eps)

    def static_step(self, x: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], positions: torch.Tensor,
                    scales: torch.Tensor) -> torch.Tensor:
        """``step`` + LM head + greedy choice with static shapes, for torch.compile: greedy tokens [B].

        Sequence b is at ``positions[b]`` with ring buffers ``ks[b]``/``vs[b]`` (a cache's k/v);
        the caller advances the caches. Nothing depends on a position's value but tensor contents,
        so one compiled graph serves every step of a batch size.
        """
        rotation = self.rope.angles(positions)
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, x, rotation)
            a = torch.cat([attend_ring(q[:, b, None], k[:, b, None], v[:, b, None], ks[b][i], vs[b][i], positions[b])
                           for b in range(len(ks))])
            x = x + linear(a, L.wo)
            x = x + self._ffn(L, rms_norm(x, L.ffn_norm, self.c.norm_eps) * scales[:, i])
        return self.logits(rms_norm(x, self.norm, self.c.norm_eps)).argmax(-1)

    def _ffn(self, L: DecoderLayer, h: torch.Tensor) -> torch.Tensor:
        gate, up = linear(h, L.w13).split(self.c.hidden_dim, dim=-1)
        return linear(F.silu(gate) * up, L.w2)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.embedding)
