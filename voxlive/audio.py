"""Audio in: decode any common audio source to float32 mono samples at 16 kHz.

Voxtral consumes 16 kHz mono float32 audio. Everything that reaches the
engine goes through :func:`load_audio`, so this module hides the zoo of
containers, codecs, sample formats, channel layouts and rates.

Decoding tries libsndfile (via ``soundfile``) first: it is fast, exact and
covers WAV/FLAC/OGG/AIFF/MP3. Anything it cannot read (M4A/AAC, WebM/Opus,
video containers with an audio track, ...) falls back to FFmpeg (via PyAV).
Both paths decode at the native rate and layout, then share the same
downmix (channel mean) and the same soxr resampler, so a file gives the same
samples whichever decoder handled it.
"""

from __future__ import annotations

import io
import logging
import os
from typing import BinaryIO, Union

import av
import numpy as np
import soundfile as sf
import soxr

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "load_audio",
    "resample",
    "to_mono",
    "decode_pcm16",
    "frame_to_array",
]

SAMPLE_RATE = 16000

AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]

_log = logging.getLogger("voxlive")

# Frames per soundfile read. Reading in blocks (rather than all at once) lets
# a truncated or damaged file still yield the audio before the damage.
_SF_BLOCK = 4096
# More channels than this in a [samples, channels] array almost certainly
# means the caller passed [channels, samples].
_MAX_CHANNELS = 64


class AudioError(ValueError):
    """The audio source cannot be turned into samples; the message names the source."""


