"""The MLX runtime: the tensor maths behind the runtime contract (``voxlive.backends.runtime``).

It owns the weights and the encoder's and decoder's KV pools; everything else is
``BaseRuntime``'s. What MLX adds:

- Every public method runs on the process's one MLX thread (``thread.py``), so any thread may
  call it.
- ``encode`` queues its embeddings and returns without waiting (``mx.async_eval``): the encoder
  computes while the caller goes on to the decode step that will use them. Every pass evaluates
  the pool arrays it wrote, so no graph grows from one step to the next.
- MLX keeps freed buffers for reuse; encoder chunks and prompts of many sizes leave buffers that
  decode steps never reuse, so the buffer cache is cleared every ``CLEAR_CACHE_STEPS`` decoder
  passes and memory stays bounded over hours of streaming.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ...checkpoint import Checkpoint, CheckpointError
from ..runtime import BaseRuntime, pick_dtype, pick_kv_dtype, pick_quantize
from .decoder import Decoder
from .encoder import Adapter, ConvState, Encoder
from .quant import BITS
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


class MLXRuntime(BaseRuntime):
    backend = "mlx"

    def __init__(self, ckpt: Checkpoint, *, pad_id: int, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, kv_dtype: str | None = None, max_draft: int | None = None):
        self._setup(ckpt.config, pad_id, max_draft)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, DTYPES, "bfloat16")  # the checkpoint's own dtype
        stored = f"int{ckpt.quantization['bits']}" if ckpt.quantization else None
        self.quantize = pick_quantize(quantize, stored, tuple(BITS), self.backend, ckpt)
        int8 = pick_kv_dtype(kv_dtype) == "int8"
        self.kv_dtype = "int8" if int8 else str(self.dtype).removeprefix("mlx.core.")
        try:
            self._load(WeightReader(ckpt, self.dtype, BITS[self.quantize] if quantize else None), int8)
        except OSError as err:
            raise CheckpointError(f"{ckpt.weights.path}: read error: {err}") from err
        self.decoder_passes = 0  # the buffer cache is cleared every CLEAR_CACHE_STEPS

    @on_mlx_thread
    def _load(self, w: WeightReader, int8: bool) -> None:
        self.encoder = Encoder.from_weights(w, self.config)
        self.adapter = Adapter.from_weights(w, self.config)
        self.decoder = Decoder.from_weights(w, self.config)
        self.encoder_pool = self.encoder.new_pool(self.dtype, kv_int8=int8)
        self.decoder_pool = self.decoder.new_pool(self.dtype, extra=self.max_draft, kv_int8=int8)

    @on_mlx_thread
    def synchronize(self) -> None:
        """Wait for all queued MLX work (for timing: ``encode`` returns before its work is done)."""
        mx.synchronize()

    # -- tensor maths for BaseRuntime -------------------------------------------------------------

    def _new_conv(self) -> ConvState:
        return self.encoder.new_conv_state(self.dtype)

    def _copy_conv(self, conv: ConvState) -> ConvState:
        return self.encoder.copy_conv_state(conv)

    def _ffn_scales(self, delay_tokens: int) -> mx.array:
        scales = self.decoder.ffn_scales(delay_tokens)
        mx.eval(scales)
        return scales

    def _encode(self, states, mels: list[np.ndarray]) -> list[mx.array]:
        xs = [self.encoder.stem(self._from_numpy(mel), s.conv) for s, mel in zip(states, mels)]
        pool = self.encoder_pool
        plan = pool.begin([s.encoder_slot for s in states], [x.shape[0] for x in xs])
        out = self.adapter(self.encoder.transformer(mx.concatenate(xs) if len(xs) > 1 else xs[0], pool, plan))
        pool.commit(plan)
        # Start the work now, wait for none of it: the decode steps that read it come next.
        mx.async_eval(out, *pool.arrays(), *[a for s in states for a in (s.conv.mel_tail, s.conv.conv1_tail)])
        embeds, row = [], 0
        for x in xs:
            n = x.shape[0] // self.adapter.factor
            embeds.append(out[row:row + n])
            row += n
        return embeds

    def _hidden(self, states, embeds: list[mx.array], feeds: list[list[int]], want: list[int]) -> mx.array:
        counts = [len(f) for f in feeds]
        x = self._concat(embeds) + self.decoder.embed(mx.array([t for f in feeds for t in f], dtype=mx.int32))
        if len(states) == 1:
            scales = states[0].ffn_scales
        else:
            scales = mx.concatenate([mx.broadcast_to(s.ffn_scales, (n, *s.ffn_scales.shape))
                                     for s, n in zip(states, counts)])
        pool = self.decoder_pool
        plan = pool.begin([s.decoder_slot for s in states], counts)
        hidden = self.decoder.forward(x, pool, plan, scales)
        pool.commit(plan)
        ends = np.cumsum(counts)
        rows = [int(r) for end, m in zip(ends, want) for r in range(end - m, end)]
        if len(rows) != hidden.shape[0]:
            hidden = hidden[mx.array(rows, dtype=mx.int32)] if rows else hidden[:0]
        mx.eval(hidden, *pool.arrays())
        self.decoder_passes += 1
        if self.decoder_passes % CLEAR_CACHE_STEPS == 0:
            mx.clear_cache()
        return hidden

    def _logits(self, hidden: mx.array) -> mx.array:
        return self.decoder.logits(hidden)

    def _greedy(self, logits: mx.array):
        tokens = mx.argmax(logits, axis=-1)
        pad = logits[:, self.pad_id].astype(mx.float32)
        column = mx.arange(logits.shape[-1])[None, :] == self.pad_id
        others = mx.where(column, mx.array(float("-inf"), logits.dtype), logits)
        best_other = mx.argmax(others, axis=-1)
        margin = pad - mx.max(others, axis=-1).astype(mx.float32)
        chosen = mx.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0].astype(mx.float32)
        logprobs = chosen - mx.logsumexp(logits.astype(mx.float32), axis=-1)
        mx.eval(tokens, margin, best_other, logprobs)
        return np.array(tokens), np.array(margin), np.array(best_other), np.array(logprobs)

    def _from_numpy(self, a: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(a, dtype=np.float32)).astype(self.dtype)

    def _to_numpy(self, a: mx.array) -> np.ndarray:
        return np.array(a.astype(mx.float32))

    @staticmethod
    def _concat(parts: list[mx.array]) -> mx.array:
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)


# Every public method of the contract runs on the MLX thread.
for _name in ("new_state", "clone_state", "release", "position", "encode", "encode_batch", "add_embeddings",
              "take_embeddings", "decode", "rewind", "logits"):
    setattr(MLXRuntime, _name, on_mlx_thread(getattr(BaseRuntime, _name)))
