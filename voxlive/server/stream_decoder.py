"""Compressed audio that arrives in pieces (a browser's MediaRecorder WebM/Opus, Ogg) -> 16 kHz PCM.

PyAV demuxes and decodes from a file-like object whose ``read`` blocks until the WebSocket has
delivered more bytes, on a thread of its own (one per such connection), so the event loop never
waits on the decoder. Decoded audio is resampled to float32 16 kHz mono and handed to a callback.
"""

from __future__ import annotations

import threading

import numpy as np

from ..audio import SAMPLE_RATE, frame_to_array, to_mono

EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # WebM / Matroska
OGG_MAGIC = b"OggS"


def is_container(first_bytes: bytes) -> bool:
    return first_bytes.startswith((EBML_MAGIC, OGG_MAGIC))


class _Pipe:
    """A blocking, read-only file for PyAV, fed from another thread."""

    def __init__(self):
        self._buf = bytearray()
        self._eof = False
        self._cond = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self._cond:
            if not self._eof:  # after close (or a decode error) bytes are dropped
                self._buf += data
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify()

    def read(self, n: int = -1) -> bytes:
        with self._cond:
            while not self._buf and not self._eof:
                self._cond.wait()
            n = len(self._buf) if n is None or n < 0 else min(n, len(self._buf))
            out = bytes(self._buf[:n])
            del self._buf[:n]
            return out


class StreamDecoder:
    """Feed container bytes with ``feed``, then ``close``; ``on_pcm`` receives float32 chunks.

    ``on_done(error)`` is called once from the decoder thread: with None after the last chunk, or
    with a message if the bytes could not be decoded (what decoded before the error was delivered).
    """

    def __init__(self, on_pcm, on_done):
        self._pipe = _Pipe()
        self._on_pcm, self._on_done = on_pcm, on_done
        self._thread = threading.Thread(target=self._run, name="voxlive-decoder", daemon=True)
        self._thread.start()

    def feed(self, data: bytes) -> None:
        self._pipe.feed(data)

    def close(self) -> None:
        self._pipe.close()

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
