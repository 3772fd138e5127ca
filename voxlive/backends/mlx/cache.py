"""Ring KV cache for sliding-window attention, in MLX.

Position ``p`` of a sequence lives in slot ``p % window``, exactly as in the PyTorch backend: once
``window`` positions have been written each new one overwrites the one that just left the window,
so a stream's memory is bounded by the window whatever the length of the audio. Keys are stored
after RoPE, so the order of slots does not matter to attention.

Two MLX differences. Each layer has its own array, so a step's write into one layer can reuse that
array's buffer in place (MLX donates a buffer only to its single user; one array shared by all
layers would be read by one layer while the next writes it, and copied). And the arrays grow in
blocks of ``GROW`` slots up to the window: MLX has no uninitialised allocation whose pages stay
untouched (``torch.empty``), so preallocating the decoder's 8192 slots would cost every stream
~870 MB of bf16 from its first second.
"""

from __future__ import annotations

import mlx.core as mx

GROW = 256


class RingKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, window: int, head_dim: int, *, dtype: mx.Dtype):
        self.window = window
        self.k = [mx.zeros((n_kv_heads, 0, head_dim), dtype) for _ in range(n_layers)]
        self.v = [mx.zeros((n_kv_heads, 0, head_dim), dtype) for _ in range(n_layers)]
        self.length = 0  # positions written so far == absolute position of the next one

    def clone(self) -> RingKVCache:
        """An independent copy (new array objects: MLX slice assignment rebinds the array object)."""
        new = RingKVCache.__new__(RingKVCache)
        new.window, new.length = self.window, self.length
        new.k = [mx.array(a) for a in self.k]
        new.v = [mx.array(a) for a in self.v]
        return new

    def arrays(self) -> list[mx.array]:
        return self.k + self.v

    @property
    def allocated(self) -> int:
        return self.k[0].shape[1]

    def valid_slots(self) -> int:
        return min(self.length, self.window)

    def slot_positions(self) -> mx.array:
        """Absolute position held by each valid slot (slot order)."""
        slots = mx.arange(self.valid_slots())
        return self.length - 1 - mx.remainder(self.length - 1 - slots, self.window)

    def read(self, layer: int, n: int) -> tuple[mx.array, mx.array]:
        """Keys and values of slots 0..n-1 of a layer."""
        return self.k[layer][:, :n], self.v[layer][:, :n]

    def _reserve(self, layer: int, slots: int) -> None:
        have = self.k[layer].shape[1]
        if slots <= have:
            return
        size = min(self.window, -(-slots // GROW) * GROW)
        for arrays in (self.k, self.v):
            a = arrays[layer]
            arrays[layer] = mx.concatenate((a, mx.zeros((a.shape[0], size - have, a.shape[2]), a.dtype)), axis=1)

    def write(self, layer: int, k: mx.array, v: mx.array) -> None:
        """Store ``k``/``v`` [kv_heads, n, head_dim] for positions length .. length+n-1.

        Only the last ``window`` of them can ever be attended to again, so only those are kept.
        ``advance`` must be called once all layers have written.
        """
        n = k.shape[1]
        self._reserve(layer, min(self.window, self.length + n))
        keep = min(n, self.window)
        first = (self.length + n - keep) % self.window
        head = min(keep, self.window - first)  # slots first.. up to the end of the ring, then from 0
        for arrays, src in ((self.k, k), (self.v, v)):
            dst = arrays[layer]
            dst[:, first:first + head] = src[:, n - keep:n - keep + head]
            if keep > head:
                dst[:, :keep - head] = src[:, n - keep + head:]

    def advance(self, n: int) -> None:
        self.length += n
