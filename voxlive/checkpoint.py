"""Find (or download) a checkpoint and read its tensors.

The safetensors file is read with plain positioned reads straight into the destination buffer: no
mmap that would keep the whole file resident beside the copy, no dictionary of every tensor at
once. So loading the 8.9 GB bf16 model costs ~9 GB of RSS, not twice that. Two layouts are read:
the native Mistral one and the mlx-community converted one (``mlx_layout``, possibly quantized;
the MLX backend's). The expected names and shapes come from the config, and any difference is
reported with the file and the tensor named.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mlx_layout
from .config import ModelConfig, load_config

DEFAULT_MODEL = "mistralai/Voxtral-Mini-4B-Realtime-2602"
NATIVE_FILES = ("params.json", "consolidated.safetensors", "tekken.json")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


# safetensors dtype name -> (numpy storage dtype, bytes per element). bf16 has no numpy dtype: it
# is read as uint16 bit patterns and reinterpreted by the backend.
DTYPES = {
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "U32": (np.uint32, 4),
    "I32": (np.int32, 4),
    "U8": (np.uint8, 1),
    "I8": (np.int8, 1),
    "I64": (np.int64, 8),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


class SafetensorsFile:
    """Header of a safetensors file, validated against the file's size, and reads of its tensors."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{self.path}: truncated or not a safetensors file (header of {n} bytes)")
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            try:
                dtype, shape, (lo, hi) = h["dtype"], tuple(int(s) for s in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}") from None
            if dtype not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
            if hi - lo != nbytes or lo < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has {hi - lo} bytes of data for shape {list(shape)} {dtype}"
                )
            if base + hi > size:
                raise CheckpointError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {base + hi} but the file has {size}"
                )
            self.tensors[name] = TensorInfo(name, dtype, shape, base + lo, nbytes)

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        """Read tensor ``name`` into ``out`` (a C-contiguous array of the right byte size)."""
        info = self.tensors[name]
        view = memoryview(out.reshape(-1).view(np.uint8))
        if view.nbytes != info.nbytes:
            raise CheckpointError(f"{self.path}: tensor {name!r}: buffer of {view.nbytes} bytes for {info.nbytes}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.start)
            done = 0
            while done < info.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name!r}")
                done += got
        return out

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new numpy array in its storage dtype (bf16 as uint16 bits)."""
        info = self.tensors[name]
        return self.read_into(name, np.empty(info.shape, dtype=DTYPES[info.dtype][0]))


ENCODER = "mm_streams_embeddings.embedding_module.whisper_encoder."
EMBEDDING = "mm_streams_embeddings.embedding_module.tok_embeddings.weight"
ADAPTER = "mm_streams_embeddings.embedding_module.audio_language_projection."
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


FLOAT_DTYPES = ("F32", "F16", "BF16")


class ShardedSafetensors:
    """Several safetensors files read as one (the converted layout's shards)."""

    def __init__(self, paths: list[Path]):
        self.files = [SafetensorsFile(p) for p in paths]
        self.path = paths[0] if len(paths) == 1 else paths[0].parent
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name, info in f.tensors.items():
                self.tensors[name] = info
                self._owner[name] = f

    def read_into(self, name: str, out: np.ndarray) -> np.ndarray:
        return self._owner[name].read_into(name, out)

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)


def _check_tensors(path, expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]], found: dict,
                   source: str) -> None:
    """Exactly the ``expected`` tensors (name -> shape, allowed dtypes), with shapes from ``source``."""
    _check_names(path, expected, found)
    for name, (shape, dtypes) in expected.items():
        info = found[name]
        if info.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)} from {source}"
            )
        if info.dtype not in dtypes:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info.dtype}, expected {' or '.join(dtypes)}")


def _check_names(path, expected: dict, found: dict) -> None:
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r}{more}")
    unexpected = [n for n in found if n not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}{more}")


