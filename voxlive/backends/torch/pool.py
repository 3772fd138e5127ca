"""The KV slot pool's buffers and batched attention, in PyTorch (bookkeeping: ``backends/pool.py``).

Keys and values are ``[layers, slots, blocks, kv_heads, KEY_BLOCK, head_dim]`` ``torch.empty``
buffers: the index axis of a slot (its capacity, rounded up to a block) is cut into blocks of
``KEY_BLOCK`` indices, so the prefix attention reads is one contiguous piece of each slot at any
fill (a strided prefix of ``[kv_heads, capacity, head_dim]`` makes CPU matmuls copy it first, or
run at a quarter of their speed). On CPU untouched pages are not resident, so RSS grows with the
indices streams actually filled, not with the pool's size. ``kv_int8``: int8 keys and values with
one float32 scale per head and position (half the bytes of bf16). Keys are stored after RoPE.

Attention is batched matmuls over (slot, block, KV head), the query heads of a KV head grouped
(``[KEY_BLOCK, d] x [d, group * n]``, then ``[group * n, KEY_BLOCK] x [KEY_BLOCK, d]`` summed over
blocks in float32) and a softmax in float32 over all blocks: it reads the keys and values once,
in place, where ``scaled_dot_product_attention`` with one query ran at ~1 GB/s in bf16 on CPU.
Where voxlive's CPU attention kernel runs (``kernel_attends``), one kernel call per layer does the
batch instead, int8 pools included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..pool import KEY_BLOCK, Plan, SlotPool
from . import cpu_kernels


@dataclass
class Step:
    """A ``Plan`` as tensors on the pool's device."""

    plan: Plan
    rows: torch.Tensor | None
    positions: np.ndarray
    bias: torch.Tensor  # the plan's mask as 0 / -inf, [B, 1, 1, n, keys (+ n)]
    index: torch.Tensor
    write_rows: torch.Tensor
    write_slots: torch.Tensor
    write_at: torch.Tensor


