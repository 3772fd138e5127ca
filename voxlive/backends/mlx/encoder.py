"""Causal audio encoder (conv stem + transformer with a sliding window) and the adapter, in MLX.

The encoder runs on as many frames at once as have arrived, and on the frames of several streams
at once: their rows are concatenated for every matrix product (one weight read for all), and
attention is one call per layer over the batch. Its keys and values live in a KV pool of their
own (capacity: the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ...checkpoint import ADAPTER, ENCODER, LAYER_MATRICES, encoder_layer_tensors, read_layer
from ...config import ModelConfig
from ..pool import Plan
from .layers import Rope, block, rms_norm
from .pool import KVPool
from .quant import Weight, linear
from .weights import WeightReader


@dataclass
class EncoderLayer:
    attention_norm: mx.array
    wqkv: Weight  # [3 * heads * head_dim, dim]: wq | wk | wv fused, one GEMM
    bqkv: mx.array  # biases of wq and wv, zeros for wk (which has none)
    wo: Weight
    bo: mx.array
    ffn_norm: mx.array
    w13: Weight  # [2 * hidden, dim]: gate (w1) | up (w3)
    w2: Weight
    b2: mx.array


@dataclass
class ConvState:
    """The causal convolutions' left context: last 2 mel frames and last conv1 output (time-major)."""

    mel_tail: mx.array  # [2, n_mels]
    conv1_tail: mx.array  # [1, dim]


class Encoder:
    def __init__(self, config: ModelConfig, conv: list[tuple[mx.array, mx.array]], layers: list[EncoderLayer],
                 norm: mx.array):
        self.c = config.encoder
        self.conv = conv  # (weight [out, kernel, in] as mx.conv1d wants it, bias)
        self.layers = layers
        self.norm = norm
        self.rope = Rope(self.c.head_dim, self.c.rope_theta)

    @classmethod
    def from_weights(cls, w: WeightReader, config: ModelConfig) -> Encoder:
        e = ENCODER
        conv = [(w.get(f"{e}conv_layers.{i}.conv.weight").transpose(0, 2, 1), w.get(f"{e}conv_layers.{i}.conv.bias"))
                for i in range(2)]
        layers = [EncoderLayer(**read_layer(w, encoder_layer_tensors(config, i), LAYER_MATRICES))
                  for i in range(config.encoder.n_layers)]
        return cls(config, conv, layers, w.get(e + "transformer.norm.weight"))

    def new_conv_state(self, dtype) -> ConvState:
        # Zeros: the causal convolutions are left-padded with zeros at the start of a stream.
        return ConvState(mx.zeros((2, self.c.n_mels), dtype), mx.zeros((1, self.c.dim), dtype))

    def new_pool(self, dtype, *, kv_int8: bool) -> KVPool:
        c = self.c
        return KVPool(c.n_layers, c.n_heads, c.sliding_window, c.head_dim, dtype=dtype, kv_int8=kv_int8)

    def copy_conv_state(self, state: ConvState) -> ConvState:
        return ConvState(mx.array(state.mel_tail), mx.array(state.conv1_tail))

    def stem(self, mel: mx.array, state: ConvState) -> mx.array:
        """mel [n_mels, 2k] -> [k, dim]: conv1 (k3, s1) + GELU, conv2 (k3, s2) + GELU, causal."""
        (w1, b1), (w2, b2) = self.conv
        x = mx.concatenate((state.mel_tail, mel.T))
        state.mel_tail = x[-2:]
        x = nn.gelu(mx.conv1d(x[None], w1)[0] + b1)
        x = mx.concatenate((state.conv1_tail, x))
        state.conv1_tail = x[-1:]
        return nn.gelu(mx.conv1d(x[None], w2, stride=2)[0] + b2)

    def transformer(self, x: mx.array, pool: KVPool, plan: Plan) -> mx.array:
        """Frames of several streams, x [rows, dim] stream after stream at the plan's positions,
        through every block and the final norm -> [rows, dim]."""
        rotation = self.rope.angles(plan.positions)
        for i, L in enumerate(self.layers):
            x = block(L, x, rotation, pool, i, plan, self.c)
        return rms_norm(x, self.norm, self.c.norm_eps)


class Adapter:
    """Groups of ``downsample_factor`` encoder frames -> one decoder embedding (Linear, GELU, Linear)."""

    def __init__(self, w0: Weight, w2: Weight, downsample_factor: int):
        self.w0, self.w2, self.factor = w0, w2, downsample_factor

    @classmethod
    def from_weights(cls, w: WeightReader, config: ModelConfig) -> Adapter:
        p = ADAPTER
        return cls(w.matrix([p + "0.weight"]), w.matrix([p + "2.weight"]), config.downsample_factor)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.reshape(x.shape[0] // self.factor, -1)
        return linear(nn.gelu(linear(x, self.w0)), self.w2)
