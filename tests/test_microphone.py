"""Microphone mode: the capture loop, with the sound card replaced by a thread playing real speech.

No machine of the CI has a microphone; only PortAudio's device layer is replaced here, everything
from the capture callback on is the real code.
"""

from __future__ import annotations

import threading
import time
import types

import numpy as np

from voxlive import microphone


class _PlayingDevice:
    """Stands in for sounddevice: InputStream calls back with 80 ms blocks of the given audio."""

    PortAudioError = RuntimeError

    def __init__(self, audio: np.ndarray):
        self.audio = audio
        self.done = threading.Event()

    def query_devices(self, device=None, kind=None):
        return {"name": "fake input", "max_input_channels": 1}

    def InputStream(self, *, samplerate, channels, dtype, device, blocksize, callback):
        assert (samplerate, channels, dtype) == (16000, 1, "float32")
        player = self

        class Stream:
            def __enter__(self):
                def play():
                    for start in range(0, len(player.audio), blocksize):
                        callback(player.audio[start:start + blocksize, None], blocksize, None, None)
                        time.sleep(0.001)
                    player.done.set()

                self.thread = threading.Thread(target=play, daemon=True)
                self.thread.start()
                return self

            def __exit__(self, *exc):
                self.thread.join()

        return Stream()


def test_listen_transcribes_what_the_device_captures(monkeypatch, varied_model, speech):
    device = _PlayingDevice(speech)
    monkeypatch.setattr(microphone, "_sounddevice", lambda: types.SimpleNamespace(
        InputStream=device.InputStream, query_devices=device.query_devices, PortAudioError=RuntimeError))
    live_words = []
    transcript = microphone.listen(varied_model, live_words.extend, stop=device.done.is_set)
    expected = varied_model.transcribe(speech)
    assert transcript.tokens == expected.tokens
    assert live_words == transcript.words
    assert transcript.duration == expected.duration
