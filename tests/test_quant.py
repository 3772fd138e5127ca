"""Weight-only quantization: the kernels against a dequantized float32 matmul, the error of the
quantizer, the accuracy of quantized models against the float one, and quantized checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import voxlive
from voxlive.backends.torch.convert import QUANTIZED_WEIGHTS, write_quantized
from voxlive.backends.torch.quant import QUANTIZED, linear, quantize
from voxlive.checkpoint import CheckpointError, SafetensorsFile, open_checkpoint
from voxlive_bench.reference import offline_padded_audio


def dequantized(parts: dict[str, torch.Tensor], scheme: str) -> torch.Tensor:
    """The float32 matrix a stored form stands for, written out from its documented layout."""
    if scheme == "int8":
        return parts["q"].float() * parts["scale"].float()[:, None]
    q = parts["q"]
    values = torch.stack((q >> 4, q & 15), dim=-1).reshape(q.shape[0], -1).float()
    n, k = values.shape
    groups = parts["scale"].shape[1]
    scale = parts["scale"].float().repeat_interleave(k // groups, dim=1)
    zero = parts["zero"].float().repeat_interleave(k // groups, dim=1)
    return (values - 8) * scale + zero


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantizer_error_is_within_one_step(scheme):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 3
    parts = quantize(w, scheme)
    in_blocks = quantize(w, scheme, block_rows=5)
    assert all(torch.equal(parts[k], in_blocks[k]) for k in parts)
    err = (dequantized(parts, scheme) - w).abs()
    if scheme == "int8":
        step = parts["scale"].float()[:, None].expand_as(w)
    else:
        step = parts["scale"].float().repeat_interleave(256 // parts["scale"].shape[1], dim=1)
    assert (err <= step).all()  # rounding is half a step; a bf16-rounded scale may clip at most one
    assert err.mean() < 0.3 * step.mean()
    assert err.max() < {"int8": 0.01, "int4": 0.1}[scheme] * w.abs().max()


@pytest.mark.parametrize("scheme,kernel", [("int8", True), ("int8", False), ("int4", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_dequantized_matmul(scheme, kernel, dtype):
    g = torch.Generator().manual_seed(1)
    n, k = 48, 192
    parts = quantize(torch.randn(n, k, generator=g), scheme)
    weight = QUANTIZED[scheme].from_stored(parts, dtype, torch.device("cpu"), kernel=kernel)
    x = torch.randn(2, 7, k, generator=g)
    expected = x @ dequantized(parts, scheme).T
    got = linear(x.to(dtype), weight, bias=torch.ones(n, dtype=dtype)).float() - 1
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert got.shape == (2, 7, n)
    assert (got - expected).abs().max() <= tol * expected.abs().max()
    # the kernels compute each row on its own: the same alone as among others (batched == single)
    assert not kernel or torch.equal(linear(x[1, 3:4].to(dtype), weight), linear(x.to(dtype), weight)[1, 3:4])


def test_int8_rows_are_the_dequantized_embedding():
    parts = quantize(torch.randn(40, 32), "int8")
    weight = QUANTIZED["int8"].from_stored(parts, torch.float32, torch.device("cpu"))
    ids = torch.tensor([3, 0, 39, 3])
    assert torch.equal(weight.rows(ids), dequantized(parts, "int8")[ids])


@pytest.fixture(scope="module")
def teacher_forcing(varied_model, speech):
    """Float32 model's greedy tokens, audio embeddings and teacher-forced logits on speech."""
    tokens = varied_model.transcribe(speech).tokens
    mel = voxlive.log_mel(offline_padded_audio(speech, 6, varied_model.config.audio))
    embeds = varied_model.embed_audio(mel)
    ids = varied_model.tokenizer.prompt(32, 6) + tokens[:-1]
    return tokens, mel, embeds, ids, varied_model.logits(ids, embeds)


@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.03)])
def test_quantized_model_accuracy(varied_dir, speech, teacher_forcing, mode, bound):
    tokens, mel, embeds, ids, logits = teacher_forcing
    model = voxlive.load(varied_dir, dtype="float32", device="cpu", quantize=mode)
    scale = np.abs(logits).max()
    # the decoder alone, on the float model's audio embeddings
    decoder_only = model.logits(ids, embeds)
    assert np.abs(decoder_only - logits).max() <= bound * scale
    assert np.abs(decoder_only - logits).max() > 1e-4 * scale  # it is quantized
    # encoder and decoder
    whole = model.logits(ids, model.embed_audio(mel))
    assert np.abs(whole - logits).max() <= 2 * bound * scale
    assert (whole.argmax(-1) == logits.argmax(-1)).mean() >= 0.95
    greedy = model.transcribe(speech).tokens
    assert len(greedy) == len(tokens)
    assert np.mean([a == b for a, b in zip(greedy, tokens)]) >= 0.75


