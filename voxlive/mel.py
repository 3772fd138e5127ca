"""Log-mel front end of Voxtral Mini 4B Realtime, offline (:func:`log_mel`) and incremental (:class:`MelStream`).

The recipe (see VOXTRAL.md section 3), identical to the reference feature extractor:

* 16 kHz mono audio, taken as float32 (other dtypes are first cast to float32, like the reference);
* periodic Hann window of 400 samples, an exact 400-point DFT, hop 160;
* STFT ``center=True`` with *reflect* padding of 200 samples at both ends (``torch.stft`` defaults);
* power spectrum ``|X|^2`` (201 bins); the LAST time frame is dropped, so ``N`` samples give ``N // 160``
  frames; frame ``i`` is centred on sample ``160*i`` and uses samples ``[160*i - 200, 160*i + 200)``;
* Slaney mel filter bank (128 bands, 0..8000 Hz, Slaney area normalisation);
* ``log10(max(mel, 1e-10))``, floored at ``global_log_mel_max - 8`` (no upper clamp), then ``(x + 4) / 4``.

Numerics: framing, windowing, DFT, power and mel projection run in float64 (the filter bank is the
float32 matrix returned by :func:`mel_filters`, i.e. the same numbers the reference applies); the
result is rounded to float32 once at the end. Offline and streaming computations share one per-frame
kernel, so :class:`MelStream` reproduces :func:`log_mel` to the last bit in practice (differences, if any,
come only from BLAS blocking of the mel product and are far below 1e-6).

Short signals: reflect padding of 200 samples needs at least 201 samples (``torch.stft`` rejects shorter
input in reflect mode). :func:`log_mel` and :meth:`MelStream.finish` raise ``ValueError`` for fewer than
201 samples instead of inventing a different padding. (The streaming engine always prepends 40960 zero
samples, so it never meets this case.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["HOP", "WINDOW", "N_FFT", "N_MELS", "SAMPLE_RATE", "MIN_SAMPLES", "mel_filters", "log_mel", "MelStream"]

SAMPLE_RATE = 16000
HOP = 160
WINDOW = 400
N_FFT = 400
N_MELS = 128
_PAD = N_FFT // 2  # 200: the STFT centring pad on each side
MIN_SAMPLES = _PAD + 1  # 201: the shortest signal reflect padding accepts
_LOG_EPS = 1e-10
_BLOCK_FRAMES = 2048  # frames per block in the vectorised kernel (bounds temporary memory to ~10 MB)


# ----------------------------------------------------------------------------------------------------
# Slaney mel scale and filter bank
# ----------------------------------------------------------------------------------------------------

_F_SP = 200.0 / 3.0  # Hz per mel in the linear region
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP  # 15
_LOGSTEP = np.log(6.4) / 27.0  # natural-log step per mel in the log region


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    with np.errstate(divide="ignore"):
        logpart = _MIN_LOG_MEL + np.log(np.maximum(hz, 1e-300) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, logpart, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    logpart = _MIN_LOG_HZ * np.exp(_LOGSTEP * (mel - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, logpart, linear)


def mel_filters(n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filter bank over 0 .. sample_rate/2 Hz.

    Returns float32 ``[n_mels, n_fft // 2 + 1]`` (row ``m`` is band ``m``), the transpose of
    ``mistral_common.audio.mel_filter_bank(n_fft//2+1, n_mels, 0, sample_rate/2, sample_rate)``.
    Computed afresh on each call; callers cache.
    """
    n_bins = n_fft // 2 + 1
    f_max = sample_rate / 2.0
    # band edges/centres: n_mels + 2 points equally spaced on the mel scale
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))
    # DFT bin frequencies (same convention as the reference: linspace up to sample_rate // 2)
    bin_hz = np.linspace(0.0, sample_rate // 2, n_bins)
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hz[None, :]) / (upper - centre)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    # Slaney normalisation: each triangle gets (approximately) unit area -> scale by 2 / bandwidth
    tri *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    if (tri.max(axis=1) == 0.0).any():
        raise ValueError(f"mel filter bank has an empty band: n_mels={n_mels} too high for n_fft={n_fft}")
    return tri.astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Shared per-frame kernel
# ----------------------------------------------------------------------------------------------------

_HANN = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(WINDOW, dtype=np.float64) / WINDOW))  # periodic Hann
_FILTER_CACHE: dict[int, np.ndarray] = {}


def _filters64(n_mels: int) -> np.ndarray:
    f = _FILTER_CACHE.get(n_mels)
    if f is None:
        # float32 numbers (as the reference applies them), held in float64 for the product
        f = mel_filters(n_mels).astype(np.float64)
        f.setflags(write=False)
        _FILTER_CACHE[n_mels] = f
    return f


def _frames_log_mel(padded: np.ndarray, n_frames: int, floor: float, n_mels: int) -> np.ndarray:
    """Log-mel of ``n_frames`` frames of an already-padded float32 segment.

    Frame ``j`` is ``padded[160*j : 160*j + 400]``; ``len(padded) >= 160*(n_frames-1) + 400``.
    Returns float32 ``[n_mels, n_frames]``.
    """
    out = np.empty((n_mels, n_frames), dtype=np.float32)
    if n_frames == 0:
        return out
    filt = _filters64(n_mels)
    windows = np.lib.stride_tricks.sliding_window_view(padded, WINDOW)[::HOP]
    for s in range(0, n_frames, _BLOCK_FRAMES):
        e = min(s + _BLOCK_FRAMES, n_frames)
        frames = windows[s:e].astype(np.float64) * _HANN
        spec = np.fft.rfft(frames, n=N_FFT, axis=-1)
        power = spec.real * spec.real + spec.imag * spec.imag  # [k, 201]
        mel = filt @ power.T  # [n_mels, k]
        np.maximum(mel, _LOG_EPS, out=mel)
        np.log10(mel, out=mel)
        np.maximum(mel, floor, out=mel)
        mel += 4.0
        mel /= 4.0
        out[:, s:e] = mel
    return out


