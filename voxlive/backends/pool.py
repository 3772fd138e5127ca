"""The KV slot pool's bookkeeping and step planning, the same for every backend.

A pool holds the keys and values of many streams in ``[layers, slots, kv_heads, capacity,
head_dim]`` buffers (each backend's ``pool.py``); a stream owns one slot. Position ``p`` of the
stream whose slot started at position ``s0`` lives at index ``(p - s0) % capacity`` of its slot: a
fresh slot fills from index 0 and, once full, each new position overwrites the oldest one.
``capacity`` is the attention window plus ``extra`` positions (the longest draft a verification
feeds), so positions written past a stream's committed length never overwrite a position still in
its window: ``rewind`` only lowers the length, and is exact.

Which position an index holds follows from the slot's length and start alone, so attention masks
come from positions, never from what was written: a rewound or reused slot needs no clearing. A
batched pass is planned once (``plan``: positions, masks, where each new key goes) and every layer
runs ONE attention call over the batch's slots, reading the prefix of whole ``KEY_BLOCK`` blocks
of indices that the batch's fullest stream fills (a handful of shapes per batch size). Short feeds (at most ``extra + 1`` positions: a step, a verification) store their keys
first and attend over the pool alone; longer ones (prompts, encoder chunks, teacher forcing)
attend over the pool and themselves, then store.

Memory: a backend's buffers grow with what streams use (untouched pages, or blocks of indices);
an index range is made safe to read (``_zero``) the first time attention reads it. A freed slot is
reused by the next stream (the lowest free one, so that a batch's slots tend to be a contiguous
range, which attention reads in place).
"""

from __future__ import annotations

import heapq
import math
import threading
from dataclasses import dataclass

import numpy as np

KEY_BLOCK = 256
FAR = -(2 ** 62)  # the position of an index that holds none: outside every window


@dataclass
class Plan:
    """One batched pass: ``counts[b]`` new positions for ``slots[b]`` (numpy, for every layer)."""

    slots: list[int]  # batch order
    counts: list[int]
    n: int  # the longest count: queries are padded to [batch, n]
    keys: int  # pool indices attended: 0 .. keys of every slot
    in_place: bool  # store the new keys first, attend over the pool alone
    lo: int | None  # the first slot when the slots are lo, lo + 1, ..., else None
    rows: np.ndarray | None  # each fed row's index in the padded [batch * n] grid; None: no padding
    positions: np.ndarray  # [rows] absolute position of each fed row
    mask: np.ndarray  # [batch, n, keys (+ n unless in_place)] bool: which keys each query sees
    write_rows: np.ndarray  # fed rows whose keys are stored ...
    write_slots: np.ndarray  # ... in these slots ...
    write_at: np.ndarray  # ... at these indices


