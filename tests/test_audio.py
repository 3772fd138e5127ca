"""Tests for voxlive.audio on real files: espeak-ng speech, sox conversions, PyAV encodes."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

import av
import numpy as np
import pytest
import soundfile as sf
import soxr

from voxlive.audio import (
    SAMPLE_RATE,
    AudioError,
    decode_pcm16,
    load_audio,
    resample,
    to_mono,
)

SPEECH_TEXT = "The quick brown fox jumps over the lazy dog. Testing one, two, three."


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed")
    return path


def _sox(*args) -> None:
    subprocess.run([_need("sox"), *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory):
    """espeak-ng speech: 16-bit mono WAV at 22050 Hz, about 4 s long."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([_need("espeak-ng"), "-w", str(path), SPEECH_TEXT], check=True, capture_output=True)
    info = sf.info(str(path))
    assert info.samplerate == 22050 and info.channels == 1 and info.duration > 2.0
    return path


@pytest.fixture(scope="module")
def speech(speech_wav):
    """(samples float32, rate) of the speech WAV, read directly with soundfile."""
    audio, rate = sf.read(str(speech_wav), dtype="float32")
    return audio, rate


@pytest.fixture(scope="module")
def speech_16k(speech):
    audio, rate = speech
    return soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def _aligned_corr(ref: np.ndarray, x: np.ndarray, max_lag: int) -> float:
    """Correlation after shifting ``x`` by the best lag within +-max_lag (codecs add delay)."""
    n = min(len(ref), len(x))
    a, b = ref[:n].astype(np.float64), x[:n].astype(np.float64)
    size = 2 * n
    xc = np.fft.irfft(np.fft.rfft(b, size) * np.conj(np.fft.rfft(a, size)), size)  # xc[k] = sum a[i] b[i+k]
    lags = np.r_[0 : max_lag + 1, -max_lag:0]
    lag = int(lags[np.argmax(np.r_[xc[: max_lag + 1], xc[-max_lag:]])])
    if lag >= 0:
        a, b = a[: n - lag], b[lag:]
    else:
        a, b = a[-lag:], b[: n + lag]
    return float(np.corrcoef(a, b)[0, 1])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _encode(path, container_format: str, codec: str, audio: np.ndarray, rate: int, enc_rate: int,
            video: bool = False) -> None:
    """Encode mono float audio with PyAV (there is no ffmpeg binary here)."""
    with av.open(str(path), "w", format=container_format) as out:
        if video:
            vstream = out.add_stream("mpeg4", rate=10)
            vstream.width, vstream.height, vstream.pix_fmt = 64, 48, "yuv420p"
        stream = out.add_stream(codec, rate=enc_rate)
        stream.layout = "mono"
        stream.bit_rate = 96000
        ctx = stream.codec_context
        resampler = av.AudioResampler(
            format=ctx.codec.audio_formats[0].name, layout="mono", rate=enc_rate,
            frame_size=ctx.frame_size or 1024,
        )
        frame = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        frames = resampler.resample(frame) + resampler.resample(None)
        if video:
            for i in range(int(len(audio) / rate * 10)):
                img = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i % 255, np.uint8), format="rgb24")
                for packet in vstream.encode(img):
                    out.mux(packet)
            for packet in vstream.encode(None):
                out.mux(packet)
        for f in frames:
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


# ----------------------------------------------------------------------------- files


def test_wav_22k_to_16k(speech_wav, speech, speech_16k):
    orig, rate = speech
    out = load_audio(speech_wav)
    assert out.dtype == np.float32 and out.ndim == 1 and out.flags.c_contiguous
    assert abs(len(out) / SAMPLE_RATE - len(orig) / rate) <= 1e-3
    np.testing.assert_allclose(out, speech_16k[: len(out)], atol=1e-5)
    assert len(out) == len(speech_16k)


