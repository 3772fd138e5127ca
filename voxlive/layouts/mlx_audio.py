"""The mlx-community layout as mlx-audio writes it (e.g. ``mlx-community/Voxtral-Mini-4B-Realtime-2602-4bit``
and ``-2602-fp16``).

``config.json`` is mlx-audio's: ``model_type: "voxtral_realtime"``, the decoder's params.json keys
under ``decoder``, the encoder's ``encoder_args`` (its ``audio_encoding_args`` nested, plus
``downsample_factor``) and, when quantized, ``quantization`` (``{group_size, bits, mode}``, with
per-module entries for a mixed recipe; ``quantization_config`` is a copy). Tensors carry the
module paths of mlx-audio's model (``Model.sanitize`` maps the native names to them; table below),
or, in files its first converter wrote, the native names themselves, with the conv weights then
in native order. Files and packed matrices are as ``mlx_packed`` describes. mlx-audio's converter
quantizes every matrix but the norms, the delay-conditioning matrices and the convs (older
versions also kept the embedding in float): which ones are is read from the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import ConfigError, parse_config, read_json
from ..tensorfile import ShardedSafetensors
from . import mlx_packed, native
from .base import Checkpoint

NAME = "mlx-audio"
MODEL_TYPE = "voxtral_realtime"

_ENC = re.escape(native.ENCODER)
_MM = re.escape("mm_streams_embeddings.embedding_module.")
# Native name pattern -> mlx-audio's module path; first match wins.
_RENAMES = [
    (_ENC + r"conv_layers\.(\d+)\.conv\.(weight|bias)", r"encoder.conv_layers_\1_conv.conv.\2"),
    (_ENC + r"transformer\.layers\.(\d+)\.feed_forward\.(w\d)\.(weight|bias)", r"encoder.transformer_layers.\1.feed_forward_\2.\3"),
    (_ENC + r"transformer\.layers\.(\d+)\.(.+)", r"encoder.transformer_layers.\1.\2"),
    (_ENC + r"transformer\.norm\.weight", r"encoder.transformer_norm.weight"),
    (_MM + r"audio_language_projection\.(\d+)\.weight", r"encoder.audio_language_projection_\1.weight"),
    (_MM + r"tok_embeddings\.weight", r"decoder.tok_embeddings.weight"),
    (r"layers\.(\d+)\.feed_forward\.(w\d)\.weight", r"decoder.layers.\1.feed_forward_\2.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.0\.weight", r"decoder.layers.\1.ada_rms_norm_t_cond.ada_down.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.2\.weight", r"decoder.layers.\1.ada_rms_norm_t_cond.ada_up.weight"),
    (r"layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
    (r"norm\.weight", r"decoder.norm.weight"),
]
module_name = mlx_packed.Renames(_RENAMES, "mlx-audio")  # mlx-audio's name of a native tensor


def recognizes(directory: Path) -> bool:
    if not mlx_packed.is_candidate(directory):
        return False
    try:
        return read_json(directory / mlx_packed.CONFIG_FILE).get("model_type") == MODEL_TYPE
    except ConfigError:
        return False


def native_params(config: dict, where: Path) -> dict:
    """params.json's structure rebuilt from mlx-audio's config.json (the same keys, regrouped)."""
    decoder, encoder = config.get("decoder"), config.get("encoder_args")
    if not isinstance(decoder, dict) or not isinstance(encoder, dict):
        raise ConfigError(f"{where}: model_type {MODEL_TYPE!r} but no 'decoder' and 'encoder_args' objects "
                          f"(mlx-audio's converter writes them; a transformers config.json is not read)")
    encoder = dict(encoder)
    if "audio_encoding_args" not in encoder and isinstance(config.get("audio_encoding_args"), dict):
        encoder["audio_encoding_args"] = config["audio_encoding_args"]
    downsample = {"downsample_factor": encoder["downsample_factor"]} if "downsample_factor" in encoder else {}
    return {**decoder, "multimodal": {"whisper_model_args": {"encoder_args": encoder, "downsample_args": downsample}}}


def quantization_entries(config: dict, where: Path) -> tuple[dict | None, dict]:
    """The global ``{group_size, bits}`` and the per-module ones of a mixed recipe."""
    entry = config.get("quantization", config.get("quantization_config"))
    overall = mlx_packed.check_quantization(entry, where)
    overrides = {}
    if overall is not None:
        for module, value in entry.items():
            if isinstance(value, dict):
                overrides[module] = mlx_packed.check_quantization(value, where)
    return overall, overrides


def read(directory: Path) -> Checkpoint:
    """Open an mlx-audio checkpoint: its config regrouped, its tensors checked under their names."""
    audio = mlx_packed.tekken_audio(directory)
    config_path = directory / mlx_packed.CONFIG_FILE
    raw = read_json(config_path)
    config = parse_config(native_params(raw, config_path), audio, params_name=str(config_path),
                          tekken_name=str(directory / "tekken.json"))
    quantization, overrides = quantization_entries(raw, config_path)
    weights = ShardedSafetensors(mlx_packed.weight_files(directory))
    sanitized = "norm.weight" not in weights.tensors
    return mlx_packed.open_converted(directory, NAME, config, weights, quantization,
                                     module_name if sanitized else str, conv_transposed=sanitized,
                                     overrides=overrides)