def _as_mono_f32(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"expected 1-D mono audio, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _too_short(n: int) -> ValueError:
    return ValueError(
        f"signal of {n} samples is too short for the log-mel front end: reflect padding of {_PAD} samples "
        f"(STFT center=True) needs at least {MIN_SAMPLES} samples"
    )


# ----------------------------------------------------------------------------------------------------
# Offline
# ----------------------------------------------------------------------------------------------------


def log_mel(audio: np.ndarray, *, global_log_mel_max: float = 1.5, n_mels: int = N_MELS) -> np.ndarray:
    """Voxtral Realtime log-mel of a whole signal: float32 ``[n_mels, len(audio) // 160]``.

    No padding is added beyond the STFT's own 200-sample reflect centring. Raises ``ValueError``
    for signals shorter than 201 samples or not 1-D.
    """
    x = _as_mono_f32(audio)
    n = x.shape[0]
    if n < MIN_SAMPLES:
        raise _too_short(n)
    padded = np.pad(x, _PAD, mode="reflect")  # numpy "reflect" == torch "reflect" (edge not repeated)
    return _frames_log_mel(padded, n // HOP, global_log_mel_max - 8.0, n_mels)


# ----------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------


class MelStream:
    """Incremental log-mel on the same 160-sample grid as :func:`log_mel`.

    Pushing the samples of a signal in any chunking and then calling :meth:`finish` yields the same
    frames as ``log_mel(signal)`` (same kernel; identical in practice, within 1e-6 guaranteed).

    Frame ``i`` (centred on sample ``160*i``) is emitted by :meth:`push` as soon as it is final, i.e. when
    ``samples_seen >= 160*i + 200`` -- except frame 0, whose left reflect padding uses samples 1..200
    and so needs 201 samples. Frames whose window reaches past the end of the signal need right reflect
    padding and come out of :meth:`finish`. Only the last < 400 samples are kept as history.
    """

    def __init__(self, *, global_log_mel_max: float = 1.5, n_mels: int = N_MELS):
        self._floor = float(global_log_mel_max) - 8.0
        self._n_mels = int(n_mels)
        _filters64(self._n_mels)  # build the filter bank up front
        self._buf = np.zeros(0, dtype=np.float32)  # samples [self._buf_start, samples_seen)
        self._buf_start = 0
        self._samples_seen = 0
        self._frames_emitted = 0
        self._finished = False

    @property
    def samples_seen(self) -> int:
        return self._samples_seen

    @property
    def frames_emitted(self) -> int:
        return self._frames_emitted

    @property
    def finished(self) -> bool:
        return self._finished

    def _empty(self) -> np.ndarray:
        return np.zeros((self._n_mels, 0), dtype=np.float32)

    def _segment(self, start: int, stop: int) -> np.ndarray:
        """Samples at absolute positions ``[start, stop)`` with reflect padding at either end.

        Positions < 0 map to ``-pos``; positions >= N (= samples_seen) map to ``2*(N-1) - pos``.
        All mapped positions must lie inside the kept history.
        """
        n = self._samples_seen
        pos = np.arange(start, stop)
        pos = np.where(pos < 0, -pos, pos)
        pos = np.where(pos >= n, 2 * (n - 1) - pos, pos)
        idx = pos - self._buf_start
        if idx.size and (idx.min() < 0 or idx.max() >= self._buf.shape[0]):  # pragma: no cover - internal invariant
            raise RuntimeError("MelStream internal error: needed samples are no longer in the history")
        return self._buf[idx]

    def _emit(self, stop_frame: int) -> np.ndarray:
        i0 = self._frames_emitted
        k = stop_frame - i0
        if k <= 0:
            return self._empty()
        start = HOP * i0 - _PAD
        stop = HOP * (stop_frame - 1) + _PAD
        if start >= 0 and stop <= self._samples_seen:
            seg = self._buf[start - self._buf_start : stop - self._buf_start]
        else:
            seg = self._segment(start, stop)
        out = _frames_log_mel(seg, k, self._floor, self._n_mels)
        self._frames_emitted = stop_frame
        # drop history no later frame needs: the next frame starts at 160*stop_frame - 200
        # (this also keeps >= 201 samples before the end, enough for the right reflect in finish)
        keep_from = max(0, HOP * stop_frame - _PAD)
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start :].copy()
            self._buf_start = keep_from
        return out

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append samples; return the frames ``[n_mels, k]`` (k >= 0) that became final."""
        if self._finished:
            raise RuntimeError("MelStream.push() called after finish()")
        x = _as_mono_f32(samples)
        if x.shape[0]:
            self._buf = np.concatenate([self._buf, x])
            self._samples_seen += x.shape[0]
        n = self._samples_seen
        if n < MIN_SAMPLES:
            return self._empty()
        ready = (n - _PAD) // HOP + 1  # frames i with 160*i + 200 <= n
        return self._emit(ready)

    def finish(self) -> np.ndarray:
        """Return the remaining frames (right reflect padding); total frames == samples_seen // 160.

        Raises ``ValueError`` if fewer than 201 samples were pushed, ``RuntimeError`` if called twice.
        """
        if self._finished:
            raise RuntimeError("MelStream.finish() called twice")
        n = self._samples_seen
        if n < MIN_SAMPLES:
            self._finished = True
            raise _too_short(n)
        out = self._emit(n // HOP)
        self._finished = True
        self._buf = np.zeros(0, dtype=np.float32)
        return out