def test_path_like_and_custom_rate(speech_wav, speech):
    orig, rate = speech
    a = load_audio(str(speech_wav))
    b = load_audio(speech_wav)  # pathlib.Path
    np.testing.assert_array_equal(a, b)
    out8k = load_audio(speech_wav, sample_rate=8000)
    assert abs(len(out8k) / 8000 - len(orig) / rate) <= 1e-3
    same = load_audio(speech_wav, sample_rate=rate)
    np.testing.assert_array_equal(same, orig)  # identity, no resampling


def test_stereo_flac_44k(tmp_path, speech_wav, speech_16k):
    flac = tmp_path / "stereo.flac"
    _sox(speech_wav, "-r", "44100", "-c", "2", flac)
    info = sf.info(str(flac))
    assert info.channels == 2 and info.samplerate == 44100
    out = load_audio(flac)
    assert out.ndim == 1 and out.dtype == np.float32
    assert abs(len(out) - len(speech_16k)) <= 16  # within 1 ms
    assert _corr(out, speech_16k) > 0.99
    n = min(len(out), len(speech_16k))
    assert np.max(np.abs(out[:n] - speech_16k[:n])) < 0.05


def test_stereo_channels_are_averaged(tmp_path):
    t = np.arange(16000) / 16000
    left = 0.5 * np.sin(2 * np.pi * 300 * t)
    right = 0.25 * np.sin(2 * np.pi * 700 * t)
    path = tmp_path / "lr.wav"
    sf.write(str(path), np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-6)


def test_8k_file(tmp_path, speech_wav, speech_16k):
    path = tmp_path / "speech8k.wav"
    _sox(speech_wav, "-r", "8000", path)
    out = load_audio(path)
    assert abs(len(out) - len(speech_16k)) <= 16
    # 8 kHz drops everything above 4 kHz; the speech itself survives.
    assert _corr(out, speech_16k) > 0.9


def test_int16_wav_scaling(tmp_path):
    values = np.array([0, 16384, -16384, 32767, -32768, 1, -1], dtype=np.int16)
    path = tmp_path / "int16.wav"
    sf.write(str(path), np.tile(values, 100), SAMPLE_RATE, subtype="PCM_16")
    out = load_audio(path)
    assert out.min() >= -1.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out[: len(values)], values.astype(np.float32) / 32768)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_24", "PCM_32", "DOUBLE"])
def test_other_wav_sample_formats(tmp_path, subtype):
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    ref = 0.8 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"{subtype}.wav"
    sf.write(str(path), ref, SAMPLE_RATE, subtype=subtype)
    out = load_audio(path)
    np.testing.assert_allclose(out, ref, atol=1 / 100 if subtype == "PCM_U8" else 1e-4)


def test_ogg_vorbis(tmp_path, speech, speech_16k):
    orig, rate = speech
    path = tmp_path / "speech.ogg"
    sf.write(str(path), orig, rate, format="OGG", subtype="VORBIS")
    out = load_audio(path)
    assert abs(len(out) - len(speech_16k)) <= 16
    assert _aligned_corr(speech_16k, out, 32) > 0.9


# name, container format, codec, encoder rate, soundfile can read it?
ENCODED = [
    ("speech.mp3", "mp3", "libmp3lame", 22050),
    ("speech.m4a", "ipod", "aac", 44100),
    ("speech.webm", "webm", "libopus", 48000),
    ("speech.opus", "ogg", "libopus", 48000),
]


@pytest.mark.parametrize("name,fmt,codec,enc_rate", ENCODED, ids=[e[0] for e in ENCODED])
def test_lossy_encoded(tmp_path, speech, speech_16k, name, fmt, codec, enc_rate):
    orig, rate = speech
    path = tmp_path / name
    _encode(path, fmt, codec, orig, rate, enc_rate)
    out = load_audio(path)
    assert out.dtype == np.float32 and out.ndim == 1
    # Encoders add priming/padding; decoders trim most of it.
    assert abs(len(out) / SAMPLE_RATE - len(orig) / rate) < 0.05
    assert 0.8 < _rms(out) / _rms(speech_16k) < 1.25
    assert _aligned_corr(speech_16k, out, 1600) > 0.9