class KVPool(SlotPool):
    def __init__(self, n_layers: int, n_kv_heads: int, window: int, head_dim: int, *, extra: int = 0,
                 dtype: torch.dtype, device: torch.device, kv_int8: bool = False, slots: int = 1, amx: bool = False):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device, self.int8 = dtype, device, kv_int8
        # attention's products on AMX tiles: for pools fed many queries a call (the encoder's frames), where
        # the vector kernel is compute-bound; decode steps (a few queries over thousands of keys, bound by
        # memory) are faster without (README, "Speed"). One path for good: the two round differently.
        self.amx = (amx and cpu_kernels.amx_available() and dtype == torch.bfloat16 and not kv_int8
                    and device.type == "cpu")
        self.k = self.v = self.k_scale = self.v_scale = None
        self._scratch: dict[str, torch.Tensor] = {}  # per buffer's name: where non-contiguous reads are gathered
        self.capacity = window + extra
        super().__init__(window, extra, slots)

    def _buffers(self) -> list[torch.Tensor]:
        return [b for b in (self.k, self.v, self.k_scale, self.v_scale) if b is not None]

    def arrays(self) -> list[torch.Tensor]:
        return self._buffers()

    def _grow(self, slots: int) -> None:
        old, n = self._buffers(), self.slots
        blocks = -(-self.capacity // KEY_BLOCK)
        shape = (self.n_layers, slots, blocks, self.n_kv_heads, KEY_BLOCK, self.head_dim)
        store = torch.int8 if self.int8 else self.dtype
        self.k = torch.empty(shape, dtype=store, device=self.device)
        self.v = torch.empty(shape, dtype=store, device=self.device)
        if self.int8:
            self.k_scale = torch.empty(shape[:-1], dtype=torch.float32, device=self.device)
            self.v_scale = torch.empty(shape[:-1], dtype=torch.float32, device=self.device)
        for new, buf in zip(self._buffers(), old):
            for s in range(n):  # only what was written is copied (and touched)
                new[:, s, :-(-self._ready[s] // KEY_BLOCK)] = buf[:, s, :-(-self._ready[s] // KEY_BLOCK)]

    def _copy(self, dst: int, src: int, n: int) -> None:
        blocks = -(-n // KEY_BLOCK)
        for buf in self._buffers():
            buf[:, dst, :blocks] = buf[:, src, :blocks]

    def _zero(self, slot: int, lo: int, hi: int) -> None:
        for b in range(lo // KEY_BLOCK, -(-hi // KEY_BLOCK)):
            a, c = max(lo - b * KEY_BLOCK, 0), min(hi - b * KEY_BLOCK, KEY_BLOCK)
            for buf in self._buffers():
                buf[:, slot, b, :, a:c] = 0

    def begin(self, slots: list[int], counts: list[int]) -> Step:
        p = self.plan(slots, counts)

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

        # the mask as a bias added to the scores (0 or -inf) [B, 1, 1, n, keys]: cheaper than a fill per layer
        bias = torch.zeros(p.mask.shape, dtype=self.dtype).masked_fill_(torch.from_numpy(~p.mask), float("-inf"))
        return Step(p, None if p.rows is None else t(p.rows), p.positions, bias[:, None, None].to(self.device),
                    t(np.array(p.slots)), t(p.write_rows), t(p.write_slots), t(p.write_at))

    def _store(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.int8:
            self._put(layer, step, _quantize(k), _quantize(v))
        else:
            self._put(layer, step, (k, None), (v, None))

    def _put(self, layer: int, step: Step, k: tuple, v: tuple) -> None:
        """Stores the fed rows' keys and values (each as stored, and its scales for int8)."""
        block, at = step.write_at // KEY_BLOCK, step.write_at % KEY_BLOCK
        for buf, scales, (x, s) in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            buf[layer][step.write_slots, block, :, at] = x[step.write_rows]
            if s is not None:
                scales[layer][step.write_slots, block, :, at] = s[step.write_rows]

    def _read(self, name: str, layer: int, step: Step) -> torch.Tensor:
        """Blocks 0 .. keys / KEY_BLOCK of the step's slots [B, blocks, kv_heads, KEY_BLOCK, ...].

        In place when that is one piece of memory (one slot, or a range of slots read to their last
        block); else gathered into a buffer kept for the next step (a fresh one would cost a page
        fault per 4 KB, several times the copy itself)."""
        p, buf = step.plan, getattr(self, name)
        blocks, B = p.keys // KEY_BLOCK, len(p.slots)
        if p.lo is not None and (B == 1 or blocks == buf.shape[2]):
            return buf[layer, p.lo:p.lo + B, :blocks]
        shape = (B, blocks, *buf.shape[3:])
        size = B * blocks * buf[0, 0, 0].numel()
        scratch = self._scratch.get(name)
        if scratch is None or scratch.numel() < size:
            scratch = self._scratch[name] = torch.empty(size, dtype=buf.dtype, device=buf.device)
        out = scratch[:size].view(shape)
        torch.index_select(buf[layer, :, :blocks], 0, step.index, out=out)
        return out

    def attend(self, layer: int, step: Step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Sliding-window attention of the fed rows q [rows, heads, d] (k, v [rows, kv_heads, d]) over
        their streams' slots and themselves; stores k, v. Returns [rows, heads * d]."""
        p = step.plan
        B, n, m = len(p.slots), p.n, p.keys // KEY_BLOCK
        heads, d = q.shape[1], q.shape[2]
        kvh = self.n_kv_heads
        if self.kernel_attends(q):
            return self._attend_kernel(layer, step, q, k, v)
        gn = heads // kvh * n  # the query rows of one KV head: its group of heads x the fed positions
        if p.in_place:
            self._store(layer, step, k, v)
        else:
            if self.int8:  # as the pool will hold them, so results do not depend on how positions are fed
                k, v = _round_trip(k), _round_trip(v)
            k_new, v_new = self._pad(k, step).transpose(1, 2), self._pad(v, step).transpose(1, 2)  # [B, kvh, n, d]
        q = self._pad(q * d ** -0.5, step)  # [B, n, heads, d]
        q = q.view(B, n, kvh, heads // kvh, d).permute(0, 2, 3, 1, 4).reshape(B, kvh, gn, d)
        scores = []
        if m:
            keys, values = self._read("k", layer, step), self._read("v", layer, step)
            if self.int8:
                keys = keys.to(q.dtype) * self._read("k_scale", layer, step)[..., None].to(q.dtype)
                values = values.to(q.dtype) * self._read("v_scale", layer, step)[..., None].to(q.dtype)
            qt = q.transpose(2, 3)[:, None].expand(B, m, kvh, d, gn).reshape(B * m * kvh, d, gn)
            s = torch.bmm(keys.reshape(B * m * kvh, KEY_BLOCK, d), qt)  # [B * m * kvh, KEY_BLOCK, gn]
            scores.append(s.view(B, m, kvh, KEY_BLOCK, gn).permute(0, 2, 4, 1, 3).reshape(B, kvh, gn, m * KEY_BLOCK))
        if not p.in_place:
            scores.append(q @ k_new.transpose(2, 3))  # [B, kvh, gn, n]
        scores = scores[0] if len(scores) == 1 else torch.cat(scores, dim=-1)
        scores = scores.view(B, kvh, heads // kvh, n, -1) + step.bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(B, kvh, gn, -1)
        out = torch.zeros(B, kvh, gn, d, dtype=torch.float32, device=q.device)
        if m:
            pp = probs[..., :m * KEY_BLOCK].reshape(B, kvh, gn, m, KEY_BLOCK).permute(0, 3, 1, 2, 4)
            parts = torch.bmm(pp.reshape(B * m * kvh, gn, KEY_BLOCK), values.reshape(B * m * kvh, KEY_BLOCK, d))
            out += parts.view(B, m, kvh, gn, d).sum(1, dtype=torch.float32)
        if not p.in_place:
            out += (probs[..., m * KEY_BLOCK:] @ v_new).float()
            self._store(layer, step, k, v)
        out = out.to(q.dtype).view(B, kvh, heads // kvh, n, d).permute(0, 3, 1, 2, 4).reshape(B * n, heads * d)
        return out if step.rows is None else out[step.rows]

    def kernel_attends(self, q: torch.Tensor) -> bool:
        """Whether voxlive's attention kernel takes these queries [rows, heads, d]: with
        ``cpu_kernels.batch_invariant()``, bf16 or float32 queries on a CPU (bf16, float32 or int8 keys).
        It computes each query on its own, where the batched matmuls and softmax above block their sums
        by the pass's sizes, so a stream's numbers do not depend on how its positions were chunked or
        batched; and it reads each slot's keys and values once for all of a KV head's query heads, in one
        call for the batch (README, "Speed")."""
        return (cpu_kernels.batch_invariant() and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32)
                and q.shape[2] % 8 == 0 and q.shape[2] <= cpu_kernels.ATTENTION_MAX_HEAD_DIM)

    def _attend_kernel(self, layer: int, step: Step, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``attend`` by ``cpu_kernels.attention``: one call for the batch (each stream's rows are
        consecutive), over each slot as it was before the pass and the fed rows; then stores k, v."""
        p = step.plan
        # positions relative to each stream's first (Python ints: torch.compile traces numpy indexing as tensors)
        starts = [int(self._length[s] - self._start[s]) for s in p.slots]
        rows = q.shape[0]
        q2 = q.reshape(rows, -1)
        if self.int8:  # the new rows quantized as the pool will hold them, so chunking changes no number
            (kq, ks), (vq, vs) = _quantize(k), _quantize(v)
            out = cpu_kernels.attention(q2, kq.view(rows, -1), vq.view(rows, -1), self.k[layer], self.v[layer],
                                        p.slots, starts, p.counts, self.window, q.shape[2], self.capacity,
                                        scales=(ks, vs, self.k_scale[layer], self.v_scale[layer]))
            self._put(layer, step, (kq, ks), (vq, vs))
        else:
            out = cpu_kernels.attention(q2, k.reshape(rows, -1), v.reshape(rows, -1), self.k[layer], self.v[layer],
                                        p.slots, starts, p.counts, self.window, q.shape[2], self.capacity,
                                        amx=self.amx and q.dtype == torch.bfloat16)
            self._store(layer, step, k, v)
        return out

    @staticmethod
    def _pad(x: torch.Tensor, step: Step) -> torch.Tensor:
        """Fed rows [rows, ...] -> [B, n, ...], zeros where a stream fed fewer than n."""
        B, n = len(step.plan.slots), step.plan.n
        if step.rows is None:
            return x.reshape(B, n, *x.shape[1:])
        out = x.new_zeros(B * n, *x.shape[1:])
        out[step.rows] = x
        return out.view(B, n, *x.shape[1:])


def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, kv_heads, d] -> int8 values and a float32 scale per row and head."""
    scale = (x.float().abs().amax(dim=-1) / 127).clamp(min=1e-30)
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


def _round_trip(x: torch.Tensor) -> torch.Tensor:
    q, scale = _quantize(x)
    return (q.float() * scale[..., None]).to(x.dtype)
