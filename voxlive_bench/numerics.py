"""CPU numerics measured in one process: what batch invariance costs and what k-row passes cost.

    python -m voxlive_bench.numerics encoder [LAYERS ROUNDS SECONDS]   # full-size encoder layers
    python -m voxlive_bench.numerics rows [NxK]                        # one matrix, k = 1..16 rows
    python -m voxlive_bench.numerics attention H KVH D WINDOW n:fill...

``encoder``: LAYERS of the full-size encoder's 32 (random bf16 weights), the paths that
``VOXLIVE_BATCH_INVARIANT=0`` keeps (oneDNN GEMM, the pool's batched attention, conv1d) against the
batch-invariant ones (AMX GEMM, voxlive's attention kernel, the stem as products), alternated, in
ms per audio second scaled to 32 layers. ``rows``: a pass over one matrix for k rows in bf16, int8
and int4, voxlive's kernels against PyTorch's. ``attention``: the pool's attention, the vector
kernel and (with AMX) the tile kernel against batched matmuls. NT=1 (default) measures one
thread's CPU time, which a machine shared with other work disturbs least; NT=2 wall time on two
threads.
"""

import os
import sys


def encoder(argv):
    sys.argv = ["encoder", *argv]
    import time, statistics, torch, torch.nn.functional as F
    from voxlive.config import parse_config
    from voxlive.testing import make_params
    from voxlive.backends.torch import encoder as E
    from voxlive.backends.torch.quant import Bf16Weight

    N_LAYERS = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(int(os.environ.get("NT", "1")))
    audio = {"sampling_rate": 16000, "frame_rate": 12.5, "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
             "transcription_delay_ms": 480, "streaming_look_ahead_ms": 2.5, "streaming_look_back_ms": 52.5, "streaming_n_left_pad_tokens": 32, "transcription_format": "streaming"}
    cfg = parse_config(make_params("full"), audio)
    c = cfg.encoder
    g = torch.Generator().manual_seed(0)
    def rnd(*shape, s=0.02): return (torch.randn(*shape, generator=g) * s).bfloat16()
    plain_layers, amx_layers = [], []
    for i in range(N_LAYERS):
        qkv = 3 * c.n_heads * c.head_dim
        t = dict(attention_norm=torch.ones(c.dim).bfloat16(), wqkv=rnd(qkv, c.dim), bqkv=rnd(qkv), wo=rnd(c.dim, c.n_heads * c.head_dim),
                 bo=rnd(c.dim), ffn_norm=torch.ones(c.dim).bfloat16(), w13=rnd(2 * c.hidden_dim, c.dim), w2=rnd(c.dim, c.hidden_dim), b2=rnd(c.dim))
        plain_layers.append(E.EncoderLayer(**t))
        amx_layers.append(E.EncoderLayer(**{k: Bf16Weight.wrap(v)  if k in ("wqkv", "wo", "w13", "w2") else v for k, v in t.items()}))
    conv_w = [rnd(c.dim, c.n_mels, 3, s=0.1), rnd(c.dim, c.dim, 3)]
    conv_b = [rnd(c.dim), rnd(c.dim)]
    dev = torch.device("cpu")
    old = E.Encoder(cfg, list(zip(conv_w, conv_b)), plain_layers, torch.ones(c.dim).bfloat16(), dev)
    new = E.Encoder(cfg, [(Bf16Weight.wrap(w.flatten(1)), b) for w, b in zip(conv_w, conv_b)], amx_layers, torch.ones(c.dim).bfloat16(), dev)

    def old_stem(self, mel, state):
        (w1, b1), (w2, b2) = self.conv
        x = torch.cat((state.mel_tail, mel), dim=1)
        state.mel_tail = x[:, -2:].clone()
        x = F.gelu(F.conv1d(x[None], w1, b1))[0]
        x = torch.cat((state.conv1_tail, x), dim=1)
        state.conv1_tail = x[:, -1:].clone()
        return F.gelu(F.conv1d(x[None], w2, b2, stride=2))[0].transpose(0, 1)

    from voxlive.backends.torch import cpu_kernels as ck
    clock = time.process_time if os.environ.get("NT", "1") == "1" else time.perf_counter
    def run(enc, is_old, mel, chunk_frames):
        ck._batch_invariant = not is_old
        state = enc.new_conv_state(torch.bfloat16, dev)
        pool = enc.new_pool(torch.bfloat16, dev, kv_int8=False)
        slot = pool.acquire()
        t = clock()
        with torch.inference_mode():
            for s in range(0, mel.shape[1], chunk_frames):
                x = old_stem(enc, mel[:, s:s + chunk_frames], state) if is_old else enc.stem(mel[:, s:s + chunk_frames], state)
                step = pool.begin([slot], [x.shape[0]])
                enc.transformer(x, pool, step)
                pool.commit(step.plan)
        return clock() - t

    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 6.0
    mel = torch.randn(128, int(seconds * 100) // 8 * 8, generator=g).bfloat16()
    for label, chunk in [("offline, 744-frame chunks (7.44 s)", 744), ("live, 48-frame chunks (480 ms)", 48)]:
        times = {True: [], False: []}
        for r in range(ROUNDS):
            for is_old in (True, False):
                times[is_old].append(run(old if is_old else new, is_old, mel, chunk))
        o, n = statistics.median(times[True]), statistics.median(times[False])
        scale = 32 / N_LAYERS
        print(f"{label}: old {o / seconds * 1e3 * scale:.0f} ms per audio s, invariant {n / seconds * 1e3 * scale:.0f} (x{n / o:.2f}); "
              f"rounds old {[round(t, 2) for t in times[True]]} new {[round(t, 2) for t in times[False]]}", flush=True)


def rows(argv):
    sys.argv = ["rows", *argv]
    import time, statistics, torch, torch.nn.functional as F
    from voxlive.backends.torch import cpu_kernels as ck
    from voxlive.backends.torch.quant import quantize
    nt = int(os.environ.get("NT", "1")); torch.set_num_threads(nt)
    clock = time.process_time if nt == 1 else time.perf_counter
    assert ck.available()
    N, K = (int(a) for a in (sys.argv[1] if len(sys.argv) > 1 else "18432x3072").split("x"))
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(N, K, generator=g) * 0.02)
    wb = w.bfloat16()
    tiles = ck.bf16_tiles(wb)
    p8, p4 = quantize(w, "int8"), quantize(w, "int4")
    s8 = p8["scale"].bfloat16()
    vals = torch.stack((p4["q"] >> 4, p4["q"] & 15), dim=-1).view(N, K).to(torch.int32)
    a4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals, 1)
    sz = torch.stack((p4["scale"], p4["zero"]), dim=-1).transpose(0, 1).contiguous().bfloat16()
    del w
    impls = {
        "bf16 F.linear": lambda x: F.linear(x, wb),
        "bf16 gemv kernel": lambda x: ck.linear_bf16(x, wb),
        "bf16 AMX": lambda x: ck.linear_bf16_amx(x, tiles),
        "int8 aten": lambda x: torch.ops.aten._weight_int8pack_mm(x, p8["q"], s8),
        "int8 kernel": lambda x: ck.linear_int8(x, p8["q"], s8),
        "int4 aten": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, a4, 64, sz),
        "int4 kernel": lambda x: ck.linear_int4(x, p4["q"], p4["scale"], p4["zero"]),
    }
    rows = [1, 2, 4, 8, 16]
    res = {name: {m: [] for m in rows} for name in impls}
    xs = {m: torch.randn(m, K, generator=g).bfloat16() for m in rows}
    for r in range(int(os.environ.get("ROUNDS", "5"))):
        for m in rows:
            for name, f in impls.items():
                f(xs[m])
                t = clock(); f(xs[m]); res[name][m].append(clock() - t)
    print(f"{N}x{K}, {nt} thread(s), ms per pass (median of rounds), k rows:", rows)
    for name in impls:
        print(f"{name:18s}", " ".join(f"{statistics.median(res[name][m]) * 1e3:7.2f}" for m in rows), flush=True)


