"""Mistral decoder with GQA, delay-conditioned FFN norm and tied LM head, in MLX.

Two entry points: ``forward`` runs many positions of one sequence (the prompt prefill, teacher
forcing), ``step`` runs one position of each of a batch of sequences. In ``step`` every weight
matrix is read once for the whole batch; only attention, whose cache is per sequence, loops.
``step`` writes the new keys and values but does not advance the caches: the runtime commits a
step (``cache.advance(1)``) only once its input token is known to be the right one, which is what
lets it compute a step ahead (see the runtime's ``decode``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ...checkpoint import EMBEDDING, LAYER_MATRICES, decoder_layer_tensors, read_layer
from ...config import ModelConfig
from .cache import RingKVCache
from .layers import Matrix, Rope, attend_chunk, linear, rms_norm, rows
from .weights import WeightReader


@dataclass
class DecoderLayer:
    attention_norm: mx.array
    wqkv: Matrix  # [(heads + 2 * kv_heads) * head_dim, dim]: wq | wk | wv fused
    wo: Matrix
    ffn_norm: mx.array
    ada0: Matrix  # ada_rms_norm_t_cond.0 [t_cond_dim, dim]
    ada2: Matrix  # ada_rms_norm_t_cond.2 [dim, t_cond_dim]
    w13: Matrix  # [2 * hidden, dim]: gate (w1) | up (w3)
    w2: Matrix


class Decoder:
    def __init__(self, config: ModelConfig, embedding: Matrix, layers: list[DecoderLayer], norm: mx.array,
                 dtype: mx.Dtype):
        self.c = config.decoder
        self.embedding = embedding  # [vocab, dim], also the LM head
        self.layers = layers
        self.norm = norm
        self.dtype = dtype
        self.rope = Rope(self.c.head_dim, self.c.rope_theta)

    @classmethod
    def from_weights(cls, w: WeightReader, config: ModelConfig) -> Decoder:
        # ada0/ada2 as matrices too: they are quantized like every matrix whose inputs fill whole groups
        # (as voxmlx's converter does)
        layers = [DecoderLayer(**read_layer(w, decoder_layer_tensors(i), LAYER_MATRICES + ("ada0", "ada2")))
                  for i in range(config.decoder.n_layers)]
        embedding = w.matrix([EMBEDDING])
        return cls(config, embedding, layers, w.get("norm.weight"), w.dtype)

    def new_cache(self, dtype) -> RingKVCache:
        c = self.c
        return RingKVCache(c.n_layers, c.n_kv_heads, c.sliding_window, c.head_dim, dtype=dtype)

    def ffn_scales(self, delay_tokens: int) -> mx.array:
        """Per-layer FFN-norm scale ``1 + W2 gelu(W1 t_cond)`` [n_layers, dim] for a delay (once per stream).

        t_cond is the sinusoidal embedding of the delay in tokens, computed in float32.
        """
        half = self.c.dim // 2
        inv_freq = mx.exp(-math.log(10000.0) * mx.arange(half, dtype=mx.float32) / half)
        angle = delay_tokens * inv_freq
        t_cond = mx.concatenate((mx.cos(angle), mx.sin(angle))).astype(self.dtype)
        return mx.stack([1 + linear(nn.gelu(linear(t_cond, L.ada0)), L.ada2) for L in self.layers])

    def embed(self, tokens: mx.array) -> mx.array:
        return rows(self.embedding, tokens)

    def _qkv(self, L: DecoderLayer, x: mx.array):
        """Normed, projected q, k, v of n positions, each [n, heads, head_dim] (not yet rotated)."""
        c = self.c
        n = x.shape[0]
        qd, kvd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        qkv = linear(rms_norm(x, L.attention_norm, c.norm_eps), L.wqkv)
        q, k, v = qkv[:, :qd], qkv[:, qd:qd + kvd], qkv[:, qd + kvd:]
        return (q.reshape(n, c.n_heads, c.head_dim), k.reshape(n, c.n_kv_heads, c.head_dim),
                v.reshape(n, c.n_kv_heads, c.head_dim))

    def forward(self, x: mx.array, cache: RingKVCache, scales: mx.array) -> mx.array:
        """x [n, dim] (audio + token embeddings) at positions cache.length.. -> final hidden [n, dim]."""
        for i, L in enumerate(self.layers):
            q, k, v = (t.transpose(1, 0, 2) for t in self._qkv(L, x))
            q, k = self.rope.apply(q, cache.length), self.rope.apply(k, cache.length)
            x = x + linear(attend_chunk(q, k, v, cache, i), L.wo)
            x = x + self._ffn(L, rms_norm(x, L.ffn_norm, self.c.norm_eps) * scales[i])
        cache.advance(x.shape[0])
        return rms_norm(x, self.norm, self.c.norm_eps)

    def step(self, x: mx.array, caches: list[RingKVCache], scales: mx.array) -> mx.array:
        """One position for each of B sequences: x [B, dim], scales [B, n_layers, dim] -> hidden [B, dim].

        Writes each sequence's keys/values at its cache's current length; does not advance.
        """
        offsets = mx.array([cache.length for cache in caches])
        for i, L in enumerate(self.layers):
            q, k, v = self._qkv(L, x)  # [B, heads, d]
            q = self.rope.apply(q[:, :, None], offsets)  # [B, heads, 1, d]
            k = self.rope.apply(k[:, :, None], offsets)
            a = mx.concatenate([attend_chunk(q[b], k[b], v[b][:, None], cache, i) for b, cache in enumerate(caches)])
            x = x + linear(a, L.wo)
            x = x + self._ffn(L, rms_norm(x, L.ffn_norm, self.c.norm_eps) * scales[:, i])
        return rms_norm(x, self.norm, self.c.norm_eps)

    def _ffn(self, L: DecoderLayer, h: mx.array) -> mx.array:
        gate, up = mx.split(linear(h, L.w13), 2, axis=-1)
        return linear(nn.silu(gate) * up, L.w2)

    def logits(self, hidden: mx.array) -> mx.array:
        return linear(hidden, self.embedding)
