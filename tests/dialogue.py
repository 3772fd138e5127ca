"""Real speech with known turns for the turn-detection tests: espeak-ng phrases (their own leading
and trailing silence cut off) separated by silences of known lengths (test helper)."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np

RATE = 16000
TOKEN = 0.08  # seconds of audio per decoder position


def positions_until(seconds: float) -> int:
    """Decoder positions whose audio lies within the first ``seconds`` (a boundary on a token's
    edge counts exactly, whatever the float rounding of the time)."""
    return math.ceil(seconds / TOKEN - 1e-9)
PHRASES = ["hello world", "good morning", "open the door", "thank you very much"]
PAUSES = [0.3, 0.8, 2.0]  # after phrases 0, 1, 2: only 0.8 and 2.0 exceed a 500 ms min_silence
LEAD, TAIL = 0.5, 1.6


def energy_bounds(pcm: np.ndarray) -> tuple[float, float]:
    """Where the speech in ``pcm`` starts and stops, from its 10 ms frame energy (not the VAD)."""
    frames = pcm[:len(pcm) // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > 0.02 * rms.max())
    return loud[0] * 0.01, (loud[-1] + 1) * 0.01


def build(tmp) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """PCM16 of the dialogue, and the (start, stop) of each expected turn at min_silence 500 ms:
    phrases 0 and 1 (the 0.3 s pause is no turn end), 2, 3."""
    from conftest import speak

    parts, bounds, t = [np.zeros(int(LEAD * RATE), np.float32)], [], LEAD
    for i, phrase in enumerate(PHRASES):
        pcm = speak(phrase, tmp / f"{i}.wav")
        start, stop = energy_bounds(pcm)
        pcm = pcm[int(start * RATE):int(stop * RATE)]
        bounds.append((t, t + len(pcm) / RATE))
        parts.append(pcm)
        t += len(pcm) / RATE
        pause = PAUSES[i] if i < len(PAUSES) else TAIL
        parts.append(np.zeros(int(pause * RATE), np.float32))
        t += pause
    pcm16 = (np.clip(np.concatenate(parts), -1, 1) * 32767).astype("<i2")
    return pcm16, [(bounds[0][0], bounds[1][1]), bounds[2], bounds[3]]


def as_float(pcm16: np.ndarray) -> np.ndarray:
    return pcm16.astype(np.float32) / 32768.0


@contextmanager
def agent_server(varied_dir, key: str):
    """The real server under uvicorn (the tiny model in float32, configured as ``voxlive serve``
    configures it) with an API key, for the voice-agent protocol tests."""
    from serving import running

    import voxlive
    from voxlive.server import WEBSOCKET_OPTIONS, Engine, create_app

    model = voxlive.load(varied_dir, dtype="float32", device="cpu")
    app = create_app(Engine(model, max_sessions=8), model_id="tiny", api_key=key)
    with running(app, ws_max_size=512 * 1024, **WEBSOCKET_OPTIONS) as host:
        yield host
