"""voxlive's own CPU matrix-vector kernels (``cpu_kernels.cpp``), compiled on first use.

PyTorch's stock paths stream weights at about 60 % of this machine's plain read bandwidth in a
decode step (bf16 ``F.linear`` ~19 GB/s, ``aten._weight_int8pack_mm`` ~21 GB/s,
``aten._weight_int4pack_mm_for_cpu`` ~19 GB/s, against ~35 GB/s for a plain read): they spend too
many instructions per weight byte. These kernels use AVX-512 BF16 and VNNI to get the step to the
memory's speed (README, "Speed"); on CPUs with AMX, tile kernels (``linear_bf16_amx``,
``linear_int8_amx``, ``linear_int4_amx``) do a pass of up to 16 rows at about one row's cost. They
need an x86-64 CPU with AVX-512 F/BW/VL/VNNI (and BF16 for the bf16 kernel), or else AVX2 and FMA
(a 256-bit build), a C++ compiler and ninja; the first load
builds them into PyTorch's extension cache (10-30 s), later loads reuse the build. Where any of
that is missing, or with ``VOXLIVE_CPU_KERNELS=0``, the stock paths run instead and
``unavailable_reason()`` says why; ``VOXLIVE_CPU_KERNELS=avx2`` forces the AVX2 build.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
INT4_GROUP = 64  # the int4 kernel's group size
K_MULTIPLE = 32  # the bf16 and int8 kernels' input sizes are multiples of this
ATTENTION_MAX_HEAD_DIM = 128  # the attention kernel's largest head dim
BASE_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
# Builds of the same source, best first: the CPU flags each needs, and the compiler's.
VARIANTS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),  # Ice Lake, Cascade Lake, Zen 4 on
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]),
    "avx2": (("avx2", "fma"), ["-mavx2", "-mfma"]),  # Haswell, Zen 1 on
}
BUILD_NOTICE_SECONDS = 2.0  # a load from PyTorch's cache takes less
BF16_FLAG = "avx512_bf16"  # the avx512 build's bf16 kernel also needs this (Sapphire Rapids, Zen 4 on)
AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")  # the avx512 build's AMX kernels (Sapphire Rapids on)
# The bf16 kernel's cost grows with the rows; above this many, the stock GEMM is faster. Measured
# here (Zen 4), kernel against F.linear: avx512 on 4 decoder layers' matrices (931 MB), 35 / 33 /
# 41 / 44 / 69 ms against 45 / 40 / 46 / 44 / 51 ms for 1 / 2 / 3 / 4 / 8 rows; avx2 on one
# 18432 x 3072 matrix, 3.6 / 5.8 ms against 5.4 / 5.0 ms for 1 / 2 rows.
BF16_MAX_ROWS = {"avx512": 3, "avx2": 1}

log = logging.getLogger(__name__)

_reason: str | None = None  # why the kernels are unavailable; None once they are loaded
_tried = False
_variant: str | None = None  # the build loaded
_bf16 = False  # whether the CPU runs the bf16 kernel too
_amx = False  # whether it runs the AMX GEMM too
_batch_invariant = True  # VOXLIVE_BATCH_INVARIANT, 1 unless set to 0 (see batch_invariant)


def _cpu_flags() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def build_name(variant: str) -> str:
    """Named by the source and flags: checkouts of other versions on one machine keep their own builds."""
    cflags = BASE_FLAGS + VARIANTS[variant][1]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(cflags).encode()).hexdigest()[:12]
    return f"voxlive_cpu_kernels_{variant}_{digest}"


def build_directory(name: str) -> Path:
    """Where a build lives: PyTorch's extension root (``TORCH_EXTENSIONS_DIR`` or its default), then
    the Python and torch versions (a build is only good for the torch it was compiled against)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}" / name


def _build(name: str, cflags: list[str]) -> None:
    """PyTorch's ``cpp_extension.load``, under an flock of our own.

    PyTorch marks a build in progress with a ``lock`` file and has every other process wait until
    it is gone: a build killed half-way (Ctrl-C during the first run) leaves it behind, and every
    later start of voxlive would wait for ever, silently. The flock is released by the kernel when
    its holder dies, and every voxlive build of this name holds it, so a ``lock`` file found while
    holding it is such a leftover, and is removed.
    """
    import fcntl

    from torch.utils.cpp_extension import load

    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "voxlive.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        load(name, [str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"], is_python_module=False,
             build_directory=str(directory))


