"""Checkpoint loading: the native layout, and clear errors for every way a checkpoint can be broken."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

import voxlive
from voxlive.checkpoint import CheckpointError, SafetensorsFile, expected_native_tensors, open_checkpoint, resolve
from voxlive.config import ConfigError
from voxlive.testing import make_params, write_random_checkpoint

EMBED = "mm_streams_embeddings.embedding_module.tok_embeddings.weight"


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, drop=(), add=None, reshape=None):
    """Rewrite a safetensors file with tensors dropped, added or given a new shape."""
    f = SafetensorsFile(path)
    tensors = {n: f.read(n) for n in f.tensors if n not in drop}
    if reshape:
        name, shape = reshape
        tensors[name] = np.zeros(shape, dtype=tensors[name].dtype)
    if add:
        tensors.update(add)
    header, blobs, off = {}, [], 0
    for n, a in tensors.items():
        header[n] = {"dtype": {np.dtype("float32"): "F32", np.dtype("uint16"): "BF16"}[a.dtype],
                     "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        blobs.append(a.tobytes())
        off += a.nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_random_checkpoint_layout(tiny_dir):
    ckpt = open_checkpoint(tiny_dir)
    expected = expected_native_tensors(ckpt.config)
    assert set(ckpt.weights.tensors) == set(expected)
    assert {n: t.shape for n, t in ckpt.weights.tensors.items()} == expected
    full = make_params("full")
    assert full["dim"] == 3072 and full["n_layers"] == 26 and full["vocab_size"] == 131072
    assert full["multimodal"]["whisper_model_args"]["encoder_args"]["sliding_window"] == 750


def test_full_size_tensor_count():
    # The real checkpoint has 711 tensors; the full-size table must list exactly those.
    from voxlive.config import parse_config
    from voxlive.testing import AUDIO_SECTION

    assert len(expected_native_tensors(parse_config(make_params("full"), AUDIO_SECTION))) == 711


def test_bf16_and_float32_checkpoints_load_the_same_values(tmp_path):
    a = voxlive.load(write_random_checkpoint(tmp_path / "bf", "tiny", seed=3, dtype="bfloat16"), dtype="float32")
    b = voxlive.load(write_random_checkpoint(tmp_path / "f32", "tiny", seed=3, dtype="float32"), dtype="float32")
    # bf16 on disk is the float32 value rounded: equal to bf16 precision
    ea, eb = a.runtime.decoder.embedding, b.runtime.decoder.embedding
    assert ea.dtype == eb.dtype
    assert float((ea - eb).abs().max()) <= float(eb.abs().max()) * 2 ** -8
    assert float((ea - eb).abs().max()) > 0


def test_missing_tensor_names_file_and_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    name = "layers.1.feed_forward.w2.weight"
    _rewrite(d / "consolidated.safetensors", drop=[name])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors.*missing tensor 'layers\.1\.feed_forward\.w2\.weight'"):
        voxlive.load(d)


def test_unexpected_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _rewrite(d / "consolidated.safetensors", add={"output.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'output\.weight'"):
        voxlive.load(d)


def test_misshapen_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    _rewrite(d / "consolidated.safetensors", reshape=(EMBED, (2048, 95)))
    with pytest.raises(CheckpointError, match=r"tok_embeddings\.weight' has shape \[2048, 95\], expected \[2048, 96\]"):
        voxlive.load(d)


def test_truncated_safetensors(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    f = d / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: truncated: tensor '.*' ends at byte"):
        voxlive.load(d)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        voxlive.load(d)


def test_corrupt_header(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    f = d / "consolidated.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        voxlive.load(d)


def test_inconsistent_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    params = json.loads((d / "params.json").read_text())
    params["n_kv_heads"] = 3
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        voxlive.load(d)
    # a config that is consistent in itself but does not match the weights names the tensor
    params["n_kv_heads"] = 4
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wk\.weight' has shape"):
        voxlive.load(d)


def test_config_missing_key_and_bad_json(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    params = json.loads((d / "params.json").read_text())
    del params["multimodal"]["whisper_model_args"]["encoder_args"]["sliding_window"]
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(ConfigError, match=r"params\.json: missing key 'sliding_window'"):
        voxlive.load(d)
    (d / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"params\.json: not valid JSON"):
        voxlive.load(d)


def test_tekken_without_audio_section(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    tekken = json.loads((d / "tekken.json").read_text())
    del tekken["audio"]
    (d / "tekken.json").write_text(json.dumps(tekken))
    with pytest.raises(ConfigError, match=r"tekken\.json: no 'audio' section"):
        voxlive.load(d)


def test_missing_files_and_sources(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    (d / "tekken.json").unlink()
    with pytest.raises(CheckpointError, match="missing tekken.json"):
        voxlive.load(d)
    with pytest.raises(CheckpointError, match="no such directory, and not a Hugging Face repo id"):
        resolve(str(tmp_path / "nope" / "deeper"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        resolve(tmp_path / "file")


def test_hub_download_failure_is_clear(monkeypatch, tmp_path):
    # The real download code runs; with the hub unreachable (offline mode) it must say what failed.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match="voxlive-test/does-not-exist: no such directory, and it could not be downloaded"):
        resolve("voxlive-test/does-not-exist")


def test_delay_validation(tiny_dir):
    m = voxlive.load(tiny_dir, dtype="float32")
    assert m.config.delay_tokens(None) == 6
    assert m.config.delay_tokens(80) == 1 and m.config.delay_tokens(1200) == 15 and m.config.delay_tokens(2400) == 30
    for bad in (0, 40, 100, 1280, 2000, -80, 480.0, "480", True):
        with pytest.raises(ValueError, match="delay_ms must be a multiple of 80"):
            m.stream(delay_ms=bad)


def test_load_argument_errors(tiny_dir):
    with pytest.raises(ValueError, match="backend must be one of"):
        voxlive.load(tiny_dir, backend="jax")
    with pytest.raises(ValueError, match="dtype must be one of"):
        voxlive.load(tiny_dir, dtype="int3")
    with pytest.raises(ValueError, match="quantize must be one of"):
        voxlive.load(tiny_dir, quantize="int3")
