"""The mlx-community converted layout: how its files and tensor names relate to the native layout.

Repositories such as ``mlx-community/Voxtral-Mini-4B-Realtime-6bit`` (written by voxmlx's
converter) hold ``config.json`` (params.json's keys, plus ``quantization: {group_size, bits}`` when
quantized), ``model.safetensors`` (or ``model-0000N-of-0000M.safetensors`` shards listed in
``model.safetensors.index.json``) and ``tekken.json``. Tensor names are renamed (table below), the
two conv weights are stored in MLX's [out, kernel, in] order instead of torch's [out, in, kernel],
and a quantized matrix ``X.weight`` is stored as MLX packs it: ``X.weight`` (uint32, ``bits`` bits
per value packed along the input dimension), ``X.scales`` and ``X.biases`` (one per group of
``group_size`` inputs). Which matrices are quantized is read from the file (a ``.scales``
companion), not guessed; the converter quantizes every Linear and the embedding whose input size
is a multiple of the group size (so ``ada_rms_norm_t_cond.2``, 32 inputs, stays in float).

No tensor maths here: this module only names things; reading and quantizing are the backend's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .config import ConfigError, ModelConfig, parse_config, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_ENC = "mm_streams_embeddings.embedding_module.whisper_encoder."
_EMB = "mm_streams_embeddings.embedding_module."

# Native name pattern -> converted name; applied to full native names, first match wins.
_RENAMES = [
    (_ENC + r"conv_layers\.0\.conv\.(weight|bias)", r"encoder.conv1.\1"),
    (_ENC + r"conv_layers\.1\.conv\.(weight|bias)", r"encoder.conv2.\1"),
    (_ENC + r"transformer\.layers\.(\d+)\.attention\.wq\.(weight|bias)", r"encoder.layers.\1.attention.q_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.attention\.wk\.(weight|bias)", r"encoder.layers.\1.attention.k_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.attention\.wv\.(weight|bias)", r"encoder.layers.\1.attention.v_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.attention\.wo\.(weight|bias)", r"encoder.layers.\1.attention.o_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.attention_norm\.weight", r"encoder.layers.\1.attn_norm.weight"),
    (_ENC + r"transformer\.layers\.(\d+)\.feed_forward\.w1\.(weight|bias)", r"encoder.layers.\1.mlp.gate_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.feed_forward\.w2\.(weight|bias)", r"encoder.layers.\1.mlp.down_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.feed_forward\.w3\.(weight|bias)", r"encoder.layers.\1.mlp.up_proj.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.ffn_norm\.weight", r"encoder.layers.\1.ffn_norm.weight"),
    (_ENC + r"transformer\.norm\.weight", r"encoder.norm.weight"),
    (_EMB + r"audio_language_projection\.0\.weight", r"adapter.w_in.weight"),
    (_EMB + r"audio_language_projection\.2\.weight", r"adapter.w_out.weight"),
    (_EMB + r"tok_embeddings\.weight", r"language_model.embed_tokens.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", r"language_model.layers.\1.attention.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", r"language_model.layers.\1.attention.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", r"language_model.layers.\1.attention.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"language_model.layers.\1.attention.o_proj.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"language_model.layers.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"language_model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"language_model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"language_model.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"language_model.layers.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.0\.weight", r"language_model.layers.\1.ada_norm.linear_in.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.2\.weight", r"language_model.layers.\1.ada_norm.linear_out.weight"),
    (r"norm\.weight", r"language_model.norm.weight"),
]
_COMPILED = [(re.compile(f"^{p}$"), r) for p, r in _RENAMES]


def converted_name(native: str) -> str:
    """The converted layout's name of a native tensor."""
    for pattern, replacement in _COMPILED:
        new, n = pattern.subn(replacement, native)
        if n:
            return new
    raise KeyError(f"no converted name for native tensor {native!r}")


def is_conv_weight(native: str) -> bool:
    """Conv weights are stored [out, kernel, in] in the converted layout ([out, in, kernel] natively)."""
    return native.startswith(_ENC + "conv_layers.") and native.endswith(".weight")


def quantized_parts(name: str) -> tuple[str, str, str]:
    """The three stored tensors of a quantized matrix ``X.weight``: packed values, scales, biases."""
    base = name.removesuffix(".weight")
    return name, base + ".scales", base + ".biases"


def quantizable(native: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether the converter quantizes a native tensor: every 2-D matrix whose inputs fill whole groups.

    Norms, biases and the conv weights stay in float (as voxmlx's converter leaves them).
    """
    return len(shape) == 2 and not is_conv_weight(native) and shape[1] % group_size == 0


def is_converted(directory: Path) -> bool:
    """A directory in the converted layout: config.json in the Mistral key layout, no consolidated file."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() or (directory / "consolidated.safetensors").exists():
        return False
    try:
        return "multimodal" in read_json(directory / CONFIG_FILE)
    except ConfigError:
        return False


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a converted checkpoint: one file, or the shards its index lists."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: no weight_map")
        return [directory / f for f in sorted(set(weight_map.values()))]
    return [directory / WEIGHTS_FILE]


def load_converted_config(directory: Path) -> tuple[ModelConfig, dict | None]:
    """The model config (config.json with tekken.json's audio section) and the quantization entry."""
    directory = Path(directory)
    params = read_json(directory / CONFIG_FILE)
    tekken = read_json(directory / "tekken.json")
    audio = tekken.get("audio")
    if not isinstance(audio, dict):
        raise ConfigError(f"{directory / 'tekken.json'}: no 'audio' section (not a Voxtral Realtime tokenizer)")
    config = parse_config(params, audio, params_name=str(directory / CONFIG_FILE),
                          tekken_name=str(directory / "tekken.json"))
    quant = params.get("quantization")
    if quant is not None and not (isinstance(quant, dict) and quant.get("group_size") in (32, 64, 128)
                                  and quant.get("bits") in (2, 3, 4, 5, 6, 8)):
        raise ConfigError(f"{directory / CONFIG_FILE}: quantization must be {{group_size: 32|64|128, "
                          f"bits: 2..6|8}}, got {quant!r}")
    return config, quant


def write_converted_config(directory: Path, params: dict, quantization: dict | None) -> None:
    """config.json: the native params.json keys, plus the quantization entry when quantized."""
    out = dict(params)
    if quantization is not None:
        out["quantization"] = quantization
    with open(Path(directory) / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, sort_keys=True)