def _load() -> str | None:
    """Loads the best build this CPU runs (``VOXLIVE_CPU_KERNELS``: 0 for none, or a variant's name)."""
    global _variant, _bf16, _amx, _batch_invariant
    choice = os.environ.get("VOXLIVE_CPU_KERNELS", "1")
    if choice == "0":
        return "disabled by VOXLIVE_CPU_KERNELS=0"
    if choice not in ("1", *VARIANTS):
        return f"VOXLIVE_CPU_KERNELS={choice!r} is not 0, 1 or one of {list(VARIANTS)}"
    flags = _cpu_flags()
    runnable = [v for v, (needs, _) in VARIANTS.items() if all(f in flags for f in needs) and choice in ("1", v)]
    if not runnable:
        wanted = VARIANTS[choice][0] if choice in VARIANTS else VARIANTS["avx2"][0]
        return f"this CPU lacks {', '.join(f for f in wanted if f not in flags)}"
    variant = runnable[0]
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"could not build them: no C++ compiler ({compiler}): install g++, or set VOXLIVE_CPU_KERNELS=0"
    # Said only when it takes a while (a build, not a load from PyTorch's cache), so that the user
    # knows what the pause is.
    notice = threading.Timer(BUILD_NOTICE_SECONDS, log.info, args=(
        "building voxlive's CPU kernels (%s build): once, 20-60 s; later runs reuse it", variant))
    notice.daemon = True
    notice.start()
    try:
        _build(build_name(variant), BASE_FLAGS + VARIANTS[variant][1])
    except Exception as err:  # no ninja, a failed build: the stock kernels do the work
        # The compiler's first error, not the whole command line it ran.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        first_error = next((line for line in lines if "error:" in line), lines[0].split(": [")[0])
        return f"could not build them ({first_error[:200]}); set VOXLIVE_CPU_KERNELS=0 to skip the build"
    finally:
        notice.cancel()
    _variant = variant
    _bf16 = variant == "avx2" or BF16_FLAG in flags
    _amx = variant == "avx512" and all(f in flags for f in AMX_FLAGS) and torch.ops.voxlive.amx_ready()
    _batch_invariant = os.environ.get("VOXLIVE_BATCH_INVARIANT", "1") != "0"
    for name in ("linear_bf16", "linear_int8", "linear_int4"):
        torch.library.register_fake(f"voxlive::{name}")(_fake_linear)
    torch.library.register_fake("voxlive::linear_bf16_amx")(_fake_linear_tiles)
    torch.library.register_fake("voxlive::linear_int8_amx")(_fake_linear_tiles)
    torch.library.register_fake("voxlive::linear_int4_amx")(_fake_linear_tiles)
    torch.library.register_fake("voxlive::attention")(_fake_attention)
    return None


def _fake_linear(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """Shape of every kernel's output, for torch.compile's tracing."""
    return x.new_empty(x.shape[0], w.shape[0])


def _fake_linear_tiles(x: torch.Tensor, tiles: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], tiles.shape[0] * 16)


def _fake_attention(q: torch.Tensor, *rest) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def available() -> bool:
    """Whether the kernels are loaded (building them on the first call)."""
    global _tried, _reason
    if not _tried:
        _tried = True
        _reason = _load()
        if _reason:
            # a CPU without the extensions is normal; a failed build is worth the user's attention
            level = logging.WARNING if _reason.startswith("could not build") else logging.INFO
            log.log(level, "voxlive CPU kernels unavailable (%s); using PyTorch's stock kernels", _reason)
    return _reason is None


def unavailable_reason() -> str | None:
    return None if available() else _reason


def bf16_available() -> bool:
    """Whether the bf16 kernel runs here too (the avx512 build's needs AVX-512 BF16 as well)."""
    return available() and _bf16


def amx_available() -> bool:
    """Whether the AMX kernels run here (the avx512 build on a CPU with AMX-BF16 and AMX-INT8, tiles
    granted by Linux)."""
    return available() and _amx


