"""Preallocated ring KV cache for sliding-window attention.

Position ``p`` of a sequence lives in slot ``p % window``. Once ``window`` positions have been
written, each new one overwrites the oldest, which is exactly the position that just left the
window. So the memory of a stream is fixed at creation, whatever the length of the audio, and no
step allocates. Keys are stored after RoPE, so the order of slots does not matter to attention.
The buffers are created with ``torch.empty``: on CPU the pages of the 8192-position decoder cache
are only touched (and count toward RSS) as the stream grows into them.
"""

from __future__ import annotations

import torch


class RingKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, window: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device):
        self.window = window
        self.k = torch.empty(n_layers, n_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(n_layers, n_kv_heads, window, head_dim, dtype=dtype, device=device)
        self.length = 0  # positions written so far == absolute position of the next one

    def clone(self) -> RingKVCache:
        """A copy; only the slots written so far are copied (and touched)."""
        new = RingKVCache.__new__(RingKVCache)
        new.window, new.length = self.window, self.length
        new.k, new.v = torch.empty_like(self.k), torch.empty_like(self.v)
        n = self.valid_slots()
        new.k[:, :, :n] = self.k[:, :, :n]
        new.v[:, :, :n] = self.v[:, :, :n]
        return new

    def valid_slots(self) -> int:
        return min(self.length, self.window)

    def slot_positions(self, device) -> torch.Tensor:
        """Absolute position held by each valid slot (slot order)."""
        n = self.valid_slots()
        slots = torch.arange(n, device=device)
        return self.length - 1 - torch.remainder(self.length - 1 - slots, self.window)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` [kv_heads, n, head_dim] for positions length .. length+n-1.

        Only the last ``window`` of them can ever be attended to again, so only those are kept.
        ``advance`` must be called once all layers have written.
        """
        n = k.shape[1]
        if n == 1:
            slot = self.length % self.window
            self.k[layer, :, slot] = k[:, 0]
            self.v[layer, :, slot] = v[:, 0]
            return
        keep = min(n, self.window)
        first = (self.length + n - keep) % self.window
        head = min(keep, self.window - first)  # slots first.. up to the end of the ring, then from 0
        for dst, src in ((self.k[layer], k[:, n - keep:]), (self.v[layer], v[:, n - keep:])):
            dst[:, first:first + head] = src[:, :head]
            dst[:, :keep - head] = src[:, head:]

    def advance(self, n: int) -> None:
        self.length += n
