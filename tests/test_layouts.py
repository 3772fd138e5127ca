"""The mlx-community layout as mlx-audio writes it, written here as its converter does and loaded back.

mlx-audio (``mlx_audio/stt/models/voxtral_realtime``) renames the native tensors to its module
paths (``Model.sanitize``), stores conv weights [out, kernel, in], keeps norms and biases in
float32 and the rest in float16 (or the chosen dtype), and quantizes with ``mx.quantize`` every
module its predicate admits (not the norms, the delay-conditioning MLPs or the convs; inputs a
multiple of 64). Its first converter wrote the native names instead. The writer below restates
those rules independently of ``voxlive.layouts.mlx_audio``, so the two are checked against each
other, and the loaded model against the native checkpoint it came from.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' on Linux, 'mlx' on a Mac)")

import voxlive  # noqa: E402
from voxlive.checkpoint import CheckpointError, SafetensorsFile, open_checkpoint  # noqa: E402
from voxlive.config import ConfigError  # noqa: E402
from voxlive.testing import write_random_checkpoint  # noqa: E402

# Every matrix input a multiple of 64, so mlx-audio's predicate alone decides what is quantized.
QUANT_FRIENDLY = {"dim": 128, "hidden_dim": 256, "head_dim": 32, "encoder": {"hidden_dim": 192}}
ENC = "mm_streams_embeddings.embedding_module.whisper_encoder."
MM = "mm_streams_embeddings.embedding_module."


def _ffn(path: str) -> str:
    for i in (1, 2, 3):
        path = path.replace(f"feed_forward.w{i}.", f"feed_forward_w{i}.")
    return path


def mlx_audio_name(native: str) -> str:
    """mlx-audio's ``Model.sanitize``, restated: the module path of a native tensor."""
    if native == MM + "tok_embeddings.weight":
        return "decoder.tok_embeddings.weight"
    if native == "norm.weight":
        return "decoder.norm.weight"
    if native.startswith(ENC + "conv_layers."):
        i, _, param = native[len(ENC + "conv_layers."):].split(".", 2)
        return f"encoder.conv_layers_{i}_conv.conv.{param}"
    if native.startswith(ENC + "transformer.layers."):
        i, path = native[len(ENC + "transformer.layers."):].split(".", 1)
        return f"encoder.transformer_layers.{i}.{_ffn(path)}"
    if native.startswith(ENC + "transformer.norm."):
        return "encoder.transformer_norm." + native.rsplit(".", 1)[1]
    if native.startswith(MM + "audio_language_projection."):
        i, param = native[len(MM + "audio_language_projection."):].split(".", 1)
        return f"encoder.audio_language_projection_{i}.{param}"
    assert native.startswith("layers."), native
    i, path = native[len("layers."):].split(".", 1)
    path = _ffn(path).replace("ada_rms_norm_t_cond.0.", "ada_rms_norm_t_cond.ada_down.")
    return f"decoder.layers.{i}.{path.replace('ada_rms_norm_t_cond.2.', 'ada_rms_norm_t_cond.ada_up.')}"


def mlx_audio_config(params: dict, quantization: dict | None) -> dict:
    """config.json as mlx-audio's converter builds it from params.json (and its quantizer adds to it)."""
    keys = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "norm_eps",
            "rope_theta", "sliding_window", "tied_embeddings", "ada_rms_norm_t_cond", "ada_rms_norm_t_cond_dim")
    whisper = params["multimodal"]["whisper_model_args"]
    config = {"model_type": "voxtral_realtime", "decoder": {k: params[k] for k in keys if k in params},
              "encoder_args": {**whisper["encoder_args"], **whisper["downsample_args"]},
              "transcription_delay_ms": 480}
    if quantization:
        config["quantization"] = config["quantization_config"] = {**quantization, "mode": "affine"}
    return config