def load_audio(source: AudioSource, *, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode ``source`` to a 1-D, C-contiguous float32 array at ``sample_rate``.

    ``source`` may be a path (str / os.PathLike), an encoded file in memory
    (bytes / bytearray / memoryview), or a numpy array of samples that is
    already at ``sample_rate`` (1-D, or 2-D ``[samples, channels]``; integer
    dtypes are scaled to [-1, 1]). A file that is cut short returns the part
    that decodes, with a warning on the ``voxlive`` logger, because losing a
    whole recording to a damaged tail is worse than transcribing its start.

    ``max_seconds``: refuse (AudioError) audio longer than this, from the duration its header
    declares before anything is decoded or resampled, and from the samples decoded when the header
    does not say (a 4 KB WAV whose header claims 1 Hz holds over an hour of "audio").
    """
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")

    if isinstance(source, np.ndarray):
        return _from_array(source, "<array>")

    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        data = bytes(source)
        if not data:
            raise AudioError(f"empty audio data: {name}")
        opener = lambda: io.BytesIO(data)  # noqa: E731 - each decoder needs a fresh stream
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = str(path)
        if not os.path.exists(path):
            raise AudioError(f"audio file not found: {name}")
        if not os.path.isfile(path):
            raise AudioError(f"not a file: {name}")
        if os.path.getsize(path) == 0:
            raise AudioError(f"empty file: {name}")
        opener = lambda: path  # noqa: E731
    else:
        raise TypeError(
            "load_audio() expects a path, bytes or a numpy array, "
            f"got {type(source).__name__}"
        )

    audio, rate = _decode(opener, name, max_seconds)
    audio = _from_array(audio, name)
    return _contiguous(resample(audio, rate, sample_rate))


def resample(audio: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample float audio (1-D, or 2-D ``[samples, channels]``) with soxr "HQ".

    Returns float32. Identity (no filtering at all) when the rates are equal,
    so 16 kHz input is passed through bit-exact.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    audio = _contiguous(audio)
    if orig_sr == target_sr or audio.shape[0] == 0:
        return audio
    return _contiguous(soxr.resample(audio, orig_sr, target_sr, quality="HQ"))


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Downmix ``[samples, channels]`` to 1-D by averaging channels; 1-D passes through.

    The mean (not a sum or FFmpeg's -3 dB matrix) keeps full-scale input
    within [-1, 1] and makes both decoders give identical results.
    """
    audio = np.asarray(audio)
    if audio.ndim == 1:
        return audio
    if audio.ndim != 2:
        raise ValueError(f"expected audio of shape [samples] or [samples, channels], got {audio.shape}")
    if audio.shape[1] > _MAX_CHANNELS:
        raise ValueError(
            f"audio has {audio.shape[1]} channels; expected [samples, channels] "
            "(was a [channels, samples] array passed?)"
        )
    if audio.shape[1] == 1:
        return audio[:, 0]
    return audio.mean(axis=1, dtype=audio.dtype if audio.dtype.kind == "f" else np.float64)


def decode_pcm16(data: bytes) -> np.ndarray:
    """Raw little-endian signed 16-bit mono PCM (e.g. a network stream chunk) -> float32 / 32768."""
    buf = memoryview(data).cast("B")
    if len(buf) % 2:
        raise AudioError(f"PCM16 data must have an even number of bytes, got {len(buf)}: <bytes>")
    return np.frombuffer(buf, dtype="<i2").astype(np.float32) / np.float32(32768.0)


# --------------------------------------------------------------------------- helpers


def _contiguous(audio: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(audio, dtype=np.float32)


def _to_float32(audio: np.ndarray, name: str) -> np.ndarray:
    """Scale integer samples to [-1, 1]; floats are only cast (never clipped)."""
    kind = audio.dtype.kind
    if kind == "f":
        return audio.astype(np.float32, copy=False)
    if kind == "i":
        scale = float(2 ** (8 * audio.dtype.itemsize - 1))
        return (audio.astype(np.float64) / scale).astype(np.float32)
    if kind == "u":
        half = float(2 ** (8 * audio.dtype.itemsize - 1))
        return ((audio.astype(np.float64) - half) / half).astype(np.float32)
    raise AudioError(f"unsupported sample dtype {audio.dtype} in {name}")


def _from_array(audio: np.ndarray, name: str) -> np.ndarray:
    """Samples -> 1-D float32 (no resampling: the rate is the caller's to know)."""
    try:
        mono = to_mono(_to_float32(np.asarray(audio), name))
    except AudioError:
        raise
    except ValueError as e:  # to_mono's shape complaints, now naming the source
        raise AudioError(f"{e}: {name}") from None
    if mono.shape[0] == 0:
        raise AudioError(f"no audio samples in {name}")
    return _contiguous(mono)


class _CannotDecode(Exception):
    """This decoder got nothing out of the source; the other one may do better."""


def _too_long(name: str, seconds: float, max_seconds: float | None) -> None:
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{name} is {seconds:.0f} s of audio, over the limit of {max_seconds:g} s")


def _decode(opener, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Try soundfile, then PyAV; returns ``([samples, channels] float32, rate)``."""
    try:
        return _decode_soundfile(opener(), name, max_seconds)
    except _CannotDecode as e:
        sf_reason = str(e)
    try:
        return _decode_pyav(opener(), name, max_seconds)
    except _CannotDecode as e:
        av_reason = str(e)
    raise AudioError(
        f"cannot decode {name}: not audio, corrupt or unsupported format "
        f"(soundfile: {sf_reason}; PyAV: {av_reason})"
    )


def _decode_soundfile(file: str | BinaryIO, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    try:
        f = sf.SoundFile(file)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        raise _CannotDecode(_reason(e)) from None
    blocks, error = [], None
    with f:
        if f.samplerate > 0 and f.frames > 0:
            _too_long(name, f.frames / f.samplerate, max_seconds)
        try:
            while True:
                block = f.read(_SF_BLOCK, dtype="float32", always_2d=True)
                if not len(block):
                    break
                blocks.append(block)
        except (sf.SoundFileError, RuntimeError) as e:
            error = _reason(e)
        # libsndfile silently shortens WAV/AIFF whose header promises more
        # data than the file holds, noting "(should be N)" in its log.
        if error is None and "should be" in (f.extra_info or ""):
            error = "header length does not match file size"
        rate = f.samplerate
    if error is not None:
        if not blocks:
            raise _CannotDecode(error)
        _warn_partial(name, error, sum(len(b) for b in blocks), rate)
    if not blocks:
        raise AudioError(f"no audio samples in {name}")
    return np.concatenate(blocks) if len(blocks) > 1 else blocks[0], rate


def _decode_pyav(file: str | BinaryIO, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    try:
        container = av.open(file, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise _CannotDecode(_reason(e)) from None
    with container:
        if container.duration:  # microseconds, from the header when it says
            _too_long(name, container.duration / 1e6, max_seconds)
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["no"]
            raise _CannotDecode(
                f"no audio stream in {container.format.name!r} container "
                f"({', '.join(kinds)} streams only)"
            )
        stream = container.streams.audio[0]
        chunks, rate, channels, error, decoded = [], None, None, None, 0
        try:
            for frame in container.decode(stream):
                if not frame.samples:
                    continue
                samples = frame_to_array(frame, name)
                if rate is None:
                    rate, channels = frame.sample_rate, samples.shape[1]
                elif (frame.sample_rate, samples.shape[1]) != (rate, channels):
                    error = "sample rate or channel count changes mid-stream"
                    break
                chunks.append(samples)
                decoded += len(samples)
                _too_long(name, decoded / rate, max_seconds)
        except av.FFmpegError as e:
            error = _reason(e)
    if error is not None:
        if not chunks:
            raise _CannotDecode(error)
        _warn_partial(name, error, sum(len(c) for c in chunks), rate)
    if not chunks:
        raise AudioError(f"no audio samples in {name}")
    return np.concatenate(chunks), rate


def frame_to_array(frame: av.AudioFrame, name: str) -> np.ndarray:
    """An FFmpeg audio frame (any sample format, planar or packed) -> [samples, channels] float32."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if frame.format.is_planar:
        data = data.T  # [channels, samples] -> [samples, channels]
    else:
        data = data.reshape(-1, channels)  # [1, samples * channels], interleaved
    return _to_float32(data, name)


def _reason(e: BaseException) -> str:
    """A decoder's error without the repr of our BytesIO or a duplicated file name."""
    text = getattr(e, "error_string", None) or getattr(e, "strerror", None) or str(e)
    return str(text).rstrip(".") or type(e).__name__


def _warn_partial(name: str, reason: str, frames: int, rate: int) -> None:
    _log.warning(
        "audio %s is truncated or damaged (%s); using the first %.2f s that decoded",
        name, reason, frames / rate,
    )
