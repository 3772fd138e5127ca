"""Raw audio as protocols send it: PCM encodings and G.711, at 8-48 kHz, to float32 16 kHz mono.

Each encoding decodes to float32 in [-1, 1] at its own rate; ``PcmDecoder`` then resamples with
soxr's streaming resampler ("HQ", as ``voxlive.audio.resample`` for files) so that audio arriving
in pieces of any size gives the same samples as the whole recording resampled at once (a test
checks it). G.711 is decoded from its definition (ITU-T G.711: mu-law and A-law segments).
"""

from __future__ import annotations

import numpy as np
import soxr

from .audio import SAMPLE_RATE

MIN_RATE, MAX_RATE = 8000, 48000


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.float32) / 32768.0


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    segment = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(segment == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(segment - 1, 0))
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.float32) / 32768.0


MULAW = _mulaw_table()
ALAW = _alaw_table()

# encoding -> (bytes per sample, bytes -> float32)
ENCODINGS = {
    "pcm_s16le": (2, lambda b: np.frombuffer(b, "<i2").astype(np.float32) / 32768.0),
    "pcm_s32le": (4, lambda b: (np.frombuffer(b, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)),
    "pcm_f16le": (2, lambda b: np.frombuffer(b, "<f2").astype(np.float32)),
    "pcm_f32le": (4, lambda b: np.frombuffer(b, "<f4").astype(np.float32)),
    "pcm_mulaw": (1, lambda b: MULAW[np.frombuffer(b, np.uint8)]),
    "pcm_alaw": (1, lambda b: ALAW[np.frombuffer(b, np.uint8)]),
}


class PcmDecoder:
    """One stream's raw audio -> float32 16 kHz mono, with a streaming resampler when needed."""

    def __init__(self, encoding: str = "pcm_s16le", sample_rate: int = SAMPLE_RATE, channels: int = 1):
        if encoding not in ENCODINGS:
            raise ValueError(f"unsupported encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or not MIN_RATE <= sample_rate <= MAX_RATE:
            raise ValueError(f"sample_rate must be an integer from {MIN_RATE} to {MAX_RATE} Hz, got {sample_rate!r}")
        if not isinstance(channels, int) or not 1 <= channels <= 8:
            raise ValueError(f"channels must be 1 to 8, got {channels!r}")
        self.encoding, self.sample_rate, self.channels = encoding, sample_rate, channels
        self.width, self._decode = ENCODINGS[encoding]
        self._resampler = None if sample_rate == SAMPLE_RATE else soxr.ResampleStream(
            sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels

    def decode(self, data: bytes, last: bool = False) -> np.ndarray:
        """A message's bytes (a whole number of frames) -> 16 kHz float32; ``last`` drains the
        resampler."""
        if len(data) % self.frame_bytes:
            raise ValueError(f"{len(data)} bytes is not a whole number of {self.encoding} frames "
                             f"({self.frame_bytes} bytes each)")
        pcm = self._decode(data) if data else np.zeros(0, np.float32)
        if self.channels > 1:
            pcm = pcm.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        if not np.isfinite(pcm).all():
            raise ValueError("audio contains NaN or infinity")
        pcm = np.clip(pcm, -1.0, 1.0)
        if self._resampler is None:
            return pcm
        return self._resampler.resample_chunk(pcm, last=last)