def attention(argv):
    sys.argv = ["attention", *argv]
    import time, statistics, torch
    from voxlive.backends.torch import cpu_kernels as ck
    from voxlive.backends.torch.pool import KVPool
    torch.set_num_threads(1)
    assert ck.available()
    H, KVH, D, W = (int(a) for a in sys.argv[1:5])
    g = torch.Generator().manual_seed(0)
    for spec in sys.argv[5:]:
        n, fill = (int(a) for a in spec.split(":"))
        pool = KVPool(1, KVH, W, D, dtype=torch.bfloat16, device=torch.device("cpu"), extra=8, amx=True)
        paths = {"vector kernel": (True, False), "pool matmuls": (False, False)}
        if pool.amx:
            paths["AMX kernel"] = (True, True)
        slot = pool.acquire()
        pool.k.normal_(); pool.v.normal_()
        pool._length[slot] = fill; pool._ready[slot] = pool.capacity
        q = torch.randn(n, H, D, generator=g).bfloat16(); k = torch.randn(n, KVH, D, generator=g).bfloat16(); v = k.clone()
        res = {name: [] for name in paths}
        for r in range(7):
            for name, (inv, amx) in paths.items():
                ck._batch_invariant, pool.amx = inv, amx
                step = pool.begin([slot], [n])
                t = time.process_time(); pool.attend(0, step, q, k, v); res[name].append(time.process_time() - t)
        ms = {name: 1e3 * statistics.median(t) for name, t in res.items()}
        print(f"heads {H}/{KVH} d {D} window {W}: {n} queries after {fill} keys: "
              + ", ".join(f"{name} {t:.2f} ms" for name, t in ms.items())
              + f"; vector kernel / AMX kernel {ms['vector kernel'] / ms['AMX kernel']:.2f}" * pool.amx, flush=True)

if __name__ == "__main__":
    {"encoder": encoder, "rows": rows, "attention": attention}[sys.argv[1]](sys.argv[2:])
