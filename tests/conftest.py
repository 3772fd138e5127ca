"""Shared fixtures: tiny random checkpoints in the native layout, and real speech from espeak-ng."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from voxlive.audio import load_audio
from voxlive.testing import write_random_checkpoint

# Large enough that the audio, not the fed-back token, decides the greedy tokens of a random model.
VARIED_ADAPTER_SCALE = 100.0


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny checkpoint, float32 on disk, plain random weights."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=0, dtype="float32")


@pytest.fixture(scope="session")
def varied_dir(tmp_path_factory):
    """Tiny checkpoint whose greedy tokens depend on the audio (scaled-up adapter output)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("varied"), "tiny", seed=1, dtype="float32",
                                   adapter_scale=VARIED_ADAPTER_SCALE)


@pytest.fixture(scope="session")
def varied_model(varied_dir):
    import voxlive

    return voxlive.load(varied_dir, dtype="float32", device="cpu")


def speak(text: str, path) -> np.ndarray:
    """Real speech from espeak-ng, as 16 kHz float32."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return load_audio(path)


@pytest.fixture(scope="session")
def speech(tmp_path_factory):
    """About 4 s of speech: longer than the tiny encoder window (24 frames = 0.48 s) and decoder window."""
    return speak("The quick brown fox jumps over the lazy dog. Streaming speech to text.",
                 tmp_path_factory.mktemp("speech") / "speech.wav")


@pytest.fixture(scope="session")
def dialogue(tmp_path_factory):
    """espeak-ng phrases with silences of known lengths, and the turns they make (tests/dialogue.py)."""
    from dialogue import build

    return build(tmp_path_factory.mktemp("dialogue"))