@pytest.mark.parametrize("name,fmt", [("speech.m4a", "ipod"), ("speech.webm", "webm")])
def test_pyav_fallback_formats(tmp_path, speech, name, fmt):
    """M4A and WebM are beyond libsndfile: these exercise the PyAV path."""
    orig, rate = speech
    path = tmp_path / name
    _encode(path, fmt, "aac" if fmt == "ipod" else "libopus", orig, rate, 48000)
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))
    assert len(load_audio(path)) > 0


def test_video_container_with_audio(tmp_path, speech, speech_16k):
    orig, rate = speech
    path = tmp_path / "video.mp4"
    _encode(path, "mp4", "aac", orig, rate, 44100, video=True)
    with av.open(str(path)) as c:
        assert c.streams.video and c.streams.audio
    out = load_audio(path)
    assert abs(len(out) / SAMPLE_RATE - len(orig) / rate) < 0.05
    assert _aligned_corr(speech_16k, out, 1600) > 0.9


def test_video_without_audio(tmp_path):
    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(10):
            img = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(img):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioError, match="no audio stream") as exc:
        load_audio(path)
    assert str(path) in str(exc.value)


# ----------------------------------------------------------------------------- bytes


def test_bytes_equal_path(speech_wav, tmp_path, speech):
    data = speech_wav.read_bytes()
    ref = load_audio(speech_wav)
    for source in (data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(load_audio(source), ref)
    # also through the PyAV path
    orig, rate = speech
    m4a = tmp_path / "speech.m4a"
    _encode(m4a, "ipod", "aac", orig, rate, 44100)
    np.testing.assert_array_equal(load_audio(m4a.read_bytes()), load_audio(m4a))


def test_bytes_errors_name_bytes():
    with pytest.raises(AudioError, match="<bytes>"):
        load_audio(b"")
    with pytest.raises(AudioError, match="<bytes>"):
        load_audio(os.urandom(4000))


# ----------------------------------------------------------------------------- arrays


def test_array_float32_passthrough():
    x = (np.random.default_rng(0).standard_normal(16000) * 0.1).astype(np.float32)
    out = load_audio(x)
    np.testing.assert_array_equal(out, x)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    # no resampling for arrays, whatever sample_rate says: the caller states the rate
    assert len(load_audio(x, sample_rate=8000)) == len(x)


def test_array_dtypes_and_layouts():
    f64 = np.linspace(-1, 1, 101)
    out = load_audio(f64)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, f64, atol=1e-7)

    i16 = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_array_equal(load_audio(i16), i16 / np.float32(32768))

    non_contig = np.zeros(200, np.float32)[::2]
    assert load_audio(non_contig).flags.c_contiguous

    stereo = np.stack([np.full(50, 0.5), np.full(50, -0.1)], axis=1).astype(np.float32)
    np.testing.assert_allclose(load_audio(stereo), np.full(50, 0.2), atol=1e-7)

    stereo_i16 = np.array([[32767, -32768], [16384, 16384]], dtype=np.int16)
    np.testing.assert_allclose(load_audio(stereo_i16), [-0.5 / 32768, 0.5], atol=1e-7)


def test_array_errors():
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(np.zeros(0, np.float32))
    with pytest.raises(AudioError):
        load_audio(np.zeros((4, 4, 4), np.float32))
    with pytest.raises(AudioError, match="channels"):
        load_audio(np.zeros((2, 16000), np.float32))  # [channels, samples] by mistake
    with pytest.raises(AudioError, match="dtype"):
        load_audio(np.zeros(10, dtype=complex))
    with pytest.raises(TypeError):
        load_audio([0.0, 0.1])


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="not found") as exc:
        load_audio(path)
    assert str(path) in str(exc.value)


def test_directory(tmp_path):
    with pytest.raises(AudioError, match="not a file"):
        load_audio(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match="empty") as exc:
        load_audio(path)
    assert str(path) in str(exc.value)