def test_quantized_streaming_equals_offline(varied_dir, speech):
    # float32 activations, as in test_streaming: in bfloat16 chunk sizes change the rounding of the
    # float model too (GEMM and attention blocking), and a near-tie can flip a token.
    model = voxlive.load(varied_dir, dtype="float32", device="cpu", quantize="int4")
    offline = model.transcribe(speech)
    s = model.stream()
    for start in range(0, len(speech), 3333):
        s.feed(speech[start:start + 3333])
    assert s.finish().tokens == offline.tokens


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_converted_checkpoint_loads_to_the_same_model(varied_dir, speech, teacher_forcing, tmp_path, mode):
    _, _, embeds, ids, _ = teacher_forcing
    out = write_quantized(open_checkpoint(varied_dir), tmp_path / mode, mode)
    assert sorted(p.name for p in out.iterdir()) == ["params.json", QUANTIZED_WEIGHTS, "tekken.json"]
    converted = voxlive.load(out, dtype="float32", device="cpu")
    assert converted.runtime.quantize == mode
    at_load = voxlive.load(varied_dir, dtype="float32", device="cpu", quantize=mode)
    assert np.array_equal(converted.logits(ids, embeds), at_load.logits(ids, embeds))
    assert converted.transcribe(speech).tokens == at_load.transcribe(speech).tokens
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(CheckpointError, match=f"cannot be loaded as {other}"):
        voxlive.load(out, device="cpu", quantize=other)
    with pytest.raises(CheckpointError, match="already quantized"):
        write_quantized(open_checkpoint(out), tmp_path / "again", mode)


def _rewrite_metadata(path, **changes):
    """Change the safetensors metadata in place (same header length, padded with spaces)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) <= n
    path.write_bytes(raw[:8] + blob + b" " * (n - len(blob)) + raw[8 + n:])


def test_converted_checkpoint_of_another_format_version_is_refused(varied_dir, tmp_path):
    out = write_quantized(open_checkpoint(varied_dir), tmp_path / "q", "int8")
    assert SafetensorsFile(out / QUANTIZED_WEIGHTS).metadata["format_version"] == "1"
    _rewrite_metadata(out / QUANTIZED_WEIGHTS, format_version="0")
    with pytest.raises(CheckpointError, match="format version 0"):
        voxlive.load(out, device="cpu")
    _rewrite_metadata(out / QUANTIZED_WEIGHTS, format_version="1", quantize="int4")
    with pytest.raises(CheckpointError, match="is I8 .* expected U8|missing tensor"):
        voxlive.load(out, device="cpu")


def test_int6_is_refused_on_torch(varied_dir):
    with pytest.raises(ValueError, match="int6 is MLX only"):
        voxlive.load(varied_dir, device="cpu", quantize="int6")


def test_convert_command(varied_dir, tmp_path):
    out = tmp_path / "int4"
    r = subprocess.run([sys.executable, "-m", "voxlive.cli", "convert", str(varied_dir), str(out), "--quantize", "int4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert open_checkpoint(out).quantize == "int4"
    r = subprocess.run([sys.executable, "-m", "voxlive.cli", "convert", str(varied_dir), str(tmp_path / "x"),
                        "--quantize", "int6"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "MLX only" in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_linear_on_cuda(scheme):
    g = torch.Generator().manual_seed(2)
    n, k = 256, 512
    parts = quantize(torch.randn(n, k, generator=g), scheme)
    weight = QUANTIZED[scheme].from_stored(parts, torch.bfloat16, torch.device("cuda"))
    x = torch.randn(5, k, generator=g)
    expected = x @ dequantized(parts, scheme).T
    got = linear(x.to("cuda", torch.bfloat16), weight).float().cpu()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quantized_model_on_cuda_matches_cpu(varied_dir, speech):
    cpu = voxlive.load(varied_dir, dtype="bfloat16", device="cpu", quantize="int8").transcribe(speech).tokens
    cuda = voxlive.load(varied_dir, dtype="bfloat16", device="cuda", quantize="int8").transcribe(speech).tokens
    assert np.mean([a == b for a, b in zip(cpu, cuda)]) >= 0.9
