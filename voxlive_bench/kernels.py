"""``python -m voxlive_bench.kernels``: what a pass of k activation rows through the decoder's matrices
costs, per weight format and kernel, against the pass's memory floor.

Random matrices of the full-size decoder's shapes (wq|wk|wv 6144 x 3072, wo 3072 x 4096, w1|w3
18432 x 3072, w2 3072 x 9216) for ``--layers`` layers (4: 931 MB in bf16), in bf16, int8 and int4 as
voxlive stores them; each pass multiplies every matrix by k rows, as a decode step of k positions does.
Kernels: "rows" are the VNNI / BF16 kernels that take a few rows per pass over a weight row (what int8
and int4 weights took before the AMX kernels, and still take without AMX), "AMX" the AMX path (tile
kernels; int4's passes of up to 4 rows take vector products of the same tile order there).
Everything is measured in one process, alternated round by round (the machine may be shared), and
reported as the median over rounds: with ``--threads 1`` (the default) in one thread's CPU time, which
other work on a shared machine disturbs least, else in wall time. The memory floor is the pass's
weight bytes (as stored, with scales) over the read bandwidth of a plain 1 GB read on as many threads,
measured in the same rounds: no pass can beat it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from voxlive.backends.torch import cpu_kernels
from voxlive.backends.torch.quant import quantize
from voxlive.testing import FULL

# the full-size decoder's matrices [outputs, inputs], from the random full-size checkpoint's sizes
_DIM, _HIDDEN = FULL["dim"], FULL["hidden_dim"]
_Q, _KV = FULL["n_heads"] * FULL["head_dim"], FULL["n_kv_heads"] * FULL["head_dim"]
SHAPES = [(_Q + 2 * _KV, _DIM), (_DIM, _Q), (2 * _HIDDEN, _DIM), (_DIM, _HIDDEN)]
ROWS = (1, 2, 3, 4, 5, 8, 9, 12, 16)  # powers of two and between (a pass of the default 8 drafts is 9 rows)


def matrices(layers: int, seed: int = 0) -> dict[str, list]:
    """Each kernel's operands for every matrix of ``layers`` layers: {kernel: [(call, input size, bytes)]}."""
    g = torch.Generator().manual_seed(seed)
    ops: dict[str, list] = {}

    def add(name, call, k, nbytes):
        ops.setdefault(name, []).append((call, k, nbytes))

    amx, rows_bf16 = cpu_kernels.amx_available(), cpu_kernels.bf16_available()
    for _ in range(layers):
        for n, k in SHAPES:
            w = torch.randn(n, k, generator=g, dtype=torch.bfloat16) * 0.02
            if amx:
                tiles = cpu_kernels.bf16_tiles(w)
                add("bf16 AMX", lambda x, t=tiles: cpu_kernels.linear_bf16_amx(x, t), k, w.nbytes)
            elif rows_bf16:
                add("bf16 rows", lambda x, w=w: cpu_kernels.linear_bf16(x, w), k, w.nbytes)
            p8 = quantize(w, "int8")
            nbytes8 = p8["q"].nbytes + p8["scale"].nbytes
            add("int8 rows", lambda x, q=p8["q"], s=p8["scale"]: cpu_kernels.linear_int8(x, q, s), k, nbytes8)
            if amx:
                t8 = cpu_kernels.int8_tiles(p8["q"])
                add("int8 AMX", lambda x, t=t8, s=p8["scale"]: cpu_kernels.linear_int8_amx(x, t, s), k, nbytes8)
            p4 = quantize(w, "int4")
            nbytes4 = sum(t.nbytes for t in p4.values())
            add("int4 rows", lambda x, p=p4: cpu_kernels.linear_int4(x, p["q"], p["scale"], p["zero"]), k, nbytes4)
            if amx:
                t4, sz = cpu_kernels.int4_tiles(p4["q"], p4["scale"], p4["zero"])
                add("int4 AMX", lambda x, t=t4, s=sz: cpu_kernels.linear_int4_amx(x, t, s), k, nbytes4)
            del w
    return ops


def measure(layers: int, rounds: int) -> tuple[dict, dict, list[float]]:
    """ms per pass {kernel: {k: [per round]}}, bytes per kernel, and the read bandwidth per round (GB/s)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    ops = matrices(layers)
    inputs = {k: {m: torch.randn(m, k, dtype=torch.bfloat16) for m in ROWS} for k in {k for _, k in SHAPES}}
    plain = torch.ones(2**28, dtype=torch.float32)
    times = {name: {m: [] for m in ROWS} for name in ops}
    bandwidth = []

    def one_pass(calls, m):
        t = clock()
        for call, k, _ in calls:
            call(inputs[k][m])
        return clock() - t

    with torch.inference_mode():
        for calls in ops.values():  # warm-up: every kernel and row count once
            for m in ROWS:
                one_pass(calls, m)
        for _ in range(rounds):
            t = clock()
            plain.sum()
            bandwidth.append(plain.nbytes / (clock() - t) / 1e9)
            for m in ROWS:
                for name, calls in ops.items():
                    times[name][m].append(1000 * one_pass(calls, m))
    nbytes = {name: sum(b for *_, b in calls) for name, calls in ops.items()}
    return times, nbytes, bandwidth


def report(times: dict, nbytes: dict, bandwidth: list[float], layers: int, rounds: int) -> str:
    gbps = statistics.median(bandwidth)
    threads = torch.get_num_threads()
    what = "one thread's CPU time" if threads == 1 else f"wall time on {threads} threads"
    lines = [f"{layers} decoder layers' matrices, {what}, median of {rounds} rounds; "
             f"plain read {gbps:.1f} GB/s (rounds {min(bandwidth):.1f}-{max(bandwidth):.1f})", "",
             "| ms per pass, k rows | " + " | ".join(str(m) for m in ROWS) + " | k = 16 / k = 1 | floor |",
             "|---|" + "---|" * (len(ROWS) + 2)]
    for name, per_rows in times.items():
        ms = [statistics.median(per_rows[m]) for m in ROWS]
        floor = nbytes[name] / gbps / 1e6
        lines.append(f"| {name} ({nbytes[name] / 1e6:.0f} MB) | " + " | ".join(f"{t:.1f}" for t in ms)
                     + f" | {ms[-1] / ms[0]:.2f}x | {floor:.1f} |")
    lines += ["", "k = 1 pass over its floor: " + ", ".join(
        f"{name} {statistics.median(t[1]) / (nbytes[name] / gbps / 1e6):.2f}x" for name, t in times.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m voxlive_bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers' matrices (4: 931 MB in bf16)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="1: CPU time of one thread; more: wall time")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        raise SystemExit(f"voxlive's CPU kernels are unavailable: {cpu_kernels.unavailable_reason()}")
    times, nbytes, bandwidth = measure(args.layers, args.rounds)
    print(report(times, nbytes, bandwidth, args.layers, args.rounds))


if __name__ == "__main__":
    main()