def test_random_bytes_file(tmp_path):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 8000, dtype=np.uint8).tobytes())
    with pytest.raises(AudioError, match="cannot decode") as exc:
        load_audio(path)
    msg = str(exc.value)
    assert str(path) in msg and "soundfile" in msg and "PyAV" in msg


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not audio\n" * 50)
    with pytest.raises(AudioError, match="cannot decode") as exc:
        load_audio(path)
    assert str(path) in str(exc.value)


def test_truncated_wav_returns_prefix(tmp_path, speech_wav, caplog):
    full = load_audio(speech_wav)
    data = speech_wav.read_bytes()
    path = tmp_path / "half.wav"
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="voxlive"):
        out = load_audio(path)
    assert abs(len(out) - len(full) / 2) < 0.01 * len(full)
    n = len(out) - 64  # resampler edge
    np.testing.assert_allclose(out[:n], full[:n], atol=1e-4)
    assert any("truncated" in r.getMessage() and "half.wav" in r.getMessage() for r in caplog.records)


def test_truncated_flac_returns_prefix(tmp_path, speech_wav, caplog):
    flac = tmp_path / "speech.flac"
    _sox(speech_wav, flac)
    data = flac.read_bytes()
    cut = tmp_path / "cut.flac"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="voxlive"):
        out = load_audio(cut)
    full = load_audio(flac)
    assert 0.3 * len(full) < len(out) < 0.7 * len(full)
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_truncated_webm_returns_prefix(tmp_path, speech, caplog):
    """A cut stream on the PyAV path also keeps what decodes."""
    orig, rate = speech
    path = tmp_path / "speech.webm"
    _encode(path, "webm", "libopus", orig, rate, 48000)
    data = path.read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(data[: len(data) // 2])
    out = load_audio(cut)
    full = load_audio(path)
    assert 0.3 * len(full) < len(out) < 0.7 * len(full)


def test_wav_header_only(tmp_path, speech_wav):
    path = tmp_path / "header.wav"
    path.write_bytes(speech_wav.read_bytes()[:44])
    with pytest.raises(AudioError, match="no audio samples") as exc:
        load_audio(path)
    assert str(path) in str(exc.value)


def test_valid_wav_with_zero_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(str(path), np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(path)


def test_bad_sample_rate(speech_wav):
    with pytest.raises(ValueError):
        load_audio(speech_wav, sample_rate=0)


# ----------------------------------------------------------------------------- helpers


def test_resample_quality_and_identity():
    t = np.arange(44100) / 44100
    x = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    same = resample(x, 44100, 44100)
    np.testing.assert_array_equal(same, x)
    y = resample(x, 44100)
    assert y.dtype == np.float32 and len(y) == 16000
    t16 = np.arange(16000) / 16000
    ref = np.sin(2 * np.pi * 440 * t16)
    np.testing.assert_allclose(y[200:-200], ref[200:-200], atol=1e-3)
    assert resample(np.zeros(0, np.float32), 8000).shape == (0,)
    stereo = resample(np.stack([x, x], axis=1), 44100, 16000)
    assert stereo.shape == (16000, 2)


def test_to_mono():
    x = np.array([[1.0, 0.0], [0.5, 0.5], [-1.0, -0.5]], dtype=np.float32)
    np.testing.assert_array_equal(to_mono(x), [0.5, 0.5, -0.75])
    assert to_mono(x).dtype == np.float32
    one = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(to_mono(one), one)
    np.testing.assert_array_equal(to_mono(one[:, None]), one)


def test_decode_pcm16_roundtrip_and_odd_length():
    ints = np.array([0, 1, -1, 12345, -32768, 32767], dtype="<i2")
    out = decode_pcm16(ints.tobytes())
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out * 32768, ints.astype(np.float32))
    np.testing.assert_array_equal(decode_pcm16(bytearray(ints.tobytes())), out)
    assert decode_pcm16(b"").shape == (0,)
    with pytest.raises(AudioError, match="even"):
        decode_pcm16(b"\x00\x01\x02")
