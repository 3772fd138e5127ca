"""The PyTorch runtime: owns the weights, creates per-stream state, encodes audio, runs decode steps.

This is the whole contract a backend offers to the backend-neutral streaming logic
(``voxlive.session``): ``new_state``, ``clone_state``, ``encode`` (and ``encode_batch`` for several streams), ``add_embeddings``, ``take_embeddings``,
``prefill``, ``decode`` (batched) and ``logits``. Token ids in and out are plain ints; audio in is
numpy log-mel frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...checkpoint import Checkpoint, CheckpointError
from ...config import ModelConfig
from ...layouts.torch_quantized import MODES
from ..pending import take_rows
from .cache import RingKVCache
from .decoder import Decoder
from .encoder import Adapter, ConvState, Encoder
from .quant import embed
from .weights import WeightReader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Compiled decode steps pad the batch up to one of these sizes (then to a multiple of the last),
# so a handful of graphs serve every batch.
BATCH_BUCKETS = (1, 2, 4, 8, 16)


def batch_bucket(n: int) -> int:
    last = BATCH_BUCKETS[-1]
    return next((b for b in BATCH_BUCKETS if b >= n), -(-n // last) * last)


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "mps" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def pick_quantize(quantize: str | None, ckpt: Checkpoint) -> str | None:
    """The checkpoint's own mode for a quantized checkpoint; else the requested one."""
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"quantize={quantize!r} is not available on the torch backend (it has {MODES}; "
                         f"int6 is MLX only)")
    if ckpt.quantize is not None and quantize not in (None, ckpt.quantize):
        raise CheckpointError(f"{ckpt.directory}: a checkpoint quantized to {ckpt.quantize} cannot be loaded as {quantize}; "
                              f"convert the float checkpoint to {quantize}")
    return quantize or ckpt.quantize


@dataclass
class TorchState:
    """Everything one stream keeps between calls; drop it and the stream is gone."""

    conv: ConvState
    encoder_cache: RingKVCache
    decoder_cache: RingKVCache
    ffn_scales: torch.Tensor  # [n_layers, dim], from the stream's delay
    pending: list[torch.Tensor] = field(default_factory=list)  # audio embeddings not yet decoded


