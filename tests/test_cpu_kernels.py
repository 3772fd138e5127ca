"""voxlive's CPU kernels (``cpu_kernels.cpp``) against float64 products of the same weights, their
batch invariance and errors, and the fallback to PyTorch's kernels where they are unavailable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import voxlive
from voxlive.backends.torch import cpu_kernels
from voxlive.backends.torch.quant import QUANTIZED, Bf16Weight, linear, quantize
from voxlive_bench.reference import offline_padded_audio

from test_quant import dequantized

needs_kernels = pytest.mark.skipif(not cpu_kernels.bf16_available(),
                                   reason=f"kernels unavailable ({cpu_kernels.unavailable_reason() or 'no AVX-512 BF16'})")
needs_amx = pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX")


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Rows with a wide range: one large outlier per row, some tiny values, one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, k, generator=g) ** 4
    x[:, 5] = 40.0
    if m > 2:
        x[2] = 0
    return x


def check_quantized(x: torch.Tensor, w: torch.Tensor, got: torch.Tensor) -> None:
    """Within the error bound of int16 activations (half a step of max|x_row| / 16383 per element,
    times |w|) plus float32 rounding."""
    x64, w64 = x.double(), w.double()
    expected = x64 @ w64.T
    step = x64.abs().amax(1, keepdim=True) / 16383
    bound = 0.5 * step * w64.abs().sum(1)[None] + 1e-6 * (x64.abs() @ w64.abs().T) + 1e-30
    assert ((got.double() - expected).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("k", [96, 192, 3072])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_kernels_against_float64(scheme, k):
    if scheme == "int4" and k % 64:
        pytest.skip("the int4 kernel takes groups of 64")
    g = torch.Generator().manual_seed(k)
    parts = quantize(torch.randn(50, k, generator=g) * 0.05, scheme)
    weight = QUANTIZED[scheme].from_stored(parts, torch.float32, torch.device("cpu"))
    assert weight.path == "voxlive"
    x = activations(9, k, seed=k)  # 9 rows: passes of 4, 4 and 1
    got = linear(x, weight)
    check_quantized(x, dequantized(parts, scheme), got)
    assert (got[2] == 0).all()  # an all-zero row gives zeros, not NaN
    for m in range(9):  # each row alone gives bit for bit what it gives in the batch
        assert torch.equal(linear(x[m:m + 1], weight)[0], got[m])
    # bfloat16 and float16 models: the float32 result of the same values, rounded once
    for dtype in (torch.bfloat16, torch.float16):
        weight16 = QUANTIZED[scheme].from_stored(parts, dtype, torch.device("cpu"))
        x16 = x.to(dtype)
        assert torch.equal(linear(x16, weight16), linear(x16.float(), weight).to(dtype))


@needs_kernels
@pytest.mark.parametrize("k", [96, 3072])
def test_bf16_kernel_against_float64(k):
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(50, k, generator=g) * 0.05).bfloat16()
    x = activations(9, k, seed=k).bfloat16()
    weight = Bf16Weight.wrap(w)
    assert isinstance(weight, Bf16Weight)
    got = linear(x, weight)
    expected = x.double() @ w.double().T
    # float32 sums of exact bf16 products, then one rounding to bfloat16
    bound = 2 ** -8 * expected.abs() + 1e-6 * (x.double().abs() @ w.double().abs().T) + 1e-30
    assert ((got.double() - expected).abs() <= bound).all()
    for m in range(9):
        assert torch.equal(linear(x[m:m + 1], weight)[0], got[m])
    if weight.amx:  # every row count goes through the AMX GEMM (test_amx_gemm_rows_do_not_depend_on_each_other)
        assert torch.equal(weight.rows(torch.tensor([3, 0, 49])), w[[3, 0, 49]])  # lookups from the tile order
    else:  # more rows than the kernel takes go through the stock GEMM
        many = activations(weight.max_rows + 1, k, seed=1).bfloat16()
        assert torch.equal(linear(many, weight), torch.nn.functional.linear(many, w))


needs_amx = pytest.mark.skipif(not cpu_kernels.amx_available(), reason="no AMX here (or the kernels are unavailable)")


@pytest.fixture
def batch_invariant(monkeypatch):
    """As by default (VOXLIVE_BATCH_INVARIANT unset or 1), whatever the environment of the test run."""
    monkeypatch.setattr(cpu_kernels, "_batch_invariant", True)


@needs_amx
def test_batch_invariance_can_be_switched_off(monkeypatch):
    """VOXLIVE_BATCH_INVARIANT=0: the encoder's matrices stay with oneDNN and attention with the pool's
    batched matmuls; the decoder's bf16 matrices take the AMX GEMM either way."""
    from voxlive.backends.torch.pool import KVPool

    pool = KVPool(1, 2, 8, 16, dtype=torch.bfloat16, device=torch.device("cpu"))
    q = torch.zeros(3, 4, 16, dtype=torch.bfloat16)
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(cpu_kernels, "_batch_invariant", True)
    assert Bf16Weight.wrap(w, many_rows=True).amx and pool.kernel_attends(q)
    monkeypatch.setattr(cpu_kernels, "_batch_invariant", False)
    assert Bf16Weight.wrap(w, many_rows=True) is w
    assert Bf16Weight.wrap(w).amx
    assert not pool.kernel_attends(q)


