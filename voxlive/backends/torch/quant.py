"""The weights of linear layers: plain, bfloat16 through voxlive's CPU kernel, int8 per output
channel, int4 per group of 64 (or 32) inputs.

At batch 1 a decode step reads every decoder weight once, so its time is the bytes read: int8
halves them and int4 quarters them. The decoder's matrices are multiplied by voxlive's own CPU
kernels (``cpu_kernels``) where they run, else by PyTorch's weight-only kernels
(``aten._weight_int8pack_mm``, ``aten._weight_int4pack_mm[_for_cpu]``); both dequantize as they
stream the weights. Activations stay in the model's dtype; nothing else changes.

What is quantized (the same in both modes, chosen by measurement, see README):
- the decoder's linear layers (wq|wk|wv, wo, w1|w3, w2): int8 or int4, the mode;
- the tied embedding / LM head: int8 in both modes. Its rows are looked up as well as multiplied,
  and an int8 row is a gather plus one scale; int4 would need a second, unpacked copy;
- the encoder's linear layers: int8 in both modes, as stored (a converted checkpoint holds them in
  int8), but multiplied as the bf16 model's are: the encoder runs on many frames at once, where a
  plain GEMM beats the weight-only kernels, so at load the integers are converted, once, to the
  activation dtype (exactly: |q| <= 127) in the GEMM's layout, and the product is scaled after.
  Converting at each call instead kept them at half the memory (1.0 GB instead of 1.9 GB), but
  a live stream's small chunks then paid the conversion per chunk: 1.5-2.5 s per audio second in
  240 ms chunks, 2.5-2.7x the bf16 model's encoder (README, Quantization).
The adapter, convolutions, norms and the delay-conditioning matrices are small and stay as they are.

Quantized values are computed from float32 copies of the weights, with scales rounded to bfloat16
*before* the integers are chosen, so the stored scales are exact in every activation dtype and a
saved quantized checkpoint reloads to bit-identical weights.

Each quantized weight always takes the same path whatever the number of rows (the kernels compute
each row on its own, the GEMM path rounds as the float model's does), so streaming and batching
change the numbers no more than without quantization: a switch of path by batch size would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...layouts.torch_quantized import STORED as STORED_DTYPES
from ...layouts.torch_quantized import int4_group, stored_shapes
from . import cpu_kernels

SCALE_DTYPE = torch.bfloat16


def uses_kernel(name: str) -> bool:
    """Whether a matrix is the decoder's (a few rows at a time: a streaming kernel) or the encoder's
    (many rows: a GEMM, int8 weights converted to the activation dtype first)."""
    return "whisper_encoder." not in name


# The stored parts of each scheme (``layouts.torch_quantized.STORED``) as torch dtypes.
_TORCH_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": SCALE_DTYPE}
STORED = {scheme: {part: _TORCH_DTYPES[dtype] for part, dtype in parts.items()} for scheme, parts in STORED_DTYPES.items()}


def quantize(w: torch.Tensor, scheme: str, block_rows: int = 2048) -> dict[str, torch.Tensor]:
    """A float matrix [N, K] -> its stored form (see STORED).

    Rows are independent, so they are done ``block_rows`` at a time: the float32 temporaries of
    the 131072-row embedding would otherwise take gigabytes at load.
    """
    out = {part: torch.empty(shape, dtype=STORED[scheme][part])
           for part, shape in stored_shapes(scheme, tuple(w.shape)).items()}
    for i in range(0, w.shape[0], block_rows):
        for part, value in _quantize_rows(w[i:i + block_rows].float(), scheme).items():
            out[part][i:i + block_rows] = value
    return out


def _quantize_rows(w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(SCALE_DTYPE)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}
    n, k = w.shape
    g = w.view(n, k // int4_group(k), -1)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(SCALE_DTYPE)
    zero = (lo + 8 * scale.float()).to(SCALE_DTYPE)
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15).to(torch.uint8)
    q = q.view(n, k)
    return {"q": (q[:, 0::2] << 4) | q[:, 1::2], "scale": scale, "zero": zero}


def cpu_path(device: torch.device, kernel: bool, n: int, k: int) -> str:
    """How a quantized weight [n, k] is multiplied: "amx" (``cpu_kernels``' AMX kernels: one pass over
    the weights for up to 16 rows), "voxlive" (``cpu_kernels``' VNNI kernels, a few rows per pass),
    "aten" (PyTorch's weight-only kernel) or "gemm" (the weight converted to the activation dtype, then
    a plain matmul)."""
    if not kernel:
        return "gemm"
    if device.type != "cpu" or k % cpu_kernels.K_MULTIPLE or not cpu_kernels.available():
        return "aten"
    return "amx" if cpu_kernels.amx_available() and n % 16 == 0 and k % 64 == 0 else "voxlive"


@dataclass
class Int8Weight:
    """Per-output-channel int8: w[n, k] = q[n, k] * scale[n]."""

    # [N, K] int8; "amx": in the kernel's tile order [N / 16, K / 64, 16, 64]; "gemm": the integers in
    # the activation dtype, as the GEMM takes them (a Bf16Weight where the AMX GEMM runs)
    q: torch.Tensor | Bf16Weight
    scale: torch.Tensor  # [N], the activation dtype
    path: str  # see cpu_path; "aten" on CUDA means the GEMM as well (PyTorch's int8 kernel is CPU-only)

    @classmethod
    def from_stored(cls, parts: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, *,
                    kernel: bool = True) -> Int8Weight:
        q = parts["q"]
        path = cpu_path(device, kernel, *q.shape)
        if path == "amx":
            q = cpu_kernels.int8_tiles(q)
        elif path == "gemm":  # the integers in the activation dtype (exact), in the GEMM's layout, once
            q = Bf16Weight.wrap(q.to(device, dtype), many_rows=True)
        else:
            q = q.to(device)
        return cls(q, parts["scale"].to(device, dtype), path)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "amx":
            return cpu_kernels.linear_int8_amx(x.reshape(-1, x.shape[-1]), self.q, self.scale).view(*x.shape[:-1], -1)
        if self.path == "gemm":
            return linear(x, self.q) * self.scale
        if x.device.type != "cpu":
            return F.linear(x, self.q.to(x.dtype)) * self.scale
        flat = x.reshape(-1, x.shape[-1])
        if self.path == "voxlive":
            y = cpu_kernels.linear_int8(flat, self.q, self.scale)
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat.contiguous(), self.q, self.scale)
        return y.view(*x.shape[:-1], -1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows (embedding lookup)."""
        if self.path == "amx":
            q = self.q[ids // 16, :, ids % 16].flatten(-2)
        else:
            q = self.q.rows(ids) if isinstance(self.q, Bf16Weight) else self.q[ids]
        return q.to(self.scale.dtype) * self.scale[ids, None]


@dataclass
class Int4Weight:
    """Group-wise asymmetric int4, in the layout of the kernel that multiplies it.

    "voxlive" (CPU, groups of 64): the stored form itself, q [N, K / 2] with scale and zero
    [N, K / group] in bfloat16. "amx" (CPU with AMX, groups of 64, N a multiple of 16): q and
    ``scales_and_zeros`` in the AMX kernel's tile order (``cpu_kernels.int4_tiles``). "aten":
    PyTorch's packed layout for the device, with ``scales_and_zeros`` [K / group, N, 2] in the
    activation dtype.
    """

    q: torch.Tensor
    scale: torch.Tensor | None  # "voxlive" only
    zero: torch.Tensor | None  # "voxlive" only
    scales_and_zeros: torch.Tensor | None  # "aten" and "amx"
    group: int
    n: int
    path: str

    @classmethod
    def from_stored(cls, parts: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device, *,
                    kernel: bool = True) -> Int4Weight:  # int4 has only kernels
        q = parts["q"]
        n, k = q.shape[0], 2 * q.shape[1]
        group = k // parts["scale"].shape[1]
        path = cpu_path(device, True, n, k)
        if group == cpu_kernels.INT4_GROUP and path == "amx":
            tiles, scales = cpu_kernels.int4_tiles(q, parts["scale"], parts["zero"])
            return cls(tiles, None, None, scales, group, n, "amx")
        if group == cpu_kernels.INT4_GROUP and path == "voxlive":
            return cls(q, parts["scale"], parts["zero"], None, group, n, "voxlive")
        if device.type == "cuda" and dtype != torch.bfloat16:
            raise ValueError("int4 on CUDA runs with bfloat16 activations only (PyTorch's kernel); use dtype='bfloat16'")
        if device.type == "cpu":
            values = torch.stack((q >> 4, q & 15), dim=-1).view(n, k).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
        else:
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(q.to(device), inner_k_tiles)
        sz = torch.stack((parts["scale"], parts["zero"]), dim=-1).transpose(0, 1).contiguous()
        return cls(packed, None, None, sz.to(device, dtype), group, n, "aten")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.q, self.scale, self.zero, self.scales_and_zeros) if t is not None)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.path == "amx":
            y = cpu_kernels.linear_int4_amx(flat, self.q, self.scales_and_zeros)
        elif self.path == "voxlive":
            y = cpu_kernels.linear_int4(flat, self.q, self.scale, self.zero)
        elif x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), self.q, self.group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(flat.contiguous(), self.q, self.group, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.n)


