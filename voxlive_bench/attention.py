"""``python -m voxlive_bench.attention``: one decoder layer's attention over a filled window.

Full-size shapes (32 query heads, 8 KV heads, head dim 128, window 8192): for 1 and several
streams, the KV pool's attention call (bf16 and int8 K/V) against ``scaled_dot_product_attention``
over the same keys (what a per-stream ring cache ran before the pool). Reported: ms per call and
the K/V bytes read per second; and, as the memory's speed at that moment on a shared machine, the
bf16 weight kernel reading one stream's K/V bytes of weights, measured interleaved with the rest.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from voxlive.backends.torch import cpu_kernels
from voxlive.backends.torch.pool import KVPool

from .bench import best_seconds


def memory_speed(nbytes: int, repeats: int) -> dict | None:
    """The bf16 decode kernel over a matrix of ``nbytes``: how fast the weights stream right now."""
    if not cpu_kernels.bf16_available():
        return None
    w = torch.randn(nbytes // 2 // 3072, 3072).bfloat16()
    x = torch.randn(1, 3072).bfloat16()
    seconds = best_seconds(lambda: cpu_kernels.linear_bf16(x, w), repeats)
    return {"attention": "weights (bf16)", "streams": 1, "keys": 0, "ms": 1000 * seconds,
            "gb_per_s": w.numel() * 2 / seconds / 1e9}


def measure(streams: int, fill: int, *, heads=32, kv_heads=8, d=128, window=8192, repeats=5) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    reference = memory_speed(2 * 2 * kv_heads * window * d, repeats)
    if reference:
        rows.append(reference)
    for kv_int8 in (False, True):
        pool = KVPool(1, kv_heads, window, d, extra=8, dtype=dtype, device=torch.device("cpu"), kv_int8=kv_int8,
                      slots=streams)
        slots = [pool.acquire() for _ in range(streams)]
        for s in slots:  # a filled window: the slot's indices written (random keys and values)
            pool._zero(s, 0, pool.capacity)
            pool._ready[s] = pool.capacity
            pool._length[s] = 10 * window if fill >= window else fill - 1  # past the window: a full ring
        for buf in pool.arrays():
            buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype) if buf.dtype != torch.int8
                      else torch.randint(-127, 128, buf.shape, generator=g, dtype=torch.int8))
        q = torch.randn(streams, heads, d, generator=g).to(dtype)
        k, v = (torch.randn(streams, kv_heads, d, generator=g).to(dtype) for _ in range(2))
        step = pool.begin(slots, [1] * streams)
        seconds = best_seconds(lambda: pool.attend(0, step, q, k, v), repeats)
        kv_bytes = sum(b[0, :streams, :, :step.plan.keys].numel() * b.element_size() for b in pool.arrays())
        rows.append({"attention": "pool int8" if kv_int8 else "pool bf16", "streams": streams, "keys": step.plan.keys,
                     "ms": 1000 * seconds, "gb_per_s": kv_bytes / seconds / 1e9})
    keys = torch.randn(streams, kv_heads, fill, d, generator=g).to(dtype)
    values = torch.randn(streams, kv_heads, fill, d, generator=g).to(dtype)
    qs = torch.randn(streams, heads, 1, d, generator=g).to(dtype)

    def sdpa():  # one call per stream, as the per-stream caches ran it
        for b in range(streams):
            F.scaled_dot_product_attention(qs[b:b + 1], keys[b:b + 1], values[b:b + 1], enable_gqa=True)

    seconds = best_seconds(sdpa, repeats)
    rows.append({"attention": "sdpa per stream", "streams": streams, "keys": fill, "ms": 1000 * seconds,
                 "gb_per_s": 2 * keys.numel() * 2 / seconds / 1e9})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m voxlive_bench.attention")
    p.add_argument("--streams", default="1,4,16")
    p.add_argument("--fill", type=int, default=8192, help="keys in each stream's window (8192: a stream past it)")
    a = p.parse_args()
    print(f"one decoder layer's attention, one query per stream, {a.fill} keys, bf16 activations, "
          f"{torch.get_num_threads()} threads")
    print("attention        streams   keys   ms/call   K/V GB/s")
    for n in (int(x) for x in a.streams.split(",")):
        for r in measure(n, a.fill):
            print(f"{r['attention']:15s}  {r['streams']:7d}  {r['keys'] or '':>5}  {r['ms']:8.2f}  {r['gb_per_s']:9.2f}")


if __name__ == "__main__":
    main()
