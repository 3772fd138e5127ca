"""Mistral decoder with GQA, delay-conditioned FFN norm and tied LM head, in PyTorch.

One entry point, ``forward``, serves the prompt prefill, decode steps, several drafted positions
and teacher forcing alike: it runs the fed rows of a batch of streams (one or many positions each)
through the blocks, their positions and masks coming from the KV pool's ``Step``. Every weight
matrix is read once for all rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...checkpoint import EMBEDDING, LAYER_MATRICES, decoder_layer_tensors, read_layer
from ...config import ModelConfig
from .layers import Rope, block, rms_norm
from .pool import KVPool, Step
from .quant import Weight, embed, linear
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
    bqkv = bo = b2 = None  # the decoder has no biases


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

    def new_pool(self, dtype, device, *, extra: int, kv_int8: bool) -> KVPool:
        c = self.c
        return KVPool(c.n_layers, c.n_kv_heads, c.sliding_window, c.head_dim, extra=extra, dtype=dtype,
                      device=device, kv_int8=kv_int8)

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

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed(self.embedding, tokens)

    def forward(self, x: torch.Tensor, pool: KVPool, step: Step, scales: torch.Tensor) -> torch.Tensor:
        """x [rows, dim] (audio + token embeddings of the fed positions, stream after stream) ->
        final hidden states [rows, dim]. ``scales`` [n_layers, dim] (one stream) or [rows, n_layers, dim]."""
        return self.blocks(x, self.rope.angles(step.positions), pool, step, scales)

    def blocks(self, x: torch.Tensor, rotation: torch.Tensor, pool: KVPool, step: Step,
               scales: torch.Tensor) -> torch.Tensor:
        """``forward`` past the rotations: what ``compile=True`` compiles (tensors and shapes only)."""
        for i, L in enumerate(self.layers):
            x = block(L, x, rotation, pool, i, step, self.c, scales[..., i, :])
        return rms_norm(x, self.norm, self.c.norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.embedding)
