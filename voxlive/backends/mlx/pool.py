"""The KV slot pool's buffers and batched attention, in MLX (bookkeeping: ``backends/pool.py``).

The same layout and plans as the PyTorch pool, with two MLX differences. Each layer has its own
``[slots, kv_heads, allocated, head_dim]`` array, so a pass's write into one layer can reuse that
array's buffer in place (MLX donates a buffer only to its single user; one array for all layers
would be read by one layer while the next writes it, and copied). And the arrays grow along the
index axis in blocks of ``KEY_BLOCK`` up to the capacity (rounded up to a block), as far as the
fullest slot reads: MLX has
no allocation whose pages stay untouched (``torch.empty``), so preallocating the decoder's 8192
indices would cost every slot ~870 MB of bf16 from its first second.

Attention: ``mx.fast.scaled_dot_product_attention`` (grouped heads natively) with the plan's mask.
``kv_int8``: int8 keys and values with one scale per head and position.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from ..pool import KEY_BLOCK, Plan, SlotPool


class KVPool(SlotPool):
    def __init__(self, n_layers: int, n_kv_heads: int, window: int, head_dim: int, *, extra: int = 0,
                 dtype: mx.Dtype, kv_int8: bool = False, slots: int = 1):
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.int8 = dtype, kv_int8
        self.allocated = 0  # indices held by every slot's arrays (grows up to the capacity)
        self.k: list[mx.array] = []
        self.v: list[mx.array] = []
        self.k_scale: list[mx.array] = []
        self.v_scale: list[mx.array] = []
        self.capacity = window + extra
        super().__init__(window, extra, slots)

    def _lists(self) -> list[list[mx.array]]:
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.int8 else [])

    def arrays(self) -> list[mx.array]:
        return [a for arrays in self._lists() for a in arrays]

    def _zeros(self, slots: int, indices: int, scale: bool) -> mx.array:
        if scale:
            return mx.zeros((slots, self.n_kv_heads, indices), mx.float32)
        return mx.zeros((slots, self.n_kv_heads, indices, self.head_dim), mx.int8 if self.int8 else self.dtype)

    def _grow(self, slots: int) -> None:
        for i, arrays in enumerate(self._lists()):
            scale = i >= 2
            if not arrays:
                arrays += [self._zeros(slots, self.allocated, scale) for _ in range(self.n_layers)]
                continue
            for layer, a in enumerate(arrays):
                arrays[layer] = mx.concatenate((a, self._zeros(slots - a.shape[0], self.allocated, scale)))
        mx.eval(self.arrays())

    def _copy(self, dst: int, src: int, n: int) -> None:
        for arrays in self._lists():
            for layer, a in enumerate(arrays):
                a[dst, :, :n] = a[src, :, :n]
        mx.eval(self.arrays())

    def _zero(self, slot: int, lo: int, hi: int) -> None:
        # A new array's indices are zeros; a reused slot's hold finite values of an earlier stream.
        if hi > self.allocated:
            size = -(-hi // KEY_BLOCK) * KEY_BLOCK
            for i, arrays in enumerate(self._lists()):
                for layer, a in enumerate(arrays):
                    extra = self._zeros(a.shape[0], size - self.allocated, i >= 2)
                    arrays[layer] = mx.concatenate((a, extra), axis=2)
            self.allocated = size

    def begin(self, slots: list[int], counts: list[int]) -> Plan:
        p = self.plan(slots, counts)
        p.mask = mx.array(p.mask)
        for name in ("rows", "write_rows", "write_slots", "write_at"):
            a = getattr(p, name)
            setattr(p, name, None if a is None else mx.array(np.ascontiguousarray(a).astype(np.int32)))
        p.index = mx.array(np.array(p.slots, np.int32))
        return p

    def _store(self, layer: int, p: Plan, k: mx.array, v: mx.array) -> None:
        k, v = k[p.write_rows], v[p.write_rows]
        if self.int8:
            (k, ks), (v, vs) = _quantize(k), _quantize(v)
            self.k_scale[layer][p.write_slots, :, p.write_at] = ks
            self.v_scale[layer][p.write_slots, :, p.write_at] = vs
        self.k[layer][p.write_slots, :, p.write_at] = k
        self.v[layer][p.write_slots, :, p.write_at] = v

    def _read(self, arrays: list[mx.array], layer: int, p: Plan) -> mx.array:
        a = arrays[layer]
        if p.lo is not None:
            return a[p.lo:p.lo + len(p.slots), :, :p.keys]
        return a[p.index][:, :, :p.keys]

    def attend(self, layer: int, p: Plan, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """Sliding-window attention of the fed rows q [rows, heads, d] (k, v [rows, kv_heads, d]) over
        their streams' slots and themselves; stores k, v. Returns [rows, heads * d]."""
        B, n = len(p.slots), p.n
        heads, d = q.shape[1], q.shape[2]
        if p.in_place:
            self._store(layer, p, k, v)
        keys, values = self._read(self.k, layer, p), self._read(self.v, layer, p)
        if self.int8:
            keys = keys.astype(q.dtype) * self._read(self.k_scale, layer, p)[..., None].astype(q.dtype)
            values = values.astype(q.dtype) * self._read(self.v_scale, layer, p)[..., None].astype(q.dtype)
        if not p.in_place:
            if self.int8:  # as the pool will hold them, so results do not depend on how positions are fed
                k, v = _round_trip(k), _round_trip(v)
            keys = mx.concatenate((keys, self._pad(k, p).transpose(0, 2, 1, 3)), axis=2)
            values = mx.concatenate((values, self._pad(v, p).transpose(0, 2, 1, 3)), axis=2)
        queries = self._pad(q, p).transpose(0, 2, 1, 3)  # [B, heads, n, d]
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=d ** -0.5, mask=p.mask[:, None])
        out = out.transpose(0, 2, 1, 3).reshape(B * n, heads * d)
        if not p.in_place:
            self._store(layer, p, k, v)
        return out if p.rows is None else out[p.rows]

    @staticmethod
    def _pad(x: mx.array, p: Plan) -> mx.array:
        """Fed rows [rows, ...] -> [B, n, ...], zeros where a stream fed fewer than n."""
        B, n = len(p.slots), p.n
        if p.rows is None:
            return x.reshape(B, n, *x.shape[1:])
        out = mx.zeros((B * n, *x.shape[1:]), x.dtype)
        out[p.rows] = x
        return out.reshape(B, n, *x.shape[1:])


def _quantize(x: mx.array) -> tuple[mx.array, mx.array]:
    """[rows, kv_heads, d] -> int8 values and a float32 scale per row and head."""
    xf = x.astype(mx.float32)
    scale = mx.maximum(mx.max(mx.abs(xf), axis=-1) / 127, 1e-30)
    return mx.clip(mx.round(xf / scale[..., None]), -127, 127).astype(mx.int8), scale


def _round_trip(x: mx.array) -> mx.array:
    q, scale = _quantize(x)
    return (q.astype(mx.float32) * scale[..., None]).astype(x.dtype)