@dataclass
class Bf16Weight:
    """A bfloat16 matrix on a CPU with voxlive's kernels.

    With AMX (``cpu_kernels.amx_available``) the matrix is kept in the AMX GEMM's tile order and every
    product goes through that GEMM, whatever the number of rows: each row's result depends on that row
    alone, so a stream's numbers do not depend on how its frames or positions were chunked or batched,
    and a decode step of many rows costs one pass over the weights. Without AMX, ``cpu_kernels.linear_bf16``
    takes the few rows of a decode step and the stock GEMM the rest (a prompt, teacher forcing, big batches).
    """

    w: torch.Tensor  # [N, K] bfloat16; with AMX in tile order [N / 16, K / 32, 16, 32]
    max_rows: int  # without AMX, at most this many rows go through the kernel (cpu_kernels.BF16_MAX_ROWS)
    amx: bool

    @classmethod
    def wrap(cls, w: torch.Tensor, *, many_rows: bool = False) -> torch.Tensor | Bf16Weight:
        """``w`` itself unless a kernel applies (CPU, bfloat16, sizes it takes). ``many_rows``: a matrix
        that mostly multiplies many rows at once (the encoder), where oneDNN's GEMM is faster than the
        AMX GEMM at 744 rows (not at 48) and which takes the AMX GEMM only for
        ``cpu_kernels.batch_invariant()``."""
        if w.device.type != "cpu" or w.dtype != torch.bfloat16 or w.shape[1] % cpu_kernels.K_MULTIPLE:
            return w
        if cpu_kernels.amx_available() and w.shape[0] % 16 == 0 and (not many_rows or cpu_kernels.batch_invariant()):
            return cls(cpu_kernels.bf16_tiles(w), 0, True)
        if cpu_kernels.bf16_available() and not many_rows:
            return cls(w, cpu_kernels.BF16_MAX_ROWS[cpu_kernels.variant()], False)
        return w

    @property
    def nbytes(self) -> int:
        return self.w.nbytes

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.amx and x.dtype == torch.bfloat16:
            return cpu_kernels.linear_bf16_amx(flat, self.w, bias).view(*x.shape[:-1], -1)
        if self.amx:
            y = F.linear(x, self.rows(torch.arange(self.w.shape[0] * 16)).to(x.dtype))
        elif flat.shape[0] > self.max_rows or x.dtype != torch.bfloat16:
            y = F.linear(x, self.w)
        else:
            y = cpu_kernels.linear_bf16(flat, self.w).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.amx:
            return self.w[ids // 16, :, ids % 16].reshape(*ids.shape, -1)
        return self.w[ids]


QUANTIZED = {"int8": Int8Weight, "int4": Int4Weight}
Weight = torch.Tensor | Bf16Weight | Int8Weight | Int4Weight


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a plain or a quantized weight: the one call every layer makes."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, Bf16Weight):
        return w.linear(x, bias)
    y = w.linear(x)
    return y if bias is None else y + bias


def embed(w: Weight, ids: torch.Tensor) -> torch.Tensor:
    return w[ids] if isinstance(w, torch.Tensor) else w.rows(ids)


def nbytes(w: Weight) -> int:
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes
