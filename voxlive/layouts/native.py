"""The native Mistral layout (``mistralai/Voxtral-Mini-4B-Realtime-2602``): ``params.json``,
``consolidated.safetensors`` and ``tekken.json``; every other layout is described by its relation
to the native tensor names and shapes listed here.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, load_config
from ..tensorfile import FLOAT_DTYPES, CheckpointError, SafetensorsFile, check_tensors
from .base import Checkpoint

NAME = "native"
FILES = ("params.json", "consolidated.safetensors", "tekken.json")
WEIGHTS_FILE = "consolidated.safetensors"

ENCODER = "mm_streams_embeddings.embedding_module.whisper_encoder."
EMBEDDING = "mm_streams_embeddings.embedding_module.tok_embeddings.weight"
ADAPTER = "mm_streams_embeddings.embedding_module.audio_language_projection."


def expected_native_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the native Mistral layout with its shape."""
    e, d = c.encoder, c.decoder
    out: dict[str, tuple[int, ...]] = {
        EMBEDDING: (d.vocab_size, d.dim),
    }
    w = ENCODER
    out[w + "conv_layers.0.conv.weight"] = (e.dim, e.n_mels, 3)
    out[w + "conv_layers.0.conv.bias"] = (e.dim,)
    out[w + "conv_layers.1.conv.weight"] = (e.dim, e.dim, 3)
    out[w + "conv_layers.1.conv.bias"] = (e.dim,)
    qkv = e.n_heads * e.head_dim
    for i in range(e.n_layers):
        L = f"{w}transformer.layers.{i}."
        out[L + "attention.wq.weight"] = (qkv, e.dim)
        out[L + "attention.wq.bias"] = (qkv,)
        out[L + "attention.wk.weight"] = (qkv, e.dim)
        out[L + "attention.wv.weight"] = (qkv, e.dim)
        out[L + "attention.wv.bias"] = (qkv,)
        out[L + "attention.wo.weight"] = (e.dim, qkv)
        out[L + "attention.wo.bias"] = (e.dim,)
        out[L + "attention_norm.weight"] = (e.dim,)
        out[L + "feed_forward.w1.weight"] = (e.hidden_dim, e.dim)
        out[L + "feed_forward.w2.weight"] = (e.dim, e.hidden_dim)
        out[L + "feed_forward.w2.bias"] = (e.dim,)
        out[L + "feed_forward.w3.weight"] = (e.hidden_dim, e.dim)
        out[L + "ffn_norm.weight"] = (e.dim,)
    out[w + "transformer.norm.weight"] = (e.dim,)
    a = ADAPTER
    out[a + "0.weight"] = (d.dim, e.dim * c.downsample_factor)
    out[a + "2.weight"] = (d.dim, d.dim)
    for i in range(d.n_layers):
        L = f"layers.{i}."
        out[L + "attention.wq.weight"] = (d.n_heads * d.head_dim, d.dim)
        out[L + "attention.wk.weight"] = (d.n_kv_heads * d.head_dim, d.dim)
        out[L + "attention.wv.weight"] = (d.n_kv_heads * d.head_dim, d.dim)
        out[L + "attention.wo.weight"] = (d.dim, d.n_heads * d.head_dim)
        out[L + "attention_norm.weight"] = (d.dim,)
        out[L + "ffn_norm.weight"] = (d.dim,)
        out[L + "feed_forward.w1.weight"] = (d.hidden_dim, d.dim)
        out[L + "feed_forward.w2.weight"] = (d.dim, d.hidden_dim)
        out[L + "feed_forward.w3.weight"] = (d.hidden_dim, d.dim)
        out[L + "ada_rms_norm_t_cond.0.weight"] = (d.t_cond_dim, d.dim)
        out[L + "ada_rms_norm_t_cond.2.weight"] = (d.dim, d.t_cond_dim)
    out["norm.weight"] = (d.dim,)
    return out


def is_conv_weight(native: str) -> bool:
    return native.startswith(ENCODER + "conv_layers.") and native.endswith(".weight")


def read(directory: Path) -> Checkpoint:
    """Open a native checkpoint: exactly the tensors its params.json implies, in a float type."""
    for name in FILES:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: missing {name} (expected the native Mistral layout)")
    config = load_config(directory)
    weights = SafetensorsFile(directory / WEIGHTS_FILE)
    expected = expected_native_tensors(config)
    check_tensors(weights.path, {name: (shape, FLOAT_DTYPES) for name, shape in expected.items()}, weights.tensors,
                  "params.json")
    return Checkpoint(directory, config, weights, NAME, {name: name for name in expected})