class TorchRuntime:
    backend = "torch"

    def __init__(self, ckpt: Checkpoint, *, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, compile: bool = False):
        self.config: ModelConfig = ckpt.config
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.quantize = pick_quantize(quantize, ckpt)
        w = WeightReader(ckpt, self.dtype, self.device, self.quantize)
        try:
            with torch.inference_mode():
                self.encoder = Encoder.from_weights(w, self.config, self.device)
                self.adapter = Adapter.from_weights(w, self.config)
                self.decoder = Decoder.from_weights(w, self.config, self.device)
        except OSError as err:
            raise CheckpointError(f"{ckpt.weights.path}: read error: {err}") from err
        # compile: the decode step (with LM head and greedy choice) runs through torch.compile in
        # its static-shape form. Not in "reduce-overhead" (CUDA graph) mode: the step writes into
        # each stream's own cache, and CUDA graphs need those writes at fixed addresses (a cache
        # pool owned by the runtime), which this runtime does not have yet.
        self.compiled_step = None
        if compile:
            self.compiled_step = torch.compile(self.decoder.static_step, dynamic=False)
            # padding rows of a bucket write here (slot 0 only), never into a real stream's cache
            self._pad_cache = self.decoder.new_cache(self.dtype, self.device)
        # Encode at most about one encoder window of frames at a time: bounded attention memory
        # on long files, and still large GEMMs.
        c = self.config
        self.encode_block_tokens = max(1, c.encoder.sliding_window // (2 * c.downsample_factor))

    # -- per-stream state -------------------------------------------------------------------------

    @torch.inference_mode()
    def new_state(self, delay_tokens: int) -> TorchState:
        return TorchState(
            conv=self.encoder.new_conv_state(self.dtype, self.device),
            encoder_cache=self.encoder.new_cache(self.dtype, self.device),
            decoder_cache=self.decoder.new_cache(self.dtype, self.device),
            ffn_scales=self.decoder.ffn_scales(delay_tokens),
        )

    @torch.inference_mode()
    def clone_state(self, state: TorchState) -> TorchState:
        """An independent copy (fork) of a stream's state."""
        return TorchState(
            conv=ConvState(state.conv.mel_tail.clone(), state.conv.conv1_tail.clone()),
            encoder_cache=state.encoder_cache.clone(),
            decoder_cache=state.decoder_cache.clone(),
            ffn_scales=state.ffn_scales,  # never written
            pending=list(state.pending),  # queued tensors are never written in place
        )

    # -- audio ------------------------------------------------------------------------------------

    def encode(self, state: TorchState, mel: np.ndarray) -> int:
        """Encode whole tokens of log-mel frames [n_mels, k * 8]; queue k audio embeddings. Returns k."""
        return self.encode_batch([state], [mel])[0]

    @torch.inference_mode()
    def encode_batch(self, states: list[TorchState], mels: list[np.ndarray]) -> list[int]:
        """``encode`` for several streams at once: one pass of the encoder weights for all their frames.

        Long inputs go in rounds of at most ``encode_block_tokens`` per stream (bounded attention
        memory); each round batches every stream that still has frames.
        """
        per_token = 2 * self.config.downsample_factor
        for mel in mels:
            if mel.shape[1] % per_token:
                raise ValueError(f"encode takes whole tokens of {per_token} mel frames, got {mel.shape[1]}")
        block = self.encode_block_tokens * per_token
        rounds = max((mel.shape[1] + block - 1) // block for mel in mels) if mels else 0
        for r in range(rounds):
            chunks = [(s, mel[:, r * block:(r + 1) * block]) for s, mel in zip(states, mels)
                      if mel.shape[1] > r * block]
            xs = [self.encoder.stem(self._tensor(mel), s.conv) for s, mel in chunks]
            out = self.adapter(self.encoder.transformer(xs, [s.encoder_cache for s, _ in chunks]))
            for (s, _), embeds in zip(chunks, out.split([x.shape[0] // self.adapter.factor for x in xs])):
                s.pending.append(embeds)
        return [mel.shape[1] // per_token for mel in mels]

    def _tensor(self, mel: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(mel)).to(self.device, self.dtype)

    def add_embeddings(self, state: TorchState, embeds: np.ndarray) -> None:
        """Queue externally computed audio embeddings [n, dim] (teacher forcing, research)."""
        state.pending.append(torch.from_numpy(np.asarray(embeds, dtype=np.float32)).to(self.device, self.dtype))

    def take_embeddings(self, state: TorchState) -> np.ndarray:
        """All queued audio embeddings as float32 numpy [n, dim], removing them from the queue."""
        out = self._pop(state, sum(t.shape[0] for t in state.pending))
        return out.float().cpu().numpy()

    def _pop(self, state: TorchState, n: int) -> torch.Tensor:
        got = take_rows(state.pending, n)
        return got[0] if len(got) == 1 else torch.cat(got)

    # -- decoder ----------------------------------------------------------------------------------

    def _embed(self, tokens) -> torch.Tensor:
        return embed(self.decoder.embedding, torch.as_tensor(tokens, device=self.device))

    @torch.inference_mode()
    def _forward(self, state: TorchState, tokens: list[int], block: int = 256) -> torch.Tensor:
        """Final hidden states [n, dim] of n positions: audio embedding + token embedding each."""
        outs = []
        for s in range(0, len(tokens), block):
            chunk = tokens[s:s + block]
            x = self._pop(state, len(chunk)) + self._embed(chunk)
            outs.append(self.decoder.forward(x, state.decoder_cache, state.ffn_scales))
        return torch.cat(outs)

    @torch.inference_mode()
    def prefill(self, state: TorchState, tokens: list[int], *, predict: bool = True) -> int | None:
        """Run prompt positions; with ``predict``, return the greedy token at the last of them."""
        hidden = self._forward(state, tokens)
        return int(self.decoder.logits(hidden[-1]).argmax()) if predict else None

    @torch.inference_mode()
    def logits(self, state: TorchState, tokens: list[int]) -> np.ndarray:
        """Teacher-forced logits [n, vocab] float32 for n positions."""
        return self.decoder.logits(self._forward(state, tokens)).float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, states: list[TorchState], tokens: list[int]) -> list[int]:
        """One decode step for a batch of streams: each consumes one audio embedding and its last token."""
        x = torch.cat([self._pop(s, 1) for s in states]) + self._embed(tokens)
        if self.compiled_step is not None:
            return self._compiled_decode(states, x)
        scales = states[0].ffn_scales[None] if len(states) == 1 else torch.stack([s.ffn_scales for s in states])
        hidden = self.decoder.step(x, [s.decoder_cache for s in states], scales)
        return self.decoder.logits(hidden).argmax(-1).tolist()

    def _compiled_decode(self, states: list[TorchState], x: torch.Tensor) -> list[int]:
        n = len(states)
        pad = batch_bucket(n) - n
        caches = [s.decoder_cache for s in states] + [self._pad_cache] * pad
        x = torch.cat((x, x.new_zeros(pad, x.shape[1])))
        scales = torch.stack([s.ffn_scales for s in states] + [states[0].ffn_scales] * pad)
        positions = torch.tensor([c.length for c in caches], device=self.device)
        tokens = self.compiled_step(x, [c.k for c in caches], [c.v for c in caches], positions, scales)
        for cache in caches[:n]:
            cache.advance(1)
        return tokens[:n].tolist()
