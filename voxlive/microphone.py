"""Live microphone capture (optional ``sounddevice`` extra) feeding a stream."""

from __future__ import annotations

import queue
from typing import Callable

import numpy as np

from .audio import SAMPLE_RATE
from .transcript import Transcript, Word


class MicrophoneError(RuntimeError):
    pass


def _sounddevice():
    try:
        import sounddevice
    except ImportError:
        raise MicrophoneError("the microphone needs sounddevice: pip install sounddevice (or pip install '.[mic]' "
                              "in voxlive's folder)") from None
    except OSError as e:  # the PortAudio library itself is missing
        raise MicrophoneError(f"cannot use the microphone: PortAudio is not available ({e}; on Debian/Ubuntu: "
                              f"apt install libportaudio2)") from None
    return sounddevice


def input_device(device: int | str | None = None) -> dict:
    """The input device to record from, or a clear error when there is none."""
    sd = _sounddevice()
    try:
        info = sd.query_devices(device, kind="input")
    except (ValueError, sd.PortAudioError) as e:
        raise MicrophoneError(f"no usable audio input device ({e})") from None
    if not info or info.get("max_input_channels", 0) < 1:
        raise MicrophoneError("no audio input device found")
    return info


def listen(model, on_words: Callable[[list[Word]], None], *, delay_ms: int | None = None,
           device: int | str | None = None, block_ms: int = 80, stop: Callable[[], bool] | None = None) -> Transcript:
    """Record from the microphone until Ctrl-C (or ``stop()`` returns True); returns the transcript.

    Audio is captured at 16 kHz mono by PortAudio in a callback thread and handed over through a
    queue; the model runs in the calling thread, so a slow model never blocks the capture.
    """
    sd = _sounddevice()
    info = input_device(device)
    blocks: queue.Queue[np.ndarray] = queue.Queue()

    def callback(indata, frames, time, status):  # PortAudio thread: copy and return at once
        blocks.put(indata[:, 0].copy())

    stream = model.stream(delay_ms=delay_ms)
    try:
        with sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", device=info["name"],
                            blocksize=SAMPLE_RATE * block_ms // 1000, callback=callback):
            while not (stop and stop()):
                try:
                    block = blocks.get(timeout=0.1)
                except queue.Empty:
                    continue
                while not blocks.empty():  # catch up in one call if the model fell behind
                    block = np.concatenate((block, blocks.get_nowait()))
                words = stream.feed(block)
                if words:
                    on_words(words)
    except KeyboardInterrupt:
        pass
    except sd.PortAudioError as e:
        raise MicrophoneError(f"microphone error: {e}") from None
    while not blocks.empty():
        stream.push(blocks.get_nowait())
    transcript = stream.finish()
    rest = stream.take_words()
    if rest:
        on_words(rest)
    return transcript
