"""Compressed audio that arrives in pieces (a browser's MediaRecorder WebM/Opus, Ogg) -> 16 kHz PCM.

PyAV demuxes and decodes from a file-like object whose ``read`` blocks until the WebSocket has
delivered more bytes, on a thread of its own (one per such connection), so the event loop never
waits on the decoder. Decoded audio is resampled to float32 16 kHz mono and handed to a callback.
At most ``max_buffer`` bytes wait for the decoder: ``feed`` blocks beyond that (call it off the
event loop), so a client that sends faster than the engine transcribes is slowed down by TCP,
as PCM clients are, instead of growing the server.
"""

from __future__ import annotations

import threading

import numpy as np

from ..audio import SAMPLE_RATE, frame_to_array, to_mono

EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WebM / Matroska
OGG_MAGIC = b"OggS"


def is_container(first_bytes: bytes) -> bool:
    return first_bytes.startswith((EBML_MAGIC, OGG_MAGIC))


MAX_BUFFER_BYTES = 256 * 1024  # ~1 minute of browser Opus


class _Pipe:
    """A blocking, read-only file for PyAV, fed from another thread, holding at most ``limit`` bytes."""

    def __init__(self, limit: int):
        self._buf = bytearray()
        self._limit = limit
        self._eof = False
        self._cond = threading.Condition()
        self.peak = 0  # the most bytes it has held

    def feed(self, data: bytes) -> None:
        with self._cond:
            while len(self._buf) >= self._limit and not self._eof:
                self._cond.wait()
            if not self._eof:  # after close (or a decode error) bytes are dropped
                self._buf += data
                self.peak = max(self.peak, len(self._buf))
                self._cond.notify_all()

    def close(self, *, discard: bool = False) -> None:
        with self._cond:
            self._eof = True
            if discard:
                self._buf = bytearray()
            self._cond.notify_all()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._buf and not self._eof:
                self._cond.wait()
            n = len(self._buf) if n is None or n < 0 else min(n, len(self._buf))
            out = bytes(self._buf[:n])
            del self._buf[:n]
            self._cond.notify_all()
            return out


class StreamDecoder:
    """Feed container bytes with ``feed``, then ``close``; ``on_pcm`` receives float32 chunks.

    ``on_done(error)`` is called once from the decoder thread: with None after the last chunk, or
    with a message if the bytes could not be decoded (what decoded before the error was delivered).
    """

    def __init__(self, on_pcm, on_done, *, max_buffer: int = MAX_BUFFER_BYTES):
        self._pipe = _Pipe(max_buffer)
        self._on_pcm, self._on_done = on_pcm, on_done
        self._thread = threading.Thread(target=self._run, name="voxlive-decoder", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        """Queue bytes for the decoder; blocks while ``max_buffer`` bytes are waiting."""
        self._pipe.feed(data)

    def close(self) -> None:
        """No more bytes: the decoder finishes what it has."""
        self._pipe.close()

    def abort(self) -> None:
        """The client is gone: drop what is queued, the decoder ends at once."""
        self._pipe.close(discard=True)

    @property
    def peak_buffered(self) -> int:
        return self._pipe.peak

    def _run(self) -> None:
        import av
        import soxr

        error = None
        try:
            with av.open(self._pipe, mode="r") as container:
                if not container.streams.audio:
                    raise ValueError("no audio stream in the data")
                resampler = None
                for frame in container.decode(audio=0):
                    if not frame.samples:
                        continue
                    if resampler is None:
                        rate = frame.sample_rate
                        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
                    elif frame.sample_rate != rate:
                        raise ValueError("sample rate changes mid-stream")
                    self._emit(resampler.resample_chunk(to_mono(frame_to_array(frame, "stream"))))
                if resampler is not None:
                    self._emit(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        except Exception as err:  # noqa: BLE001 - any demuxer/codec failure is the client's data
            error = f"could not decode the audio stream: {err}"
        finally:
            self._pipe.close()
            self._on_done(error)

    def _emit(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._on_pcm(np.ascontiguousarray(pcm, dtype=np.float32))