def write_mlx_audio(src, out, *, dtype: str = "float16", bits: int | None = None, native_names: bool = False,
                    mixed: dict[str, int] | None = None):
    """A native checkpoint in mlx-audio's layout: module paths (or, like its first converter, the native
    names), norms and biases float32, the rest ``dtype``, quantized with ``mx.quantize`` if ``bits``;
    ``mixed`` gives some modules other bits, recorded per module in the config as its mixed recipes do."""
    mixed = mixed or {}
    out.mkdir()
    f = SafetensorsFile(src / "consolidated.safetensors")
    tensors = {}
    for native, info in f.tensors.items():
        a = mx.array(f.read(native))
        a = a.view(mx.bfloat16) if info.dtype == "BF16" else a
        name = native if native_names else mlx_audio_name(native)
        if a.ndim == 3 and not native_names:
            a = a.transpose(0, 2, 1)
        if "norm" in name or "bias" in name:
            tensors[name] = a.astype(mx.float32)
            continue
        a = a.astype(getattr(mx, dtype))
        module = name.removesuffix(".weight")
        if bits and a.ndim == 2 and a.shape[-1] % 64 == 0 and not any(
                s in module for s in ("norm", "ada_rms_norm", "conv_layers")):
            tensors[name], tensors[module + ".scales"], tensors[module + ".biases"] = mx.quantize(
                a, group_size=64, bits=mixed.get(module, bits))
        else:
            tensors[name] = a
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    params = json.loads((src / "params.json").read_text())
    quantization = {"group_size": 64, "bits": bits} if bits else None
    config = mlx_audio_config(params, quantization)
    for module, b in mixed.items():
        config["quantization"][module] = {"group_size": 64, "bits": b, "mode": "affine"}
    (out / "config.json").write_text(json.dumps(config, indent=4))
    shutil.copy(src / "tekken.json", out / "tekken.json")
    return out


def _inputs(model, seconds: float = 3.0):
    """Audio embeddings of noise and a teacher-forcing sequence as long as they are."""
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    audio = np.pad(audio, (32 * 1280, -len(audio) % 1280 + 8 * 1280))
    emb = model.embed_audio(voxlive.log_mel(audio))
    ids = model.tokenizer.prompt(32, 6)
    ids += rng.integers(1000, model.config.decoder.vocab_size, len(emb) - len(ids)).tolist()
    return emb, ids


@pytest.fixture(scope="module")
def float_source(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("native32"), "tiny", seed=3, dtype="float32",
                                   adapter_scale=100.0, **QUANT_FRIENDLY)


@pytest.mark.parametrize("dtype,native_names", [("float16", False), ("bfloat16", False), ("float16", True)])
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_mlx_audio_float_layout_loads_the_native_weights_exactly(tmp_path, dtype, native_names, backend):
    # The source in the variant's dtype, so the converted file holds exactly its values.
    src = write_random_checkpoint(tmp_path / "native", "tiny", seed=4, dtype=dtype, adapter_scale=100.0,
                                  **QUANT_FRIENDLY)
    out = write_mlx_audio(src, tmp_path / "mlx-audio", dtype=dtype, native_names=native_names)
    ckpt = open_checkpoint(out)
    assert ckpt.layout == "mlx-audio" and not ckpt.packed
    assert ("decoder.norm.weight" in ckpt.weights.tensors) == (not native_names)

    native = voxlive.load(src, backend=backend, dtype="float32", device="cpu")
    converted = voxlive.load(out, backend=backend, dtype="float32", device="cpu")
    emb, ids = _inputs(native)
    assert np.array_equal(converted.embed_audio(voxlive.log_mel(np.zeros(40 * 1280, np.float32))),
                          native.embed_audio(voxlive.log_mel(np.zeros(40 * 1280, np.float32))))
    ref = native.logits(ids, emb)
    assert len(set(ref.argmax(-1).tolist())) >= 5  # the logits vary: the comparison is not of constants
    assert np.array_equal(converted.logits(ids, emb), ref)


@pytest.mark.parametrize("bits,bound", [(8, 2e-2), (4, 0.2)])
def test_mlx_audio_quantized_layout_within_the_quantization_error(float_source, tmp_path, bits, bound):
    out = write_mlx_audio(float_source, tmp_path / "q", bits=bits)
    ckpt = open_checkpoint(out)
    assert ckpt.layout == "mlx-audio" and ckpt.quantization == {"group_size": 64, "bits": bits}
    # what mlx-audio quantizes and what it leaves in float, read from the file
    assert "layers.0.attention.wq.weight" in ckpt.packed and MM + "tok_embeddings.weight" in ckpt.packed
    assert "layers.0.ada_rms_norm_t_cond.0.weight" not in ckpt.packed
    assert ENC + "conv_layers.0.conv.weight" in ckpt.transposed

    native = voxlive.load(float_source, backend="mlx", dtype="float32", device="cpu")
    quant = voxlive.load(out, backend="mlx", dtype="float32", device="cpu")
    emb, ids = _inputs(native)
    ref, got = native.logits(ids, emb), quant.logits(ids, emb)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"mlx-audio {bits}-bit vs float32: logits max error {err:.2e} of the logit scale")
    assert 0 < err < bound
    audio_err = np.abs(quant.embed_audio(voxlive.log_mel(np.zeros(40 * 1280, np.float32)))
                       - native.embed_audio(voxlive.log_mel(np.zeros(40 * 1280, np.float32))))
    assert audio_err.max() > 0  # the encoder and adapter were read quantized too
    with pytest.raises(CheckpointError, match="read by the MLX backend only"):
        voxlive.load(out, backend="torch")
    with pytest.raises(CheckpointError, match=f"already quantized to int{bits} cannot be loaded as int6"):
        voxlive.load(out, backend="mlx", quantize="int6")