def batch_invariant() -> bool:
    """Whether every stream's numbers must not depend on how its audio was chunked or batched (the
    default; ``VOXLIVE_BATCH_INVARIANT=0`` turns it off; README, "Same tokens however the audio
    arrives"): the encoder's products through the AMX GEMM (where it runs) and attention through
    voxlive's attention kernel, both computing each row on its own. Measured here no slower than the
    paths they replace. The decoder's bf16 products take the AMX GEMM either way."""
    return available() and _batch_invariant


def variant() -> str | None:
    """The build in use ("avx512", "avx2"), None when PyTorch's kernels do the work."""
    return _variant if available() else None


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.voxlive.linear_bf16(x, w)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.voxlive.linear_int8(x, q, scale)


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.ops.voxlive.linear_int4(x, q, scale, zero)


def bf16_tiles(w: torch.Tensor) -> torch.Tensor:
    """A bfloat16 matrix [N, K] (N a multiple of 16, K of 32) in the AMX GEMM's tile order."""
    return torch.ops.voxlive.bf16_tiles(w)


def linear_bf16_amx(x: torch.Tensor, tiles: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bfloat16 times a matrix in tile order (``bf16_tiles``), plus the bias: [M, N] bfloat16.
    Each row's result depends on that row alone."""
    return torch.ops.voxlive.linear_bf16_amx(x, tiles, bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool_k: torch.Tensor, pool_v: torch.Tensor,
              slots: list[int], starts: list[int], counts: list[int], window: int, head_dim: int, capacity: int,
              scales: tuple[torch.Tensor, ...] | None = None, amx: bool = False) -> torch.Tensor:
    """Causal sliding-window attention of a batch of streams over their KV pool slots, each query on its own.

    Stream b feeds ``counts[b]`` consecutive rows (its positions ``starts[b]`` on, relative to its first)
    of q [rows, heads * head_dim] and k/v [rows, kv_heads * head_dim] (rows may be strided); its slot
    ``slots[b]`` of the pool [slots, blocks, kv_heads, block, head_dim] holds each position p before
    ``starts[b]`` at index p % capacity (index i in block i // block). int8 keys and values (new rows
    and pool) come with ``scales``: float32 (k, v [rows, kv_heads]; pool k, v [slots, blocks, kv_heads,
    block]). Returns [rows, heads * head_dim] in q's dtype.

    ``amx``: the two products on AMX tiles (``amx_available()``; bf16 queries, keys and values), else in
    float32 vector FMAs. Each is invariant to chunking and batching on its own, but the two round
    differently, so a pool takes one of them for good (``KVPool(amx=...)``).
    """
    k_scale, v_scale, pool_k_scale, pool_v_scale = scales or (None,) * 4
    return torch.ops.voxlive.attention(q, k, v, k_scale, v_scale, pool_k, pool_v, pool_k_scale, pool_v_scale,
                                       slots, starts, counts, window, head_dim, capacity, amx)


def int8_tiles(q: torch.Tensor) -> torch.Tensor:
    """An int8 matrix [N, K] (N a multiple of 16, K of 64) in the AMX int8 kernel's tile order."""
    return torch.ops.voxlive.int8_tiles(q)


def linear_int8_amx(x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] times an int8 matrix in tile order (``int8_tiles``) with one scale per output: what
    ``linear_int8`` computes, with exact integer sums. Each row's result depends on that row alone."""
    return torch.ops.voxlive.linear_int8_amx(x, tiles, scale)


def int4_tiles(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed int4 matrix (``quant.quantize``'s q [N, K / 2], scale and zero [N, K / 64], N a multiple
    of 16) in the AMX int4 kernel's tile order: the nibbles and the scales with zeros."""
    return torch.ops.voxlive.int4_tiles(q), torch.ops.voxlive.int4_tile_scales(scale, zero)


def linear_int4_amx(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times an int4 matrix in tile order (``int4_tiles``): what ``linear_int4`` computes, each
    group's integer sum exact. Each row's result depends on that row alone."""
    return torch.ops.voxlive.linear_int4_amx(x, tiles, scales)
