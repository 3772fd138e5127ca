"""Find (or download) a checkpoint and open it, whatever its layout; the native tensors of a layer.

Layouts (which files, which names, which stored forms) are ``voxlive.layouts``'; reading the
safetensors files is ``voxlive.tensorfile``'s. This module is what the rest of voxlive uses: the
backends build each layer from the tables below, by native name, whatever the layout on disk.
Nothing here imports torch or MLX.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import layouts
from .config import ModelConfig
from .layouts import native
from .layouts.base import Checkpoint
from .layouts.native import ADAPTER, EMBEDDING, ENCODER, expected_native_tensors
from .tensorfile import CheckpointError, SafetensorsFile

__all__ = ["DEFAULT_MODEL", "Checkpoint", "CheckpointError", "SafetensorsFile", "ADAPTER", "EMBEDDING", "ENCODER",
           "LAYER_MATRICES", "expected_native_tensors", "encoder_layer_tensors", "decoder_layer_tensors",
           "read_layer", "resolve", "open_checkpoint"]

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"

# The weight matrices of a layer (quantizable, read with a backend's ``WeightReader.matrix``); the
# other fields of a layer are vectors read as they are.
LAYER_MATRICES = ("wqkv", "wo", "w13", "w2")

# One layer of each stack, as both backends build it: field -> its native tensors, stacked along
# dim 0 when there are several (fused projections); a shape stands for zeros (wk has no bias).


def encoder_layer_tensors(c: ModelConfig, i: int) -> dict[str, list[str | tuple[int, ...]]]:
    L = f"{ENCODER}transformer.layers.{i}."
    a = L + "attention."
    return {
        "attention_norm": [L + "attention_norm.weight"],
        "wqkv": [a + "wq.weight", a + "wk.weight", a + "wv.weight"],
        "bqkv": [a + "wq.bias", (c.encoder.n_heads * c.encoder.head_dim,), a + "wv.bias"],
        "wo": [a + "wo.weight"],
        "bo": [a + "wo.bias"],
        "ffn_norm": [L + "ffn_norm.weight"],
        "w13": [L + "feed_forward.w1.weight", L + "feed_forward.w3.weight"],
        "w2": [L + "feed_forward.w2.weight"],
        "b2": [L + "feed_forward.w2.bias"],
    }


def read_layer(reader, tensors: dict[str, list], matrices: tuple[str, ...]) -> dict:
    """A layer's fields from a backend's ``WeightReader``: the fields in ``matrices`` as weight
    matrices (``reader.matrix``: quantizable), the others as they are (``reader.fused``)."""
    return {field: reader.matrix(names) if field in matrices else reader.fused(names) for field, names in tensors.items()}


def decoder_layer_tensors(i: int) -> dict[str, list[str | tuple[int, ...]]]:
    L = f"layers.{i}."
    a = L + "attention."
    return {
        "attention_norm": [L + "attention_norm.weight"],
        "wqkv": [a + "wq.weight", a + "wk.weight", a + "wv.weight"],
        "wo": [a + "wo.weight"],
        "ffn_norm": [L + "ffn_norm.weight"],
        "ada0": [L + "ada_rms_norm_t_cond.0.weight"],
        "ada2": [L + "ada_rms_norm_t_cond.2.weight"],
        "w13": [L + "feed_forward.w1.weight", L + "feed_forward.w3.weight"],
        "w2": [L + "feed_forward.w2.weight"],
    }


def resolve(source: str | os.PathLike | None) -> Path:
    """A local checkpoint directory, or a Hugging Face repo id downloaded (once) into the HF cache."""
    if source is None:
        source = DEFAULT_MODEL
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise CheckpointError(f"{text}: not a directory (give the checkpoint directory)")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{text}: no such directory, and not a Hugging Face repo id (org/name)")
    offline = (f"a local checkpoint needs no network: a directory with {', '.join(NATIVE_FILES)} (fetch them "
               f"where there is a network with: hf download {text} {' '.join(NATIVE_FILES)} --local-dir DIR), "
               f"given as --model DIR")
    from huggingface_hub import snapshot_download

    try:
        # The small JSON files first: they say which layout the repository holds, so only that
        # layout's weights are downloaded.
        path = Path(snapshot_download(repo_id=text, allow_patterns=["*.json"]))
        if (path / "params.json").is_file() or not layouts.is_converted(path):
            return Path(snapshot_download(repo_id=text, allow_patterns=list(native.FILES)))
        return Path(snapshot_download(repo_id=text, allow_patterns=layouts.CONVERTED_FILES))
    except Exception as e:  # network, auth, missing repo: all say the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{text}: no such directory, and it could not be downloaded from the Hugging Face "
                              f"Hub ({reason}); {offline}") from e


def open_checkpoint(source: str | os.PathLike | None) -> Checkpoint:
    """Resolve ``source`` and open it in whichever layout it holds (``voxlive.layouts``)."""
    return layouts.open_directory(resolve(source))