def test_mlx_audio_mixed_recipe_reads_each_module_at_its_bits(float_source, tmp_path):
    out = write_mlx_audio(float_source, tmp_path / "mixed", bits=4, mixed={"decoder.layers.0.attention.wo": 8,
                                                                         "decoder.tok_embeddings": 6})
    ckpt = open_checkpoint(out)
    assert ckpt.packed["layers.0.attention.wo.weight"].bits == 8 and ckpt.packed[MM + "tok_embeddings.weight"].bits == 6
    assert ckpt.packed["layers.1.attention.wo.weight"].bits == 4
    native = voxlive.load(float_source, backend="mlx", dtype="float32", device="cpu")
    quant = voxlive.load(out, backend="mlx", dtype="float32", device="cpu")
    emb, ids = _inputs(native)
    ref = native.logits(ids, emb)
    assert np.abs(quant.logits(ids, emb) - ref).max() < 0.2 * np.abs(ref).max()
    # q, k and v at different bits: voxlive multiplies them as one matrix, so it refuses, with the reason
    out = write_mlx_audio(float_source, tmp_path / "mixed-qkv", bits=4, mixed={"decoder.layers.0.attention.wv": 8})
    with pytest.raises(CheckpointError, match="quantized with different bits .* cannot read this mixed recipe"):
        voxlive.load(out, backend="mlx", dtype="float32", device="cpu")


def test_voxmlx_float_layout_loads_on_torch_exactly(float_source, tmp_path):
    from voxlive.backends.mlx.convert import convert

    out = convert(float_source, tmp_path / "voxmlx", dtype="float32")
    native = voxlive.load(float_source, backend="torch", dtype="float32", device="cpu")
    converted = voxlive.load(out, backend="torch", dtype="float32", device="cpu")
    assert open_checkpoint(out).layout == "voxmlx"
    emb, ids = _inputs(native)
    assert np.array_equal(converted.logits(ids, emb), native.logits(ids, emb))
    mel = voxlive.log_mel(np.zeros(40 * 1280, np.float32))
    assert np.array_equal(converted.embed_audio(mel), native.embed_audio(mel))


def test_mlx_audio_layout_errors(float_source, tmp_path):
    out = write_mlx_audio(float_source, tmp_path / "q", bits=4)
    config = json.loads((out / "config.json").read_text())

    (out / "config.json").write_text(json.dumps({**config, "quantization": {**config["quantization"], "mode": "mxfp4"}}))
    with pytest.raises(ConfigError, match="only MLX's affine mode"):
        open_checkpoint(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "decoder"}))
    with pytest.raises(ConfigError, match="no 'decoder' and 'encoder_args'"):
        open_checkpoint(out)
    del config["decoder"]["n_kv_heads"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: missing key 'n_kv_heads'"):
        open_checkpoint(out)
    # a config.json of neither converter: the message says which layouts are read
    (out / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    with pytest.raises(CheckpointError, match="neither voxmlx's .* nor mlx-audio's"):
        open_checkpoint(out)


def test_mlx_audio_layout_tensor_errors(float_source, tmp_path):
    out = write_mlx_audio(float_source, tmp_path / "q", bits=4)
    f = SafetensorsFile(out / "model.safetensors")
    tensors = {n: mx.array(f.read(n)) for n in f.tensors if n != "decoder.layers.1.attention.wo.biases"}
    mx.save_safetensors(str(out / "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match="missing tensor 'decoder.layers.1.attention.wo.biases'"):
        open_checkpoint(out)