@needs_amx
@pytest.mark.parametrize("k,n", [(96, 48), (1280, 272)])
def test_amx_gemm_against_float64_with_bias(k, n, batch_invariant):
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(n, k, generator=g) * 0.05).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    x = activations(70, k, seed=k).bfloat16()  # 70 rows: blocks of 16 and pairs of blocks, with tails
    weight = Bf16Weight.wrap(w, many_rows=True)
    assert weight.amx
    got = linear(x, weight, bias)
    expected = x.double() @ w.double().T + bias.double()
    # float32 sums of exact bf16 products, the bias added in float32, one rounding to bfloat16
    magnitude = x.double().abs() @ w.double().abs().T + bias.double().abs()
    assert ((got.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-6 * magnitude + 1e-30).all()
    assert (got[2] == bias).all()  # the all-zero row


@needs_amx
def test_amx_gemm_rows_do_not_depend_on_each_other():
    """A row's result is bit for bit the same in a call of any size and at any place in it: what makes
    chunked streams equal offline ones in bfloat16 (oneDNN's GEMM blocks the sums by the call's rows)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(512, 3072, generator=g) * 0.05).bfloat16()
    weight = Bf16Weight.wrap(w)
    x = activations(100, 3072, seed=3).bfloat16()
    whole = linear(x, weight)
    for start, stop in [(0, 1), (0, 3), (0, 17), (5, 9), (31, 64), (60, 100), (99, 100)]:
        assert torch.equal(linear(x[start:stop], weight), whole[start:stop])
    assert not all(torch.equal(torch.nn.functional.linear(x[:m], w), torch.nn.functional.linear(x, w)[:m])
                   for m in (1, 3, 17, 33)), "the stock GEMM is row-invariant here after all: this test shows nothing"


@needs_amx
def test_amx_gemm_rejects_bad_shapes(batch_invariant):
    tiles = cpu_kernels.bf16_tiles(torch.zeros(32, 64, dtype=torch.bfloat16))
    assert tiles.shape == (2, 2, 16, 32)
    with pytest.raises(RuntimeError, match="inputs"):
        cpu_kernels.linear_bf16_amx(torch.zeros(1, 96, dtype=torch.bfloat16), tiles)
    with pytest.raises(RuntimeError, match="bfloat16 x"):
        cpu_kernels.linear_bf16_amx(torch.zeros(1, 64), tiles)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernels.bf16_tiles(torch.zeros(24, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="one bias per output"):
        cpu_kernels.linear_bf16_amx(torch.zeros(1, 64, dtype=torch.bfloat16), tiles, torch.zeros(31, dtype=torch.bfloat16))
    # a matrix of another shape stays with the stock GEMM
    odd = torch.zeros(24, 64, dtype=torch.bfloat16)
    assert Bf16Weight.wrap(odd, many_rows=True) is odd


def amx_weight(scheme: str, n: int, k: int, dtype=torch.float32, seed: int = 0):
    """A random matrix's stored form and the weight the dispatch makes of it, which must be the AMX kernel's."""
    g = torch.Generator().manual_seed(seed)
    parts = quantize(torch.randn(n, k, generator=g) * 0.05, scheme)
    weight = QUANTIZED[scheme].from_stored(parts, dtype, torch.device("cpu"))
    assert weight.path == "amx"
    return parts, weight


def exact_int8_product(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the int8 kernels compute, written out: x quantized per row to int16 (as ``quantize_rows``),
    the integer dot products with the weight (exact in float64), rounded once to float32, then times the
    weight's scale and the row's scale."""
    xf = x.float()
    scale = xf.abs().amax(1).clamp_min(1e-30) / 16383
    xq = (xf / scale[:, None]).round()
    dots = (xq.double() @ parts["q"].double().T).float()
    return (dots * parts["scale"].float() * scale[:, None]).to(x.dtype)


@needs_amx
@pytest.mark.parametrize("n,k", [(16, 64), (48, 192), (272, 3072), (32, 9216)])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_amx_int_kernels_against_float64_at_every_row_count(scheme, n, k):
    """The AMX int8 and int4 kernels at 1..16 rows and at 37 (three blocks of rows): within the int16
    activations' error bound of a float64 product (int8: exactly the integer products, rounded once);
    every row bit for bit what it gives in any other call, alone or among others."""
    parts, weight = amx_weight(scheme, n, k, seed=k + n)
    x = activations(37, k, seed=n) * torch.logspace(-3, 3, 37)[:, None]  # rows of their own scales
    whole = linear(x, weight)
    check_quantized(x, dequantized(parts, scheme), whole)
    if scheme == "int8":
        assert torch.equal(whole, exact_int8_product(x, parts))
    assert (whole[2] == 0).all()
    for m in range(1, 17):
        assert torch.equal(linear(x[:m], weight), whole[:m])
    for start, stop in [(5, 9), (14, 31), (20, 37), (36, 37)]:
        assert torch.equal(linear(x[start:stop], weight), whole[start:stop])


@needs_amx
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_amx_int_kernels_agree_with_the_row_kernels(scheme):
    """The AMX kernels compute what the VNNI row kernels (CPUs without AMX) compute: int8 the same
    integer sums (equal wherever the row kernel's float32 sum of its lanes is exact), int4 the same groups'
    integer sums scaled in another order (within float32 rounding of the outputs' magnitudes)."""
    parts, weight = amx_weight(scheme, 48, 3072)
    # rows quantized to themselves (scale 1), whose integer sums stay below 2^24: the row kernel's float32
    # sums of its int32 lanes are exact too
    x = torch.randint(-3, 4, (9, 3072), generator=torch.Generator().manual_seed(4)).float()
    x[:, 0] = 16383
    if scheme == "int8":
        assert (x.abs() @ parts["q"].float().abs().T).max() < 2**24
        rows = cpu_kernels.linear_int8(x, parts["q"], parts["scale"])
        assert torch.equal(linear(x, weight), rows)
    else:
        rows = cpu_kernels.linear_int4(x, parts["q"], parts["scale"], parts["zero"])
        # both sum w = q * scale + (zero - 8 scale) over the groups, two float32 roundings a group at most
        q = parts["q"]
        values = torch.stack((q >> 4, q & 15), dim=-1).reshape(q.shape[0], -1).double()
        scale, zero = (parts[p].double().repeat_interleave(64, dim=1) for p in ("scale", "zero"))
        magnitude = x.double().abs() @ (values * scale + (zero - 8 * scale).abs()).T
        groups = 3072 // 64
        assert ((linear(x, weight).double() - rows.double()).abs() <= 2 * 2 * groups * 2**-24 * magnitude).all()


@needs_amx
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_amx_int_kernels_in_bfloat16_and_float16_models(scheme):
    """The float32 result of the same values, rounded once, as for the row kernels."""
    parts, weight = amx_weight(scheme, 48, 192)
    x = activations(5, 192, seed=5)
    for dtype in (torch.bfloat16, torch.float16):
        _, weight16 = amx_weight(scheme, 48, 192, dtype=dtype)
        x16 = x.to(dtype)
        assert torch.equal(linear(x16, weight16), linear(x16.float(), weight).to(dtype))


@needs_amx
def test_amx_dispatch_and_int8_lookups_from_the_tile_order():
    """Matrices the AMX kernels take (outputs a multiple of 16, inputs of 64) go to them; others to the row
    kernels. The int8 embedding's rows are looked up from the tile order."""
    g = torch.Generator().manual_seed(6)
    for scheme in ("int8", "int4"):
        for n, k, path in [(48, 192, "amx"), (50, 192, "voxlive"), (48, 128, "amx")]:
            weight = QUANTIZED[scheme].from_stored(quantize(torch.randn(n, k, generator=g), scheme), torch.float32,
                                                   torch.device("cpu"))
            assert weight.path == path, (scheme, n, k)
    weight = QUANTIZED["int8"].from_stored(quantize(torch.randn(32, 96, generator=g), "int8"), torch.float32,
                                           torch.device("cpu"))
    assert weight.path == "voxlive"  # 96 inputs: a multiple of 32, not of 64
    parts, weight = amx_weight("int8", 48, 192)
    ids = torch.tensor([[3, 0], [47, 16]])
    assert torch.equal(weight.rows(ids), dequantized(parts, "int8")[ids])


@needs_amx
def test_amx_int_kernels_reject_bad_shapes():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernels.int8_tiles(torch.zeros(24, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cpu_kernels.int4_tiles(torch.zeros(24, 32, dtype=torch.uint8), torch.ones(24, 1, dtype=torch.bfloat16),
                               torch.ones(24, 1, dtype=torch.bfloat16))
    tiles = cpu_kernels.int8_tiles(torch.zeros(16, 128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="inputs"):
        cpu_kernels.linear_int8_amx(torch.zeros(1, 64), tiles, torch.ones(16))
    with pytest.raises(RuntimeError, match="one scale per output"):
        cpu_kernels.linear_int8_amx(torch.zeros(1, 128), tiles, torch.ones(15))
    t4, sz = cpu_kernels.int4_tiles(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2, dtype=torch.bfloat16),
                                    torch.ones(16, 2, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="inputs"):
        cpu_kernels.linear_int4_amx(torch.zeros(1, 64), t4, sz)
    with pytest.raises(RuntimeError, match="scales in tile order"):
        cpu_kernels.linear_int4_amx(torch.zeros(1, 128), t4, sz.float())


@needs_kernels
def test_kernels_reject_bad_shapes_and_types():
    q = torch.zeros(8, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="inputs"):
        cpu_kernels.linear_int8(torch.zeros(1, 32), q, torch.ones(8))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_kernels.linear_int8(torch.zeros(1, 40), torch.zeros(8, 40, dtype=torch.int8), torch.ones(8))
    with pytest.raises(RuntimeError, match="one scale per output"):
        cpu_kernels.linear_int8(torch.zeros(1, 64), q, torch.ones(7))
    with pytest.raises(RuntimeError, match="int8 weight"):
        cpu_kernels.linear_int8(torch.zeros(1, 64), q.float(), torch.ones(8))
    with pytest.raises(RuntimeError, match="groups of 64"):
        cpu_kernels.linear_int4(torch.zeros(1, 128), torch.zeros(8, 64, dtype=torch.uint8),
                                torch.ones(8, 4, dtype=torch.bfloat16), torch.ones(8, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16 x and weight"):
        cpu_kernels.linear_bf16(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.bfloat16))


def switch_kernels_off(monkeypatch) -> None:
    """As on a machine where the kernels cannot be built or run."""
    monkeypatch.setattr(cpu_kernels, "_tried", True)
    monkeypatch.setattr(cpu_kernels, "_reason", "switched off by the test")


@pytest.fixture
def kernels_off(monkeypatch):
    switch_kernels_off(monkeypatch)


def test_without_kernels_pytorch_kernels_do_the_work(kernels_off):
    assert not cpu_kernels.available() and cpu_kernels.unavailable_reason() == "switched off by the test"
    parts = quantize(torch.randn(16, 128), "int8")
    assert QUANTIZED["int8"].from_stored(parts, torch.bfloat16, torch.device("cpu")).path == "aten"
    assert QUANTIZED["int4"].from_stored(quantize(torch.randn(16, 128), "int4"), torch.bfloat16,
                                         torch.device("cpu")).path == "aten"
    w = torch.randn(16, 128).bfloat16()
    assert Bf16Weight.wrap(w) is w


@needs_kernels
def test_without_bf16_the_int_kernels_still_run(monkeypatch):
    """A CPU with VNNI but not AVX-512 BF16 (Ice Lake, Cascade Lake): int8 and int4 only."""
    monkeypatch.setattr(cpu_kernels, "_bf16", False)
    monkeypatch.setattr(cpu_kernels, "_amx", False)
    w = torch.randn(16, 128).bfloat16()
    assert Bf16Weight.wrap(w) is w
    parts = quantize(torch.randn(16, 128), "int8")
    assert QUANTIZED["int8"].from_stored(parts, torch.bfloat16, torch.device("cpu")).path == "voxlive"


@needs_kernels
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_model_logits_with_and_without_kernels(varied_dir, speech, monkeypatch, mode):
    """A bfloat16 model's teacher-forced logits with voxlive's kernels and with PyTorch's agree."""

    def run():
        model = voxlive.load(varied_dir, dtype="bfloat16", device="cpu", quantize=mode)
        mel = voxlive.log_mel(offline_padded_audio(speech, 6, model.config.audio))
        tokens = model.transcribe(speech).tokens
        ids = model.tokenizer.prompt(32, 6) + tokens[:-1]
        return model, model.logits(ids, model.embed_audio(mel))

    model, with_kernels = run()
    decoder = model.runtime.decoder
    expected = {None: "Bf16Weight", "int8": "Int8Weight", "int4": "Int4Weight"}[mode]
    kernel_path = "amx" if cpu_kernels.amx_available() else "voxlive"
    assert type(decoder.layers[0].w2).__name__ == expected and getattr(decoder.layers[0].w2, "path", kernel_path) == kernel_path
    switch_kernels_off(monkeypatch)
    _, without = run()
    assert with_kernels.shape == without.shape
    scale = np.abs(without).max()
    assert np.abs(with_kernels - without).max() <= 0.05 * scale
    assert (with_kernels.argmax(-1) == without.argmax(-1)).mean() >= 0.9


def test_the_variant_asked_for_is_the_one_loaded():
    wanted = os.environ.get("VOXLIVE_CPU_KERNELS")
    if wanted not in cpu_kernels.VARIANTS:
        pytest.skip("VOXLIVE_CPU_KERNELS names no build")
    assert cpu_kernels.variant() == wanted, cpu_kernels.unavailable_reason()


@needs_kernels
@pytest.mark.skipif(os.environ.get("VOXLIVE_CPU_KERNELS") == "avx2", reason="this is the avx2 run")
def test_avx2_build_passes_the_same_tests():
    """The AVX2 build (for CPUs without AVX-512) on this machine: these tests and the quantization
    tests again, in a process that loads it. Its build directory first gets the lock file that a
    build killed half-way leaves behind, on which PyTorch alone would wait for ever."""
    tests = Path(__file__).parent
    directory = cpu_kernels.build_directory(cpu_kernels.build_name("avx2"))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lock").touch()
    env = {**os.environ, "VOXLIVE_CPU_KERNELS": "avx2"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tests / "test_cpu_kernels.py"), str(tests / "test_quant.py")],
                         env=env, capture_output=True, text=True, cwd=tests.parent, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


def attend_in_chunks(q, k, v, window, chunks, **pool_options):
    """Causal windowed attention of q [T, heads, d], k/v [T, kv_heads, d] through a KV pool's slot, the
    positions fed in the given chunk sizes."""
    from voxlive.backends.torch.pool import KVPool

    pool = KVPool(1, k.shape[1], window, k.shape[2], dtype=k.dtype, device=torch.device("cpu"), **pool_options)
    slot = pool.acquire()
    outs, p = [], 0
    for n in chunks:
        step = pool.begin([slot], [n])
        assert pool.kernel_attends(q) and pool.amx == pool_options.get("amx", False)
        outs.append(pool.attend(0, step, q[p:p + n], k[p:p + n], v[p:p + n]))
        pool.commit(step.plan)
        p += n
    return torch.cat(outs)


@needs_kernels
@pytest.mark.parametrize("dtype,amx,d", [(torch.bfloat16, False, 24), (torch.float32, False, 24),
                                         pytest.param(torch.bfloat16, True, 24, marks=needs_amx),
                                         pytest.param(torch.bfloat16, True, 64, marks=needs_amx)])
def test_attention_kernel_against_float64_and_in_any_chunking(dtype, amx, d, batch_invariant):
    """Each query over exactly its window's keys (GQA, across the ring's wrap), within rounding of float64;
    and bit for bit the same whatever chunks the positions come in (PyTorch's flash attention is not).
    AMX: a head dim of part of a tile (24) and of two whole ones (64)."""
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, window, T = 4, 2, 20, 67
    q, k, v = (3 * torch.randn(T, h, d, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    whole = attend_in_chunks(q, k, v, window, [T], amx=amx)
    pos = torch.arange(T)
    delta = pos[:, None] - pos[None, :]
    allowed = (delta >= 0) & (delta < window)
    kk, vv = (t.double().transpose(0, 1).repeat_interleave(heads // kv_heads, 0) for t in (k, v))
    scores = (q.double().transpose(0, 1) @ kk.transpose(1, 2)) / d ** 0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv  # [heads, T, d]
    expected = expected.transpose(0, 1).reshape(T, -1)
    tolerance = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    assert ((whole.double() - expected).abs() <= tolerance * (expected.abs() + vv.abs().max())).all()
    rng = np.random.default_rng(0)
    cuts = sorted(set(int(c) for c in rng.integers(1, T, 8)))
    for chunks in ([1] * T, [5] * 13 + [2], [b - a for a, b in zip([0] + cuts, cuts + [T])]):
        assert torch.equal(attend_in_chunks(q, k, v, window, chunks, amx=amx), whole)


def windowed_attention_float64(q, k, v, positions, window):
    """Reference: queries q [n, heads, d] at ``positions`` over keys/values [T, kv_heads, d] at 0 .. T."""
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    delta = torch.as_tensor(positions)[:, None] - torch.arange(k.shape[0])[None, :]
    allowed = (delta >= 0) & (delta < window)
    kk, vv = (t.double().transpose(0, 1).repeat_interleave(heads // kv_heads, 0) for t in (k, v))
    scores = (q.double().transpose(0, 1) @ kk.transpose(1, 2)) / d ** 0.5
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vv  # [heads, n, d]
    return out.transpose(0, 1).reshape(len(positions), -1), vv.abs().max()


def dequantized_kv(x):
    from voxlive.backends.torch.pool import _quantize

    q, scale = _quantize(x)
    return q.double() * scale.double()[..., None]


@needs_kernels
@pytest.mark.parametrize("kv,amx", [("bf16", False), ("float32", False), ("int8", False),
                                    pytest.param("bf16", True, marks=needs_amx)])
def test_attention_kernel_one_call_for_a_batch_of_streams_of_mixed_lengths(kv, amx, batch_invariant):
    """One call for streams at different lengths (fresh, partly filled, past the ring's wrap), each feeding
    a different number of positions: every query over exactly its window, within rounding of float64
    (int8: of the keys and values as the pool holds them), and each stream's rows bit for bit what the
    kernel gives for that stream alone."""
    from voxlive.backends.torch.pool import KVPool, _quantize

    dtype = torch.float32 if kv == "float32" else torch.bfloat16
    heads, kv_heads, d, window, extra = 8, 2, 40, 20, 3
    pool = KVPool(1, kv_heads, window, d, extra=extra, dtype=dtype, device=torch.device("cpu"), kv_int8=kv == "int8",
                  amx=amx)
    assert pool.amx == amx
    g = torch.Generator().manual_seed(2)
    history, feed = [57, 5, 23, 0, 40], [1, 3, 4, 5, 2]  # 57 and 40 wrap the ring (capacity 23)
    total = [h + f for h, f in zip(history, feed)]
    q, k, v = ([3 * torch.randn(t, h, d, generator=g).to(dtype) for t in total] for h in (heads, kv_heads, kv_heads))
    slots = [pool.acquire() for _ in history]
    for s, h in zip(slots, history):  # each stream's history, in chunks of up to 7 positions
        for p in range(0, h, 7):
            n = min(7, h - p)
            step = pool.begin([s], [n])
            pool.attend(0, step, q[s][p:p + n], k[s][p:p + n], v[s][p:p + n])
            pool.commit(step.plan)
    new = [torch.cat([t[s][h:] for s, h in zip(slots, history)]) for t in (q, k, v)]
    step = pool.begin(slots, feed)
    assert pool.kernel_attends(new[0])
    if kv == "int8":  # the kernel's own inputs: the new rows quantized, as the pool stores them
        (kq, ks), (vq, vs) = _quantize(new[1]), _quantize(new[2])
        rows, scales = (kq.flatten(1), vq.flatten(1)), (ks, vs, pool.k_scale[0], pool.v_scale[0])
    else:
        rows, scales = (new[1].flatten(1), new[2].flatten(1)), None
    starts = [int(pool.lengths[s]) for s in slots]

    def kernel(streams):
        at = [sum(feed[:b]) for b in streams]
        pick = torch.cat([torch.arange(a, a + feed[b]) for a, b in zip(at, streams)])
        return cpu_kernels.attention(new[0].flatten(1)[pick], *(r[pick] for r in rows), pool.k[0], pool.v[0],
                                     [slots[b] for b in streams], [starts[b] for b in streams],
                                     [feed[b] for b in streams], window, d, pool.capacity,
                                     scales=None if scales is None else (scales[0][pick], scales[1][pick], *scales[2:]),
                                     amx=amx)

    alone = [kernel([b]) for b in range(len(slots))]
    got = pool.attend(0, step, *new)
    assert torch.equal(got, torch.cat(alone))
    tolerance = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    row = 0
    for s, h, f in zip(slots, history, feed):
        kk, vv = (dequantized_kv(t[s]) if kv == "int8" else t[s] for t in (k, v))
        expected, vmax = windowed_attention_float64(q[s][h:], kk, vv, range(h, h + f), window)
        assert ((got[row:row + f].double() - expected).abs() <= tolerance * (expected.abs() + vmax)).all()
        row += f


@needs_kernels
@pytest.mark.parametrize("kv,amx", [("bf16", False), ("float32", False), ("int8", False),
                                    pytest.param("bf16", True, marks=needs_amx)])
def test_attention_kernel_is_the_same_in_any_chunking_when_many_keys_count(kv, amx, batch_invariant):
    """Small scores (a flat softmax: every key's weight counts in the sums), a window of 40 over 150
    positions (across the ring's wrap), bf16, float32 and int8 keys: each chunking gives bit for bit the
    same outputs."""
    dtype = torch.float32 if kv == "float32" else torch.bfloat16
    g = torch.Generator().manual_seed(3)
    q, k, v = ((s * torch.randn(150, h, 32, generator=g)).to(dtype) for s, h in ((0.2, 4), (1, 1), (1, 1)))

    def chunked(chunks):
        return attend_in_chunks(q, k, v, 40, chunks, extra=2, kv_int8=kv == "int8", amx=amx)

    whole = chunked([150])
    for chunks in ([1] * 150, [2, 3] * 30, [7, 1, 50, 3, 89]):
        assert torch.equal(chunked(chunks), whole)


@needs_kernels
def test_attention_kernel_rejects_bad_shapes():
    q, kv = torch.zeros(3, 64), torch.zeros(3, 32)
    pool = torch.zeros(2, 1, 1, 8, 32)

    def call(q=q, k=kv, v=kv, pool_k=pool, slots=(0,), starts=(0,), counts=(3,), window=8, capacity=8):
        d = pool_k.shape[-1]
        return cpu_kernels.attention(q, k, v, pool_k, pool_k, list(slots), list(starts), list(counts), window, d,
                                     capacity)

    call()  # the calls below differ from this one in one thing each
    with pytest.raises(RuntimeError, match="multiple of 8"):
        call(q=torch.zeros(3, 24), k=torch.zeros(3, 12), v=torch.zeros(3, 12), pool_k=torch.zeros(2, 1, 1, 8, 12))
    with pytest.raises(RuntimeError, match="fewer indices than the window"):
        call(starts=(5,), window=9)
    with pytest.raises(RuntimeError, match="one dtype"):
        call(k=kv.bfloat16())
    with pytest.raises(RuntimeError, match="add up to"):
        call(counts=(2,))
    with pytest.raises(RuntimeError, match="not in the pool"):
        call(slots=(2,))
    with pytest.raises(RuntimeError, match="need float32 scales"):
        call(k=kv.to(torch.int8), v=kv.to(torch.int8), pool_k=pool.to(torch.int8))
