"""Reading native checkpoint tensors into torch buffers of the target dtype and device."""

from __future__ import annotations

import torch

from ...checkpoint import Checkpoint


class WeightReader:
    """Reads native tensors into preallocated buffers of the target dtype and device, one at a time."""

    _FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
        self.file, self.dtype, self.device = ckpt.weights, dtype, device

    def _fill(self, out: torch.Tensor, name: str) -> None:
        info = self.file.tensors[name]
        src_dtype = self._FILE_DTYPES[info.dtype]
        if out.device.type == "cpu" and src_dtype == out.dtype and out.is_contiguous():
            # Straight from the file into the final buffer: no intermediate copy.
            self.file.read_into(name, out.view(torch.uint8).numpy() if out.dtype != torch.float32 else out.numpy())
            return
        raw = torch.from_numpy(self.file.read(name))
        if info.dtype == "BF16":
            raw = raw.view(torch.bfloat16)
        out.copy_(raw.view(out.shape))

    def get(self, name: str) -> torch.Tensor:
        shape = self.file.tensors[name].shape
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._fill(out, name)
        return out

    def fused(self, names: list[str | tuple[int, ...]]) -> torch.Tensor:
        """Concatenation along dim 0 of several tensors, filled in place; a shape means zeros."""
        shapes = [n if isinstance(n, tuple) else self.file.tensors[n].shape for n in names]
        out = torch.empty((sum(s[0] for s in shapes), *shapes[0][1:]), dtype=self.dtype, device=self.device)
        row = 0
        for name, shape in zip(names, shapes):
            part = out[row:row + shape[0]]
            if isinstance(name, tuple):
                part.zero_()
            else:
                self._fill(part, name)
            row += shape[0]
        return out
