"""voxlive's own CPU matrix-vector kernels (``cpu_kernels.cpp``), compiled on first use.

PyTorch's stock paths stream weights at about 60 % of this machine's plain read bandwidth in a
decode step (bf16 ``F.linear`` ~19 GB/s, ``aten._weight_int8pack_mm`` ~21 GB/s,
``aten._weight_int4pack_mm_for_cpu`` ~19 GB/s, against ~35 GB/s for a plain read): they spend too
many instructions per weight byte. These kernels use AVX-512 BF16 and VNNI to get the step to the
memory's speed (README, "Speed"). They need an x86-64 CPU with AVX-512 F/BW/VL/VNNI (and BF16 for
the bf16 kernel), a C++ compiler and ninja; the first load builds them into PyTorch's extension
cache (10-30 s), later loads reuse the build. Where any of that is missing, or with ``VOXLIVE_CPU_KERNELS=0``, the stock paths
run instead and ``unavailable_reason()`` says why.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # int8 and int4 (Ice Lake, Cascade Lake, Zen 4 on)
BF16_FLAG = "avx512_bf16"  # and the bf16 kernel (Sapphire Rapids, Zen 4 on)
INT4_GROUP = 64  # the int4 kernel's group size
K_MULTIPLE = 32  # the bf16 and int8 kernels' input sizes are multiples of this
COMPILER_FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma"]

log = logging.getLogger(__name__)

_reason: str | None = None  # why the kernels are unavailable; None once they are loaded
_tried = False
_bf16 = False  # whether the CPU runs the bf16 kernel too


def _cpu_flags() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def _load() -> str | None:
    global _bf16
    if os.environ.get("VOXLIVE_CPU_KERNELS", "1") == "0":
        return "disabled by VOXLIVE_CPU_KERNELS=0"
    flags = _cpu_flags()
    missing = [f for f in CPU_FLAGS if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    _bf16 = BF16_FLAG in flags
    try:
        from torch.utils.cpp_extension import load

        log.info("building voxlive's CPU kernels (once; cached by PyTorch)")
        load("voxlive_cpu_kernels", [str(SOURCE)], extra_cflags=COMPILER_FLAGS, extra_ldflags=["-fopenmp"],
             is_python_module=False)
    except Exception as err:  # no compiler, no ninja, a failed build: the stock kernels do the work
        lines = str(err).strip().splitlines() or [""]
        first_error = next((line for line in lines if "error" in line.lower()), lines[-1])
        return f"could not build them: {type(err).__name__}: {first_error.strip()}"
    for name in ("linear_bf16", "linear_int8", "linear_int4"):
        torch.library.register_fake(f"voxlive::{name}")(_fake_linear)
    return None


def _fake_linear(x: torch.Tensor, w: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
    """Shape of every kernel's output, for torch.compile's tracing."""
    return x.new_empty(x.shape[0], w.shape[0])


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
    """Whether the bf16 kernel runs here too (it needs AVX-512 BF16 on top of the others' VNNI)."""
    return available() and _bf16


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.voxlive.linear_bf16(x, w)


def linear_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.voxlive.linear_int8(x, q, scale)


def linear_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.ops.voxlive.linear_int4(x, q, scale, zero)
