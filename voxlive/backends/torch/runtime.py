"""The PyTorch runtime: the tensor maths behind the runtime contract (``voxlive.backends.runtime``).

It owns the weights and the encoder's and decoder's KV pools; everything else (validation, the
embedding queue, encode rounds, decode driving, rewind) is ``BaseRuntime``'s.
"""

from __future__ import annotations

import numpy as np
import torch

from ...checkpoint import Checkpoint, CheckpointError
from ...layouts.torch_quantized import MODES
from ..runtime import BaseRuntime, pick_dtype, pick_kv_dtype, pick_quantize
from . import cpu_kernels
from .decoder import Decoder
from .encoder import Adapter, ConvState, Encoder
from .weights import WeightReader

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Each row of a decoder pass beyond the first, relative to a one-row pass, through the AMX kernels,
# per weight format: fitted to the full-size model's pass costs for 1..9 rows on a 2-core CPU
# (README, "Drafts, measured": 9 rows cost 1.06-1.08x one row in bf16, 1.19x in int8). int4's
# slope is 0.07 since its one-row pass got faster (9 rows: 1.55-1.57x), but drafting by that slope
# costs more: on the replayed speech, each pass at its measured cost, 0.03 takes 675 one-row
# passes' worth, 0.07 721 and 0.01-0.02 686-700.
AMX_ROW_COST = {None: 0.01, "int8": 0.025, "int4": 0.03}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available")
    return dev


class TorchRuntime(BaseRuntime):
    backend = "torch"

    def __init__(self, ckpt: Checkpoint, *, pad_id: int, device: str | None = None, dtype: str | None = None,
                 quantize: str | None = None, kv_dtype: str | None = None, max_draft: int | None = None,
                 compile: bool = False):
        self._setup(ckpt.config, pad_id, max_draft)
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, DTYPES, "float16" if self.device.type == "mps" else "bfloat16")
        self.quantize = pick_quantize(quantize, ckpt.quantize, MODES, self.backend, ckpt)
        int8 = pick_kv_dtype(kv_dtype) == "int8"
        self.kv_dtype = "int8" if int8 else str(self.dtype).removeprefix("torch.")
        w = WeightReader(ckpt, self.dtype, self.device, self.quantize)
        try:
            with torch.inference_mode():
                self.encoder = Encoder.from_weights(w, self.config, self.device)
                self.adapter = Adapter.from_weights(w, self.config)
                self.decoder = Decoder.from_weights(w, self.config, self.device)
        except OSError as err:
            raise CheckpointError(f"{ckpt.weights.path}: read error: {err}") from err
        if self.device.type == "cpu" and cpu_kernels.amx_available():
            self.row_cost = AMX_ROW_COST[self.quantize]
        self.encoder_pool = self.encoder.new_pool(self.dtype, self.device, kv_int8=int8)
        self.decoder_pool = self.decoder.new_pool(self.dtype, self.device, extra=self.max_draft, kv_int8=int8)
        # compile: the decoder's forward through torch.compile (one function serves every pass; the
        # pool's positions and masks are tensors). Slow to start, and slower than eager on small
        # CPUs (README); the same design would let a CUDA graph capture the step.
        if compile:
            self.decoder.blocks = torch.compile(self.decoder.blocks)

    # -- tensor maths for BaseRuntime -------------------------------------------------------------

    def _new_conv(self) -> ConvState:
        return self.encoder.new_conv_state(self.dtype, self.device)

    def _copy_conv(self, conv: ConvState) -> ConvState:
        return self.encoder.copy_conv_state(conv)

    @torch.inference_mode()
    def _ffn_scales(self, delay_tokens: int) -> torch.Tensor:
        return self.decoder.ffn_scales(delay_tokens)

    @torch.inference_mode()
    def _encode(self, states, mels: list[np.ndarray]) -> list[torch.Tensor]:
        xs = [self.encoder.stem(self._from_numpy(mel), s.conv) for s, mel in zip(states, mels)]
        pool = self.encoder_pool
        step = pool.begin([s.encoder_slot for s in states], [x.shape[0] for x in xs])
        out = self.adapter(self.encoder.transformer(torch.cat(xs) if len(xs) > 1 else xs[0], pool, step))
        pool.commit(step.plan)
        return list(out.split([x.shape[0] // self.adapter.factor for x in xs]))

    @torch.inference_mode()
    def _hidden(self, states, embeds: list[torch.Tensor], feeds: list[list[int]], want: list[int]) -> torch.Tensor:
        counts = [len(f) for f in feeds]
        x = torch.cat(embeds) if len(embeds) > 1 else embeds[0]
        x = x + self.decoder.embed(torch.tensor([t for f in feeds for t in f], device=self.device))
        if len(states) == 1:
            scales = states[0].ffn_scales
        else:
            scales = torch.cat([s.ffn_scales.expand(n, *s.ffn_scales.shape) for s, n in zip(states, counts)])
        pool = self.decoder_pool
        step = pool.begin([s.decoder_slot for s in states], counts)
        hidden = self.decoder.forward(x, pool, step, scales)
        pool.commit(step.plan)
        ends = np.cumsum(counts)
        rows = [int(r) for end, m in zip(ends, want) for r in range(end - m, end)]
        return hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]

    @torch.inference_mode()
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.logits(hidden)

    @torch.inference_mode()
    def _greedy(self, logits: torch.Tensor):
        tokens = logits.argmax(-1)
        pad = logits[:, self.pad_id].float()
        others = logits.clone()
        others[:, self.pad_id] = float("-inf")
        best, best_other = others.max(-1)
        chosen = logits.gather(-1, tokens[:, None])[:, 0].float()
        logprobs = chosen - torch.logsumexp(logits.float(), -1)
        return (tokens.cpu().numpy(), (pad - best.float()).cpu().numpy(), best_other.cpu().numpy(),
                logprobs.cpu().numpy())

    def _from_numpy(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.dtype)

    def _to_numpy(self, a: torch.Tensor) -> np.ndarray:
        return a.float().cpu().numpy()

    @staticmethod
    def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
