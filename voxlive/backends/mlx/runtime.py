"""The MLX runtime: owns the weights, creates per-stream state, encodes audio, runs decode steps.

The same contract as the PyTorch runtime (``new_state``, ``clone_state``, ``encode``,
``encode_batch``, ``add_embeddings``, ``take_embeddings``, ``prefill``, ``decode`` (batched),
``logits``), with what MLX adds:

- Every public method runs on the process's one MLX thread (``thread.py``), so any thread may
  call it.
- Lazy evaluation is put to work. ``encode`` queues its embeddings and returns without waiting
  (``mx.async_eval``): the encoder computes while the caller goes on to the decode step that will
  use them. ``decode`` computes one step AHEAD: once step p's tokens are known as an array, if
  every stream of the batch already has the audio of position p+1, step p+1 is built on those
  tokens and started before step p's tokens are read back to the host; the next ``decode`` call
  then finds it done or running, provided it is called for the same streams with exactly those
  tokens (otherwise it is dropped: its only effect, a key/value written into the slot the real
  step p+1 writes again, is invisible). Every step evaluates the caches it wrote, so no graph
  grows from one step to the next.
- MLX keeps freed buffers for reuse; encoder chunks and prefills of many sizes leave buffers that
  decode steps never reuse, so the buffer cache is cleared every ``CLEAR_CACHE_STEPS`` decode steps
  and memory stays bounded over hours of streaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from ...checkpoint import Checkpoint, CheckpointError
from ...config import ModelConfig
from ..pending import take_rows
from .cache import RingKVCache
from .decoder import Decoder
from .encoder import Adapter, ConvState, Encoder
from .quantize import BITS
from .thread import on_mlx_thread
from .weights import WeightReader

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
CLEAR_CACHE_STEPS = 256


def pick_device(device: str | None) -> mx.Device:
    if device is None:
        return mx.default_device()
    if device == "cpu":
        return mx.cpu
    if device == "gpu":
        if not mx.is_available(mx.gpu):
            raise ValueError("device 'gpu' requested but this MLX build has no GPU (Metal or CUDA)")
        return mx.gpu
    raise ValueError(f"the MLX backend runs on device 'cpu' or 'gpu', got {device!r}")


def pick_dtype(dtype: str | None) -> mx.Dtype:
    if dtype is None:
        return mx.bfloat16  # the checkpoint's own dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def to_numpy(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@dataclass
class MLXState:
    """Everything one stream keeps between calls; drop it and the stream is gone."""

    conv: ConvState
    encoder_cache: RingKVCache
    decoder_cache: RingKVCache
    ffn_scales: mx.array  # [n_layers, dim], from the stream's delay
    pending: list[mx.array] = field(default_factory=list)  # audio embeddings not yet decoded


@dataclass
class _StepAhead:
    """A decode step started before its input tokens were read back (see the module docstring)."""

    states: list[MLXState]
    tokens: list[int] | None  # its input tokens, once read back
    next_tokens: mx.array


class MLXRuntime:
    backend = "mlx"

    def __init__(self, ckpt: Checkpoint, *, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None):
        self.config: ModelConfig = ckpt.config
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype)
        if quantize is not None and quantize not in BITS:
            raise ValueError(f"the MLX backend quantizes to {sorted(BITS)}, got {quantize!r}")
        bits = BITS[quantize] if quantize else None
        if bits and ckpt.quantization and ckpt.quantization["bits"] != bits:
            raise ValueError(f"{ckpt.directory} is already quantized to {ckpt.quantization['bits']} bits; "
                             f"load it without quantize={quantize!r}")
        # The weights' mode, named as the torch runtime names its own ("int4" for a 4-bit checkpoint).
        self.quantize = quantize or (f"int{ckpt.quantization['bits']}" if ckpt.quantization else None)
        try:
            self._load(WeightReader(ckpt, self.dtype, bits))
        except OSError as err:
            raise CheckpointError(f"{ckpt.weights.path}: read error: {err}") from err
        c = self.config
        # Encode at most about one encoder window of frames at a time (as the PyTorch runtime does).
        self.encode_block_tokens = max(1, c.encoder.sliding_window // (2 * c.downsample_factor))
        self._ahead: _StepAhead | None = None
        self.decode_steps = 0  # decode calls so far (the buffer cache is cleared every CLEAR_CACHE_STEPS)
        self.steps_ahead_used = 0  # decode steps that found their work already started

    @on_mlx_thread
    def _load(self, w: WeightReader) -> None:
        self.encoder = Encoder.from_weights(w, self.config)
        self.adapter = Adapter.from_weights(w, self.config)
        self.decoder = Decoder.from_weights(w, self.config)

    @on_mlx_thread
    def synchronize(self) -> None:
        """Wait for all queued MLX work (for timing: ``encode`` returns before its work is done)."""
        mx.synchronize()

    # -- per-stream state -------------------------------------------------------------------------

    @on_mlx_thread
    def new_state(self, delay_tokens: int) -> MLXState:
        state = MLXState(
            conv=self.encoder.new_conv_state(self.dtype),
            encoder_cache=self.encoder.new_cache(self.dtype),
            decoder_cache=self.decoder.new_cache(self.dtype),
            ffn_scales=self.decoder.ffn_scales(delay_tokens),
        )
        mx.eval(state.ffn_scales)
        return state

    @on_mlx_thread
    def clone_state(self, state: MLXState) -> MLXState:
        """An independent copy (fork) of a stream's state."""
        return MLXState(
            conv=ConvState(mx.array(state.conv.mel_tail), mx.array(state.conv.conv1_tail)),
            encoder_cache=state.encoder_cache.clone(),
            decoder_cache=state.decoder_cache.clone(),
            ffn_scales=state.ffn_scales,  # never written
            pending=list(state.pending),  # queued arrays are never written in place
        )

    # -- audio ------------------------------------------------------------------------------------

    def _check_mel(self, mel: np.ndarray) -> int:
        per_token = 2 * self.config.downsample_factor
        if mel.shape[1] % per_token:
            raise ValueError(f"encode takes whole tokens of {per_token} mel frames, got {mel.shape[1]}")
        return mel.shape[1] // per_token

    @on_mlx_thread
    def encode(self, state: MLXState, mel: np.ndarray) -> int:
        """Encode whole tokens of log-mel frames [n_mels, k * 8]; queue k audio embeddings. Returns k."""
        return self.encode_batch([state], [mel])[0]

    @on_mlx_thread
    def encode_batch(self, states: list[MLXState], mels: list[np.ndarray]) -> list[int]:
        """``encode`` for several streams at once: their frames share every matrix product."""
        totals = [self._check_mel(mel) for mel in mels]
        block = self.encode_block_tokens * 2 * self.config.downsample_factor
        for start in range(0, max(mel.shape[1] for mel in mels), block):
            batch = [(s, mel[:, start:start + block]) for s, mel in zip(states, mels) if mel.shape[1] > start]
            xs = [self.encoder.stem(mx.array(np.ascontiguousarray(m)).astype(self.dtype), s.conv) for s, m in batch]
            out = self.adapter(self.encoder.transformer(xs, [s.encoder_cache for s, _ in batch]))
            row = 0
            for s, m in batch:
                n = m.shape[1] // (2 * self.config.downsample_factor)
                s.pending.append(out[row:row + n])
                row += n
            # Start the work now, wait for none of it: the decode steps that read it come next.
            mx.async_eval(out, *[a for s, _ in batch for a in (s.conv.mel_tail, s.conv.conv1_tail,
                                                                *s.encoder_cache.arrays())])
        return totals

    @on_mlx_thread
    def add_embeddings(self, state: MLXState, embeds: np.ndarray) -> None:
        """Queue externally computed audio embeddings [n, dim] (teacher forcing, research)."""
        state.pending.append(mx.array(np.asarray(embeds, dtype=np.float32)).astype(self.dtype))

    @on_mlx_thread
    def take_embeddings(self, state: MLXState) -> np.ndarray:
        """All queued audio embeddings as float32 numpy [n, dim], removing them from the queue."""
        return to_numpy(self._pop(state, sum(a.shape[0] for a in state.pending)))

    def _pop(self, state: MLXState, n: int) -> mx.array:
        got = take_rows(state.pending, n)
        return got[0] if len(got) == 1 else mx.concatenate(got)

    # -- decoder ----------------------------------------------------------------------------------

    def _forward(self, state: MLXState, tokens: list[int], block: int = 256) -> mx.array:
        """Final hidden states [n, dim] of n positions: audio embedding + token embedding each."""
        if self._ahead is not None and any(s is state for s in self._ahead.states):
            self._ahead = None
        outs = []
        for s in range(0, len(tokens), block):
            chunk = tokens[s:s + block]
            x = self._pop(state, len(chunk)) + self.decoder.embed(mx.array(chunk))
            outs.append(self.decoder.forward(x, state.decoder_cache, state.ffn_scales))
            mx.eval(outs[-1], *state.decoder_cache.arrays())
        return outs[0] if len(outs) == 1 else mx.concatenate(outs)

    @on_mlx_thread
    def prefill(self, state: MLXState, tokens: list[int], *, predict: bool = True) -> int | None:
        """Run prompt positions; with ``predict``, return the greedy token at the last of them."""
        hidden = self._forward(state, tokens)
        return int(mx.argmax(self.decoder.logits(hidden[-1]))) if predict else None

    @on_mlx_thread
    def logits(self, state: MLXState, tokens: list[int]) -> np.ndarray:
        """Teacher-forced logits [n, vocab] float32 for n positions."""
        return to_numpy(self.decoder.logits(self._forward(state, tokens)))

    def _step(self, states: list[MLXState], tokens: mx.array) -> mx.array:
        """Greedy tokens of the next position of each stream, from its first queued audio embedding."""
        x = mx.concatenate([s.pending[0][:1] for s in states]) + self.decoder.embed(tokens)
        scales = states[0].ffn_scales[None] if len(states) == 1 else mx.stack([s.ffn_scales for s in states])
        hidden = self.decoder.step(x, [s.decoder_cache for s in states], scales)
        return mx.argmax(self.decoder.logits(hidden), axis=-1)

    @on_mlx_thread
    def decode(self, states: list[MLXState], tokens: list[int]) -> list[int]:
        """One decode step for a batch of streams: each consumes one audio embedding and its last token."""
        for s in states:
            if not s.pending:
                raise RuntimeError("decoding a position whose audio has not been encoded")
        ahead, self._ahead = self._ahead, None
        if (ahead is not None and len(ahead.states) == len(states)
                and all(a is b for a, b in zip(ahead.states, states)) and ahead.tokens == list(tokens)):
            out = ahead.next_tokens
            self.steps_ahead_used += 1
        else:
            out = self._step(states, mx.array(tokens, dtype=mx.int32))
        for s in states:  # commit the step
            self._pop(s, 1)
            s.decoder_cache.advance(1)
        if all(s.pending for s in states):  # every stream has the next position's audio: start it
            self._ahead = _StepAhead(list(states), None, self._step(states, out))
        ahead_out = [self._ahead.next_tokens] if self._ahead is not None else []
        mx.async_eval(out, *ahead_out, *[a for s in states for a in s.decoder_cache.arrays()])
        result = out.tolist()
        if self._ahead is not None:
            self._ahead.tokens = result
        self.decode_steps += 1
        if self.decode_steps % CLEAR_CACHE_STEPS == 0:
            mx.clear_cache()
        return result
