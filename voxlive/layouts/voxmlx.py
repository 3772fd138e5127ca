"""The mlx-community layout as voxmlx's converter writes it (e.g. ``mlx-community/Voxtral-Mini-4B-Realtime-6bit``).

``config.json`` holds params.json's keys unchanged (plus ``quantization: {group_size, bits}`` when
quantized), so it is told apart by its ``multimodal`` key. Tensor names are renamed (table below);
files, conv order and packed matrices are as ``mlx_packed`` describes. The converter quantizes
every matrix whose input size is a multiple of the group size, the embedding included (so
``ada_rms_norm_t_cond.2``, 32 inputs, stays in float); norms, biases and convs stay in float.
``voxlive convert --backend mlx`` writes this layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import ConfigError, parse_config, read_json
from ..tensorfile import ShardedSafetensors
from . import mlx_packed, native
from .base import Checkpoint

NAME = "voxmlx"

_ENC = re.escape(native.ENCODER)
_EMB = re.escape("mm_streams_embeddings.embedding_module.")

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
converted_name = mlx_packed.Renames(_RENAMES, "converted")  # the converted layout's name of a native tensor


def quantizable(name: str, shape: tuple[int, ...], group_size: int) -> bool:
    """Whether the converter quantizes a native tensor: every 2-D matrix whose inputs fill whole groups."""
    return len(shape) == 2 and not native.is_conv_weight(name) and shape[1] % group_size == 0


def recognizes(directory: Path) -> bool:
    if not mlx_packed.is_candidate(directory):
        return False
    try:
        return "multimodal" in read_json(directory / mlx_packed.CONFIG_FILE)
    except ConfigError:
        return False


def read(directory: Path) -> Checkpoint:
    """Open a converted checkpoint: config.json with tekken.json's audio section, its tensors checked."""
    audio = mlx_packed.tekken_audio(directory)
    config_path = directory / mlx_packed.CONFIG_FILE
    params = read_json(config_path)
    quantization = mlx_packed.check_quantization(params.get("quantization"), config_path)
    config = parse_config(params, audio, params_name=str(config_path), tekken_name=str(directory / "tekken.json"))
    weights = ShardedSafetensors(mlx_packed.weight_files(directory))
    return mlx_packed.open_converted(directory, NAME, config, weights, quantization, converted_name)


def write_config(directory: Path, params: dict, quantization: dict | None) -> None:
    """config.json: the native params.json keys, plus the quantization entry when quantized."""
    out = dict(params)
    if quantization is not None:
        out["quantization"] = quantization
    with open(Path(directory) / mlx_packed.CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, sort_keys=True)