class SlotPool:
    """Slots, lengths and plans; a backend subclass holds the buffers (``_grow``, ``_copy``, ``_zero``)."""

    def __init__(self, window: int, extra: int, slots: int):
        self.window, self.capacity = window, window + extra
        self._length = np.zeros(0, np.int64)  # per slot: its next position
        self._start = np.zeros(0, np.int64)  # per slot: the first position of the stream holding it
        self._ready = np.zeros(0, np.int64)  # per slot: indices 0 .. ready written or zeroed
        self._free: list[int] = []
        self._lock = threading.Lock()  # release() may run from a garbage collection on any thread
        self._add_slots(slots)

    @property
    def slots(self) -> int:
        return len(self._length)

    @property
    def lengths(self) -> np.ndarray:
        return self._length.copy()

    def _add_slots(self, slots: int) -> None:
        n = self.slots
        self._grow(slots)
        pad = np.zeros(slots - n, np.int64)
        self._length, self._start, self._ready = (np.concatenate((a, pad)) for a in (self._length, self._start, self._ready))
        for s in range(n, slots):
            heapq.heappush(self._free, s)

    def acquire(self, start: int = 0) -> int:
        """A free slot (the lowest) for a stream whose first position is ``start``."""
        with self._lock:
            if not self._free:
                self._add_slots(2 * self.slots)
            slot = heapq.heappop(self._free)
        self._length[slot] = self._start[slot] = start
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            heapq.heappush(self._free, slot)

    def copy_slot(self, src: int) -> int:
        """A new slot holding a copy of ``src``'s stream (only the indices it filled are copied)."""
        dst = self.acquire(int(self._start[src]))
        n = self._filled(src)
        self._copy(dst, src, n)
        self._length[dst] = self._length[src]
        self._ready[dst] = max(self._ready[dst], n)
        return dst

    def length(self, slot: int) -> int:
        return int(self._length[slot])

    def _filled(self, slot: int, extra: int = 0) -> int:
        return int(min(self._length[slot] + extra - self._start[slot], self.capacity))

    def rewind(self, slots: list[int], n: int) -> None:
        """Forget each slot's last ``n`` positions (exact for up to ``capacity - window + 1``)."""
        if n > self.capacity - self.window + 1:
            raise ValueError(f"rewind: at most {self.capacity - self.window + 1} positions, got {n}")
        for s in slots:
            if self._length[s] - n < self._start[s]:
                raise ValueError(f"rewind: slot {s} holds {self._length[s] - self._start[s]} positions, not {n}")
        for s in slots:
            self._length[s] -= n

    def age(self, slot: int, n: int) -> None:
        """Benchmarks only: make a slot's stream ``n`` positions older, its new keys and values zeros
        (e.g. a stream past the full window, without running its hours of audio)."""
        end = -(-min(self._filled(slot, n), self.capacity) // KEY_BLOCK) * KEY_BLOCK
        if self._ready[slot] < end:
            self._zero(slot, int(self._ready[slot]), end)
            self._ready[slot] = end
        self._length[slot] += n

    def commit(self, plan: Plan) -> None:
        """The pass ran: each slot's length advances by what it fed."""
        for s, c in zip(plan.slots, plan.counts):
            self._length[s] += c

    def plan(self, slots: list[int], counts: list[int]) -> Plan:
        """Plan one pass feeding ``counts[b]`` positions to ``slots[b]``; ``commit`` it once it ran."""
        cap, B, n = self.capacity, len(slots), max(counts)
        in_place = n <= cap - self.window + 1
        fill = max(self._filled(s, c if in_place else 0) for s, c in zip(slots, counts))
        keys = -(-fill // KEY_BLOCK) * KEY_BLOCK  # whole blocks (past the capacity: never held, masked)
        for s, c in zip(slots, counts):  # indices this pass reads or writes that no stream ever wrote
            need = max(keys, -(-self._filled(s, c) // KEY_BLOCK) * KEY_BLOCK)
            if self._ready[s] < need:
                self._zero(s, int(self._ready[s]), need)
                self._ready[s] = need

        idx = np.array(slots)
        lengths, starts, count = self._length[idx], self._start[idx], np.array(counts)
        j = np.arange(n)
        qpos = lengths[:, None] + j[None, :]  # [B, n]
        # index i of a slot holds relative position rel - 1 - ((rel - 1 - i) mod capacity), if >= 0
        rel = lengths - starts + (count if in_place else 0)
        held = rel[:, None] - 1 - np.mod(rel[:, None] - 1 - np.arange(keys)[None, :], cap)
        kpos = np.where((held >= 0) & (np.arange(keys) < cap)[None, :], starts[:, None] + held, FAR)
        fed = j[None, :] < count[:, None]  # [B, n]
        if not in_place:
            kpos = np.concatenate((kpos, np.where(fed, qpos, FAR)), axis=1)
        delta = qpos[:, :, None] - kpos[:, None, :]
        mask = (delta >= 0) & (delta < self.window)

        flat = fed.reshape(-1)
        rows = None if fed.all() else np.flatnonzero(flat)
        # stored: every fed position, or for a feed longer than the ring its last ``capacity``
        keep = fed & (j[None, :] >= (count - cap)[:, None])
        fed_row = (np.cumsum(flat) - 1).reshape(B, n)
        lo = slots[0] if slots == list(range(slots[0], slots[0] + B)) else None
        return Plan(list(slots), list(counts), n, keys, in_place, lo, rows, qpos.reshape(-1)[flat], mask,
                    fed_row[keep], np.broadcast_to(idx[:, None], (B, n))[keep], np.mod(qpos - starts[:, None], cap)[keep])

    # -- what a backend's buffers do --------------------------------------------------------------

    def _grow(self, slots: int) -> None:
        """Make room for ``slots`` slots, keeping what the existing ones hold."""
        raise NotImplementedError

    def _copy(self, dst: int, src: int, n: int) -> None:
        """Indices 0 .. n of slot src into slot dst, every layer."""
        raise NotImplementedError

    def _zero(self, slot: int, lo: int, hi: int) -> None:
        """Make indices lo .. hi of a slot finite (zeros), every layer."""
        raise NotImplementedError


def rope_rotation(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [rows, head_dim / 2] float32 of interleaved RoPE at absolute ``positions``.

    Pair i of a head turns by ``pos * f_i``, ``f_i = theta ** (-2i / head_dim)`` rounded to float32
    (as the reference computes it). The angle is formed in float64 and reduced modulo 2 pi before
    it is rounded, so its error does not grow with the position: positions in the millions (hours
    of audio) rotate as exactly as position 0, where float32 angles drift by ~0.06 rad at 10 hours.
    """
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    angle = np.mod(np.asarray(positions, np.float64)[:, None] * inv_freq.astype(np.float64)[None, :], 2 * math.pi)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
