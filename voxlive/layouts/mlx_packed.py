"""What the two MLX converters' layouts (voxmlx's and mlx-audio's) share: the files, and how a
quantized matrix is stored.

Both write ``config.json``, ``model.safetensors`` (or ``model-0000N-of-0000M.safetensors`` shards
listed in ``model.safetensors.index.json``) and ``tekken.json``; both store the two conv weights in
MLX's [out, kernel, in] order, and a quantized matrix ``X.weight`` as MLX packs it: ``X.weight``
(uint32, ``bits`` bits per value packed along the inputs), ``X.scales`` and ``X.biases`` (one per
group of ``group_size`` inputs). Which matrices are quantized is read from the file (a
``.scales`` companion), not guessed: each converter has its own rule, and its rule has changed
between versions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ..config import ConfigError, ModelConfig, read_json
from ..tensorfile import FLOAT_DTYPES, CheckpointError, ShardedSafetensors, check_tensors
from . import native
from .base import Checkpoint, Packed

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GROUP_SIZES = (32, 64, 128)
BITS = (2, 3, 4, 5, 6, 8)


class Renames:
    """A converter's names of the native tensors: (native name pattern, replacement) rules, the first
    match wins. Calling it renames one tensor."""

    def __init__(self, rules: list[tuple[str, str]], layout: str):
        self.rules = [(re.compile(f"^{pattern}$"), replacement) for pattern, replacement in rules]
        self.layout = layout

    def __call__(self, name: str) -> str:
        for pattern, replacement in self.rules:
            new, n = pattern.subn(replacement, name)
            if n:
                return new
        raise KeyError(f"no {self.layout} name for native tensor {name!r}")


def is_candidate(directory: Path) -> bool:
    """config.json and no native weights file: one of the MLX converters' layouts, or neither."""
    return (directory / CONFIG_FILE).is_file() and not (directory / native.WEIGHTS_FILE).exists()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files: one file, or the shards the index lists."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: no weight_map")
        return [directory / f for f in sorted(set(weight_map.values()))]
    return [directory / WEIGHTS_FILE]


def tekken_audio(directory: Path) -> dict:
    """The audio section of tekken.json, which these layouts copy unchanged from the native one."""
    path = directory / "tekken.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: missing tekken.json")
    audio = read_json(path).get("audio")
    if not isinstance(audio, dict):
        raise ConfigError(f"{path}: no 'audio' section (not a Voxtral Realtime tokenizer)")
    return audio


def parts(name: str) -> tuple[str, str, str]:
    """The three stored tensors of a quantized matrix ``X.weight``: packed values, scales, biases."""
    base = name.removesuffix(".weight")
    return name, base + ".scales", base + ".biases"


def check_quantization(entry, where: Path) -> dict | None:
    """The ``{group_size, bits}`` of a config's quantization entry (MLX's affine mode only)."""
    if entry is None:
        return None
    if not (isinstance(entry, dict) and entry.get("group_size") in GROUP_SIZES and entry.get("bits") in BITS):
        raise ConfigError(f"{where}: quantization must be {{group_size: 32|64|128, bits: 2..6|8}}, got {entry!r}")
    if entry.get("mode", "affine") != "affine":
        raise ConfigError(f"{where}: quantization mode {entry['mode']!r}: only MLX's affine mode is read")
    return {"group_size": entry["group_size"], "bits": entry["bits"]}


def open_converted(directory: Path, layout: str, config: ModelConfig, weights: ShardedSafetensors,
                   quantization: dict | None, stored_name: Callable[[str], str], conv_transposed: bool = True,
                   overrides: dict | None = None) -> Checkpoint:
    """A converted checkpoint whose tensors are exactly the native ones renamed by ``stored_name``,
    float or (with ``quantization``) MLX-quantized where a ``.scales`` tensor says so.

    ``overrides``: per-matrix quantization (stored name without ``.weight`` -> ``{group_size,
    bits}``), as mlx-audio records a mixed recipe.
    """
    found, path = weights.tensors, weights.path
    expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
    names, transposed, packed = {}, set(), {}
    for nat, shape in native.expected_native_tensors(config).items():
        name = names[nat] = stored_name(nat)
        if conv_transposed and native.is_conv_weight(nat):
            transposed.add(nat)
            shape = (shape[0], shape[2], shape[1])
        weight, scales, biases = parts(name)
        if quantization is not None and scales in found:
            q = (overrides or {}).get(name.removesuffix(".weight"), quantization)
            out, n_in = shape
            if n_in % q["group_size"] or (n_in * q["bits"]) % 32:
                raise CheckpointError(f"{path}: tensor {name!r} with {n_in} inputs cannot be quantized with {q}")
            expected[weight] = ((out, n_in * q["bits"] // 32), ("U32",))
            expected[scales] = expected[biases] = ((out, n_in // q["group_size"]), FLOAT_DTYPES)
            packed[nat] = Packed(weight, scales, biases, q["group_size"], q["bits"])
        else:
            expected[name] = (shape, FLOAT_DTYPES)
    check_tensors(path, expected, found, CONFIG_FILE)
    return Checkpoint(directory, config, weights, layout, names, frozenset(transposed), packed,
                      quantization if packed else None)
