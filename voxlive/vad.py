"""Voice activity: Silero VAD's speech probability per 32 ms frame of 16 kHz audio.

The trained weights are the ONNX model that ships inside the ``silero-vad`` wheel
(``silero_vad/data/silero_vad.onnx``), run with onnxruntime on one thread: a frame costs a
fraction of a millisecond on a CPU, so a server runs it in the connection's handler, never on the
model's engine thread. The model is recurrent: each call takes the previous call's state and the
last 64 samples before the frame, so a ``VadStream`` (one per audio stream) keeps both and audio
may arrive in pieces of any length. ``SileroVad`` holds the weights once for every stream.

Frame ``i`` covers samples ``[512 i, 512 i + 512)``; its probability is that the frame is speech.
Issue-independent users (turn detection, blank-rut detection) read probabilities or segments.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
FRAME = 512  # samples per probability (32 ms)
CONTEXT = 64  # samples of the previous frame the model sees with each frame
FRAME_SECONDS = FRAME / SAMPLE_RATE


class VadUnavailable(RuntimeError):
    """silero-vad or onnxruntime is not installed."""


def model_path() -> Path:
    """The ONNX weights inside the installed silero-vad wheel (found without importing it: its
    ``__init__`` imports torch and torchaudio helpers the model does not need)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("turn detection needs the silero-vad package: pip install 'voxlive[vad]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise VadUnavailable(f"silero-vad is installed but {path} is missing")
    return path


class SileroVad:
    """The Silero VAD weights in an onnxruntime session, shared by every stream."""

    def __init__(self, path: Path | None = None):
        try:
            import onnxruntime
        except ImportError as err:
            raise VadUnavailable("turn detection needs onnxruntime: pip install 'voxlive[vad]'") from err
        options = onnxruntime.SessionOptions()
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(str(path or model_path()), sess_options=options,
                                                     providers=["CPUExecutionProvider"])
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self._lock = threading.Lock()  # one run at a time: the session is shared across threads

    def stream(self) -> VadStream:
        return VadStream(self)

    def _run(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """frames [n, CONTEXT + FRAME] in order -> probabilities [n], the state after the last."""
        probs = np.empty(len(frames), dtype=np.float32)
        with self._lock:
            for i, x in enumerate(frames):
                out, state = self._session.run(None, {"input": x[None], "state": state, "sr": self._sr})
                probs[i] = out[0, 0]
        return probs, state

    def probabilities(self, pcm: np.ndarray) -> np.ndarray:
        """A whole recording at once (its last partial frame dropped)."""
        return self.stream().push(pcm)


class VadStream:
    """One stream's recurrent state: push 16 kHz float32 audio, get the probabilities of the
    frames it completes."""

    def __init__(self, vad: SileroVad):
        self.vad = vad
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._tail = np.zeros(CONTEXT, dtype=np.float32)  # the samples before the pending ones
        self._pending = np.zeros(0, dtype=np.float32)
        self.frames = 0  # frames computed so far

    def copy(self) -> VadStream:
        """An independent copy (a forked stream's) sharing the weights: push replaces the arrays
        it keeps, never writes them in place."""
        new = VadStream.__new__(VadStream)
        new.__dict__.update(self.__dict__)
        return new

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.asarray(pcm, dtype=np.float32)
        buf = np.concatenate((self._tail, self._pending, pcm))
        n = (len(buf) - CONTEXT) // FRAME
        if n == 0:
            self._pending = buf[CONTEXT:]
            return np.zeros(0, dtype=np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(buf[:CONTEXT + n * FRAME], CONTEXT + FRAME)[::FRAME]
        probs, self._state = self.vad._run(np.ascontiguousarray(windows), self._state)
        used = n * FRAME
        self._tail = buf[used:used + CONTEXT]
        self._pending = buf[used + CONTEXT:]
        self.frames += n
        return probs
