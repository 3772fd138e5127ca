"""Mistral decoder with GQA, delay-conditioned FFN norm and tied LM head, in MLX.

One entry point, ``forward``, serves the prompt prefill, decode steps, several drafted positions
and teacher forcing alike: it runs the fed rows of a batch of streams (one or many positions each)
through the blocks, their positions and masks coming from the KV pool's plan. Every weight matrix
is read once for all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ...checkpoint import EMBEDDING, LAYER_MATRICES, decoder_layer_tensors, read_layer
from ...config import ModelConfig
from ..pool import Plan
from .layers import Rope, block, rms_norm
from .pool import KVPool
from .quant import Weight, embed, linear
from .weights import WeightReader


@dataclass
class DecoderLayer:
    attention_norm: mx.array
    wqkv: Weight  # [(heads + 2 * kv_heads) * head_dim, dim]: wq | wk | wv fused
    wo: Weight
    ffn_norm: mx.array
    ada0: Weight  # ada_rms_norm_t_cond.0 [t_cond_dim, dim]
    ada2: Weight  # ada_rms_norm_t_cond.2 [dim, t_cond_dim]
    w13: Weight  # [2 * hidden, dim]: gate (w1) | up (w3)
    w2: Weight
    bqkv = bo = b2 = None  # the decoder has no biases


class Decoder:
    def __init__(self, config: ModelConfig, embedding: Weight, layers: list[DecoderLayer], norm: mx.array,
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

    def new_pool(self, dtype, *, extra: int, kv_int8: bool) -> KVPool:
        c = self.c
        return KVPool(c.n_layers, c.n_kv_heads, c.sliding_window, c.head_dim, extra=extra, dtype=dtype, kv_int8=kv_int8)

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
        return embed(self.embedding, tokens)

    def forward(self, x: mx.array, pool: KVPool, plan: Plan, scales: mx.array) -> mx.array:
        """x [rows, dim] (audio + token embeddings of the fed positions, stream after stream) ->
        final hidden states [rows, dim]. ``scales`` [n_layers, dim] (one stream) or [rows, n_layers, dim]."""
        rotation = self.rope.angles(plan.positions)
        for i, L in enumerate(self.layers):
            x = block(L, x, rotation, pool, i, plan, self.c, scales[..., i, :])
        return rms_norm(x, self.norm, self.c.norm_eps)

    def logits(self, hidden: mx.array) -> mx.array:
        return linear(hidden, self.embedding)