@dataclass
class Checkpoint:
    """A resolved checkpoint: its directory, config and validated weights file(s).

    ``layout`` is "native" or "mlx" (the mlx-community converted layout, whose tensors keep their
    converted names in ``weights``; ``quantization`` is its ``{group_size, bits}`` or None).
    """

    directory: Path
    config: ModelConfig
    weights: SafetensorsFile | ShardedSafetensors
    layout: str = "native"  # "native", "mlx" (mlx-community converted) or "torch-quantized" (voxlive convert)
    quantization: dict | None = None  # mlx layout: {"group_size", "bits"}
    quantize: str | None = None  # torch-quantized layout: its mode ("int8" | "int4")

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tekken.json"

    @classmethod
    def open(cls, directory: Path) -> Checkpoint:
        directory = Path(directory)
        if mlx_layout.is_converted(directory):
            return cls._open_converted(directory)
        from .backends.torch.convert import QUANTIZED_WEIGHTS, open_quantized

        if (directory / QUANTIZED_WEIGHTS).is_file():
            return open_quantized(directory)
        for name in NATIVE_FILES:
            if not (directory / name).is_file():
                if (directory / "config.json").is_file():
                    raise CheckpointError(
                        f"{directory}: has config.json but no {name}: only the native Mistral layout "
                        f"(params.json, consolidated.safetensors, tekken.json) and the mlx-community layout "
                        f"(config.json with Mistral keys, model.safetensors, tekken.json) are supported"
                    )
                raise CheckpointError(f"{directory}: missing {name} (expected the native Mistral layout)")
        config = load_config(directory)
        weights = SafetensorsFile(directory / "consolidated.safetensors")
        ckpt = cls(directory, config, weights)
        ckpt.validate()
        return ckpt

    @classmethod
    def _open_converted(cls, directory: Path) -> Checkpoint:
        if not (directory / "tekken.json").is_file():
            raise CheckpointError(f"{directory}: missing tekken.json")
        config, quant = mlx_layout.load_converted_config(directory)
        ckpt = cls(directory, config, ShardedSafetensors(mlx_layout.weight_files(directory)), "mlx", quant)
        ckpt.validate()
        return ckpt

    def validate(self) -> None:
        """Names and shapes of the weights must be exactly what the config implies."""
        if self.layout == "mlx":
            self._validate_converted()
            return
        expected = {name: (shape, FLOAT_DTYPES) for name, shape in expected_native_tensors(self.config).items()}
        _check_tensors(self.weights.path, expected, self.weights.tensors, "params.json")

    def _validate_converted(self) -> None:
        found = self.weights.tensors
        path = self.weights.path
        q = self.quantization
        expected: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        for native, shape in expected_native_tensors(self.config).items():
            name = mlx_layout.converted_name(native)
            if mlx_layout.is_conv_weight(native):
                shape = (shape[0], shape[2], shape[1])
            weight, scales, biases = mlx_layout.quantized_parts(name)
            if q is not None and scales in found:
                out, n_in = shape
                if n_in % q["group_size"] or (n_in * q["bits"]) % 32:
                    raise CheckpointError(f"{path}: tensor {name!r} with {n_in} inputs cannot be quantized with {q}")
                expected[weight] = ((out, n_in * q["bits"] // 32), ("U32",))
                expected[scales] = expected[biases] = ((out, n_in // q["group_size"]), FLOAT_DTYPES)
            else:
                expected[name] = (shape, FLOAT_DTYPES)
        _check_tensors(path, expected, found, "config.json")


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
        if (path / "params.json").is_file() or not mlx_layout.is_converted(path):
            return Path(snapshot_download(repo_id=text, allow_patterns=list(NATIVE_FILES)))
        return Path(snapshot_download(repo_id=text, allow_patterns=["*.json", "model*.safetensors"]))
    except Exception as e:  # network, auth, missing repo: all say the same to the user
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{text}: no such directory, and it could not be downloaded from the Hugging Face "
                              f"Hub ({reason}); {offline}") from e


def open_checkpoint(source: str | os.PathLike | None) -> Checkpoint:
    return Checkpoint.open(resolve(source))
