"""Causal audio encoder (conv stem + transformer with a sliding window) and the adapter, in PyTorch.

The encoder runs on as many frames at once as have arrived, from as many streams as have audio: a
chunk of frames is a batch of GEMMs, compute-bound, instead of one weight-bandwidth-bound pass per
stream per 80 ms. Its keys and values live in a KV pool of their own (capacity: the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...checkpoint import ADAPTER, ENCODER, LAYER_MATRICES, encoder_layer_tensors, read_layer
from ...config import ModelConfig
from .layers import Rope, block, rms_norm
from .pool import KVPool, Step
from .quant import Bf16Weight, Weight, linear
from .weights import WeightReader


@dataclass
class EncoderLayer:
    attention_norm: torch.Tensor
    wqkv: Weight  # [3 * heads * head_dim, dim]: wq | wk | wv fused, one GEMM
    bqkv: torch.Tensor  # biases of wq and wv, zeros for wk (which has none)
    wo: Weight
    bo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: Weight  # [2 * hidden, dim]: gate (w1) | up (w3)
    w2: Weight
    b2: torch.Tensor


@dataclass
class ConvState:
    """The causal convolutions' left context: last 2 mel frames and last conv1 output."""

    mel_tail: torch.Tensor  # [n_mels, 2]
    conv1_tail: torch.Tensor  # [dim, 1]


class Encoder:
    def __init__(self, config: ModelConfig, conv: list[tuple[Weight, torch.Tensor]],
                 layers: list[EncoderLayer], norm: torch.Tensor, device: torch.device):
        self.c = config.encoder
        self.conv = conv
        self.layers = layers
        self.norm = norm
        self.rope = Rope(self.c.head_dim, self.c.rope_theta, device)

    @classmethod
    def from_weights(cls, w: WeightReader, config: ModelConfig, device: torch.device) -> Encoder:
        e = ENCODER
        # each convolution as a matrix over an output's window of inputs [out, in * 3] (see stem)
        conv = [(Bf16Weight.wrap(w.get(f"{e}conv_layers.{i}.conv.weight").flatten(1), many_rows=True),
                 w.get(f"{e}conv_layers.{i}.conv.bias")) for i in range(2)]
        layers = [EncoderLayer(**read_layer(w, encoder_layer_tensors(config, i), LAYER_MATRICES))
                  for i in range(config.encoder.n_layers)]
        return cls(config, conv, layers, w.get(e + "transformer.norm.weight"), device)

    def new_conv_state(self, dtype, device) -> ConvState:
        # Zeros: the causal convolutions are left-padded with zeros at the start of a stream.
        return ConvState(torch.zeros(self.c.n_mels, 2, dtype=dtype, device=device),
                         torch.zeros(self.c.dim, 1, dtype=dtype, device=device))

    def new_pool(self, dtype, device, *, kv_int8: bool) -> KVPool:
        c = self.c
        return KVPool(c.n_layers, c.n_heads, c.sliding_window, c.head_dim, dtype=dtype, device=device, kv_int8=kv_int8,
                      amx=True)

    def copy_conv_state(self, state: ConvState) -> ConvState:
        return ConvState(state.mel_tail.clone(), state.conv1_tail.clone())

    def stem(self, mel: torch.Tensor, state: ConvState) -> torch.Tensor:
        """mel [n_mels, 2k] -> [k, dim]: conv1 (k3, s1) + GELU, conv2 (k3, s2) + GELU, causal.

        Each convolution is the product of its matrix with every output's window of inputs, through
        the same ``linear`` as the other layers: an output's numbers then do not depend on how many
        frames the call holds (oneDNN's convolution blocks them by the call's sizes).
        """
        (w1, b1), (w2, b2) = self.conv
        x = torch.cat((state.mel_tail, mel), dim=1)
        state.mel_tail = x[:, -2:].clone()
        x = F.gelu(linear(_windows(x, 1), w1, b1))
        x = torch.cat((state.conv1_tail, x.transpose(0, 1)), dim=1)
        state.conv1_tail = x[:, -1:].clone()
        return F.gelu(linear(_windows(x, 2), w2, b2))

    def transformer(self, x: torch.Tensor, pool: KVPool, step: Step) -> torch.Tensor:
        """Frames of several streams, x [rows, dim] stream after stream at the step's positions,
        through every block and the final norm -> [rows, dim]. Each weight matrix is read once for
        all streams' rows; attention is one call per layer over the batch."""
        rotation = self.rope.angles(step.positions)
        for i, L in enumerate(self.layers):
            x = block(L, x, rotation, pool, i, step, self.c)
        return rms_norm(x, self.norm, self.c.norm_eps)


def _windows(x: torch.Tensor, stride: int) -> torch.Tensor:
    """x [channels, frames] -> the inputs of each output of a width-3 convolution, [outputs, channels * 3]
    (channel-major, as a Conv1d weight [out, in, 3] flattens)."""
    return x.unfold(1, 3, stride).transpose(0, 1).reshape(-1, x.shape[0] * 3)


class Adapter:
    """Groups of ``downsample_factor`` encoder frames -> one decoder embedding (Linear, GELU, Linear)."""

    def __init__(self, w0: Weight, w2: Weight, downsample_factor: int):
        self.w0, self.w2, self.factor = w0, w2, downsample_factor

    @classmethod
    def from_weights(cls, w: WeightReader, config: ModelConfig) -> Adapter:
        p = ADAPTER
        return cls(*(Bf16Weight.wrap(w.get(p + f"{i}.weight"), many_rows=True) for i in (0, 2)), config.downsample_factor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0] // self.factor, -1)
        return linear(F.gelu(linear(x, self.w0)), self.w2)
