"""voxlive's own quantized layout, written by ``voxlive convert SRC OUT --quantize int8|int4``.

A directory with the source's ``params.json`` and ``tekken.json`` and a ``quantized.safetensors``
holding every native tensor under its native name, either as it was (norms, convolutions, ...)
or, for the tensors the mode quantizes (``scheme_for``), as its stored parts ``<name>.q``,
``<name>.scale`` (and ``<name>.zero`` for int4). The file's metadata names the format, its
version and the mode; a file written by another version of the format, or whose tensors are not
exactly those expected, is refused with the reason, so a stale file is never silently misread.
How the parts are computed and multiplied is the torch backend's (``backends/torch/quant.py``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, load_config
from ..tensorfile import FLOAT_DTYPES, CheckpointError, SafetensorsFile
from . import native
from .base import Checkpoint

NAME = "torch-quantized"
WEIGHTS_FILE = "quantized.safetensors"
FORMAT = "voxlive-torch-quantized"
# Bump whenever the stored layout or what a mode quantizes changes: older files are then refused.
FORMAT_VERSION = 1
MODES = ("int8", "int4")
INT4_GROUPS = (64, 32)  # the first that divides a matrix's input size is used

# Stored form of each scheme: part suffix -> safetensors dtype. Shapes: int8 q [N, K], scale [N];
# int4 q [N, K / 2] (input k even in the high nibble, k odd in the low one), scale and zero
# [N, K / group], dequantized as (q - 8) * scale + zero.
STORED = {"int8": {"q": "I8", "scale": "BF16"}, "int4": {"q": "U8", "scale": "BF16", "zero": "BF16"}}


def scheme_for(name: str, mode: str | None) -> str | None:
    """The quantization of native tensor ``name`` in ``mode``: None, "int8" or "int4".

    The embedding / LM head and the encoder's matrices are int8 in both modes, the decoder's
    matrices the mode (why: ``backends/torch/quant.py``); everything else stays as it is.
    """
    if mode is None:
        return None
    if mode not in MODES:
        raise ValueError(f"the torch backend quantizes to {MODES}, got {mode!r}")
    if name.endswith("tok_embeddings.weight"):
        return "int8"
    linear = (".attention.wq.weight", ".attention.wk.weight", ".attention.wv.weight", ".attention.wo.weight",
              ".feed_forward.w1.weight", ".feed_forward.w2.weight", ".feed_forward.w3.weight")
    if not name.endswith(linear):
        return None
    return "int8" if "whisper_encoder." in name else mode


def int4_group(k: int) -> int:
    for g in INT4_GROUPS:
        if k % g == 0:
            return g
    raise ValueError(f"int4: input size {k} is not a multiple of any group size {INT4_GROUPS}")


def stored_shapes(scheme: str, shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    n, k = shape
    if scheme == "int8":
        return {"q": (n, k), "scale": (n,)}
    groups = k // int4_group(k)
    return {"q": (n, k // 2), "scale": (n, groups), "zero": (n, groups)}


def expected_tensors(config: ModelConfig, mode: str) -> dict[str, tuple[str | None, tuple]]:
    """Name -> (safetensors dtype, shape) of every tensor of a quantized checkpoint.

    The dtype is None for a tensor kept as it was: any float type, that of the source.
    """
    out = {}
    for name, shape in native.expected_native_tensors(config).items():
        scheme = scheme_for(name, mode)
        if scheme is None:
            out[name] = (None, shape)
            continue
        for part, part_shape in stored_shapes(scheme, shape).items():
            out[f"{name}.{part}"] = (STORED[scheme][part], part_shape)
    return out


def recognizes(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file()


def read(directory: Path) -> Checkpoint:
    """Open and validate a quantized checkpoint directory."""
    config = load_config(directory)
    weights = SafetensorsFile(directory / WEIGHTS_FILE)
    path, meta = weights.path, weights.metadata
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a voxlive quantized checkpoint (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: quantized format version {meta.get('format_version')}, this voxlive reads "
                              f"version {FORMAT_VERSION}: convert the float checkpoint again with `voxlive convert`")
    mode = meta.get("quantize")
    if mode not in STORED:
        raise CheckpointError(f"{path}: unknown quantization {mode!r}")
    found = weights.tensors
    expected = expected_tensors(config, mode)
    for name, (dtype, shape) in expected.items():
        if name not in found:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        if dtype is None and found[name].dtype in FLOAT_DTYPES:
            dtype = found[name].dtype
        if (found[name].dtype, found[name].shape) != (dtype, shape):
            raise CheckpointError(f"{path}: tensor {name!r} is {found[name].dtype} {list(found[name].shape)}, "
                                  f"expected {dtype or 'a float type'} {list(shape)}")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}")
    return Checkpoint(directory, config, weights, NAME, {name: name for name in expected}, quantize=mode)
