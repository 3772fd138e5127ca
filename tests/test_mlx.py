"""The MLX backend against the PyTorch one on the same tiny random checkpoints, in float32.

The audio (~4.4 s) is much longer than the tiny windows (24 encoder frames, 40 decoder positions),
so both sliding windows are exercised. On Linux this runs MLX's CPU build (``mlx[cpu]``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="MLX is not installed (pip install 'mlx[cpu]' on Linux, 'mlx' on a Mac)")

from conftest import VARIED_ADAPTER_SCALE
from test_streaming import _EosEvery, _random_chunks, _stream_tokens

import voxlive
from voxlive import layouts
from voxlive.checkpoint import CheckpointError, SafetensorsFile
from voxlive.config import ConfigError
from voxlive.session import Stream
from voxlive.testing import write_random_checkpoint
from voxlive_bench.reference import offline_padded_audio

# Sizes whose every matrix input is a multiple of MLX's default quantization group (64), so every
# matrix but ada_rms_norm_t_cond.2 (32 inputs, as in the real model) is quantized.
QUANT_FRIENDLY = {"dim": 128, "hidden_dim": 256, "head_dim": 32, "encoder": {"hidden_dim": 192}}


@pytest.fixture(scope="module")
def mlx_model(varied_dir):
    return voxlive.load(varied_dir, backend="mlx", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def quant_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("quant"), "tiny", seed=2, dtype="float32",
                                   adapter_scale=VARIED_ADAPTER_SCALE, **QUANT_FRIENDLY)


@pytest.fixture(scope="module")
def quant_base(quant_dir):
    return voxlive.load(quant_dir, backend="mlx", dtype="float32", device="cpu")


def _mel(model, speech, delay_ms=480):
    return voxlive.log_mel(offline_padded_audio(speech, model.config.delay_tokens(delay_ms), model.config.audio))


def test_audio_embeddings_match_torch(mlx_model, varied_model, speech):
    mel = _mel(varied_model, speech)
    assert mel.shape[1] // 2 > 4 * varied_model.config.encoder.sliding_window
    ref = varied_model.embed_audio(mel)
    ours = mlx_model.embed_audio(mel)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("delay_ms", [480, 160])
def test_tokens_and_teacher_forced_logits_match_torch(mlx_model, varied_model, speech, delay_ms):
    ref = varied_model.transcribe(speech, delay_ms=delay_ms)
    ours = mlx_model.transcribe(speech, delay_ms=delay_ms)
    assert ours.tokens == ref.tokens and ours.text == ref.text and ours.words == ref.words
    assert len(set(ref.tokens)) >= 5
    np.testing.assert_allclose([w.probability for w in ours.words], [w.probability for w in ref.words], rtol=1e-4)

    mel = _mel(varied_model, speech, delay_ms)
    emb = varied_model.embed_audio(mel)
    ids = (varied_model.tokenizer.prompt(32, varied_model.config.delay_tokens(delay_ms)) + ref.tokens)[:-1]
    assert len(ids) > varied_model.config.decoder.sliding_window
    a = varied_model.logits(ids, emb, delay_ms=delay_ms)
    b = mlx_model.logits(ids, emb, delay_ms=delay_ms)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


@pytest.mark.parametrize("seed", range(3))
def test_streaming_equals_offline_and_torch(mlx_model, varied_model, speech, seed):
    delay_ms = [480, 160, 960][seed]
    expected = varied_model.transcribe(speech, delay_ms=delay_ms)
    streamed, words = _stream_tokens(mlx_model, speech, _random_chunks(np.random.default_rng(seed), len(speech)),
                                     delay_ms)
    assert streamed.tokens == expected.tokens
    assert streamed.words == expected.words == words


def test_tokens_fed_back_other_than_the_greedy_ones_match_torch(mlx_model, varied_model, speech):
    # Every 5th token is replaced by </s> before it is fed back: the result must equal torch's.
    results = []
    for model in (varied_model, mlx_model):
        rt = _EosEvery(model.runtime, model.tokenizer.eos)
        s = Stream(rt, model.tokenizer, model.config)
        for start in range(0, len(speech), 7000):
            s.feed(speech[start:start + 7000])
        results.append(s.finish().tokens)
    assert results[0] == results[1]
    assert results[0].count(varied_model.tokenizer.eos) >= len(results[0]) // 5


def test_calls_from_many_threads(mlx_model, speech):
    audios = [speech, speech[::-1].copy(), 0.7 * speech, speech[: len(speech) // 3]]
    expected = [mlx_model.transcribe(a).tokens for a in audios]
    seen = set()

    def run(a):
        seen.add(threading.get_ident())
        return mlx_model.transcribe(a).tokens

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(run, audios * 2)) == expected * 2
    assert len(seen) > 1


def test_mlx_work_runs_on_the_mlx_thread(mlx_model, monkeypatch):
    decoder = mlx_model.runtime.decoder
    names = []
    original = decoder.ffn_scales

    def recording(delay):
        names.append(threading.current_thread().name)
        return original(delay)

    monkeypatch.setattr(decoder, "ffn_scales", recording)
    mlx_model.runtime.new_state(6)
    with ThreadPoolExecutor(2) as pool:
        pool.submit(mlx_model.runtime.new_state, 6).result()
    assert names == ["voxlive-mlx", "voxlive-mlx"]


def test_memory_is_bounded_on_long_audio(mlx_model):
    rt = mlx_model.runtime
    s = mlx_model.stream()
    rng = np.random.default_rng(0)
    s.feed((0.1 * rng.standard_normal(16000 * 10)).astype(np.float32))
    c = mlx_model.config
    assert rt.encoder_pool.length(s.state.encoder_slot) > 10 * c.encoder.sliding_window
    assert rt.position(s.state) > 3 * c.decoder.sliding_window
    # the arrays grew to the capacity (window + drafts, in whole blocks) and no further, whatever the audio's length
    from voxlive.backends.pool import KEY_BLOCK

    def blocks(n):
        return -(-n // KEY_BLOCK) * KEY_BLOCK

    assert rt.encoder_pool.allocated == blocks(c.encoder.sliding_window)
    assert rt.decoder_pool.allocated == blocks(c.decoder.sliding_window + rt.max_draft)
    assert all(a.shape[2] == rt.decoder_pool.allocated for a in rt.decoder_pool.arrays())
    assert not s.state.pending


def _quantized_matrices(model):
    from voxlive.backends.mlx.quant import QuantizedWeight

    d = model.runtime.decoder
    found = [d.embedding] + [m for L in d.layers for m in (L.wqkv, L.wo, L.ada0, L.ada2, L.w13, L.w2)]
    found += [m for L in model.runtime.encoder.layers for m in (L.wqkv, L.wo, L.w13, L.w2)]
    found += [model.runtime.adapter.w0, model.runtime.adapter.w2]
    return [isinstance(m, QuantizedWeight) for m in found]


def test_int8_is_close_to_unquantized(quant_base, quant_dir, speech):
    q = voxlive.load(quant_dir, backend="mlx", dtype="float32", device="cpu", quantize="int8")
    flags = _quantized_matrices(q)
    assert sum(flags) == len(flags) - q.config.decoder.n_layers  # all but each layer's ada2 (32 inputs)
    base = quant_base.transcribe(speech)
    quant = q.transcribe(speech)
    assert len(set(base.tokens)) >= 5
    agree = np.mean(np.array(base.tokens) == np.array(quant.tokens))
    emb = quant_base.embed_audio(_mel(quant_base, speech))
    ids = (quant_base.tokenizer.prompt(32, 6) + base.tokens)[:-1]
    a, b = quant_base.logits(ids, emb), q.logits(ids, emb)
    err = np.abs(a - b).max() / np.abs(a).max()
    print(f"int8 vs float32: logits max error {err:.2e} of the logit scale, tokens equal {agree:.1%}")
    assert err < 2e-2
    assert agree >= 0.9
    assert np.abs(a - b).max() > 0  # it did change something


@pytest.mark.parametrize("quantize", [None, "int8", "int6", "int4"])
def test_converted_layout_round_trip(quant_base, quant_dir, speech, tmp_path, quantize):
    from voxlive.backends.mlx.convert import convert

    out = convert(quant_dir, tmp_path / "converted", quantize=quantize, dtype="float32")
    names = SafetensorsFile(out / "model.safetensors").tensors
    # the names and orders of the mlx-community (voxmlx) layout
    assert names["encoder.conv1.weight"].shape == (64, 3, 128)
    assert "language_model.layers.1.ada_norm.linear_out.weight" in names
    assert "language_model.layers.1.ada_norm.linear_out.scales" not in names
    assert "encoder.layers.0.attention.k_proj.weight" in names and "adapter.w_out.weight" in names
    assert ("language_model.embed_tokens.scales" in names) == (quantize is not None)
    config = json.loads((out / "config.json").read_text())
    bits = {None: None, "int8": 8, "int6": 6, "int4": 4}[quantize]
    assert config.get("quantization") == ({"group_size": 64, "bits": bits} if bits else None)

    loaded = voxlive.load(out, backend="mlx", dtype="float32", device="cpu")
    emb = quant_base.embed_audio(_mel(quant_base, speech))
    ids = (quant_base.tokenizer.prompt(32, 6) + quant_base.transcribe(speech).tokens)[:-1]
    ref = quant_base.logits(ids, emb)
    got = loaded.logits(ids, emb)
    if quantize is None:
        assert np.array_equal(got, ref)
    else:
        # exactly what quantizing on load gives, and within the quantization error of the original
        on_load = voxlive.load(quant_dir, backend="mlx", dtype="float32", device="cpu", quantize=quantize)
        assert np.array_equal(got, on_load.logits(ids, emb))
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{quantize} vs float32: logits max error {err:.2e} of the logit scale")
        assert err < {"int8": 2e-2, "int6": 5e-2, "int4": 0.2}[quantize]


def test_converted_layout_errors(quant_dir, tmp_path, varied_dir):
    from voxlive.backends.mlx.convert import convert

    out = convert(quant_dir, tmp_path / "c", quantize="int4", dtype="float32")
    with pytest.raises(CheckpointError, match="read by the MLX backend only"):
        voxlive.load(out, backend="torch")
    with pytest.raises(CheckpointError, match="already quantized to int4 cannot be loaded as int8"):
        voxlive.load(out, backend="mlx", quantize="int8")
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert(quant_dir, out)
    # a scales tensor without its packed weight
    f = SafetensorsFile(out / "model.safetensors")
    import mlx.core as mx

    tensors = {n: mx.array(f.read(n)) for n in f.tensors if n != "adapter.w_in.weight"}
    mx.save_safetensors(str(out / "model.safetensors"), tensors)
    with pytest.raises(CheckpointError, match="missing tensor 'adapter.w_in.weight'"):
        voxlive.load(out, backend="mlx")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 7}}))
    with pytest.raises(ConfigError, match="quantization must be"):
        voxlive.load(out, backend="mlx")
    assert not layouts.is_converted(varied_dir)


def test_cli_convert_and_transcribe(quant_dir, quant_base, speech, tmp_path):
    import soundfile as sf

    def run(*args):
        return subprocess.run([sys.executable, "-m", "voxlive.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = run("convert", quant_dir, tmp_path / "c6", "--backend", "mlx", "--quantize", "int6", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    wav = tmp_path / "s.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    r = run("transcribe", wav, "--model", tmp_path / "c6", "--backend", "mlx", "--dtype", "float32", "--format", "json")
    assert r.returncode == 0, r.stderr
    expected = voxlive.load(tmp_path / "c6", backend="mlx", dtype="float32").transcribe(speech).text
    assert json.loads(r.stdout)["text"] == expected
    r = run("bench", "--model", quant_dir, "--seconds", 1, "--backend", "mlx", "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    assert "[voxlive] cpu bfloat16, int8 weights, mlx backend" in r.stdout and "ms per pass" in r.stdout


def test_auto_backend(monkeypatch, varied_dir):
    import platform

    from voxlive.model import default_backend

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    assert default_backend() == "torch"
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert default_backend() == "mlx"  # mlx is importable here
    assert voxlive.load(varied_dir, dtype="float32").backend == "mlx"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert default_backend() == "torch"
