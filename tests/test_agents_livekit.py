"""LiveKit Agents' Deepgram and OpenAI STT plugins against the real server, driven directly through
their streaming API (``stt.stream()``: ``push_frame`` of ``rtc.AudioFrame``s, ``end_input``) as an
agent session drives them, without a LiveKit room.

Each turn's final transcript is compared with offline ``transcribe`` of the same audio (resampled
the same way): the offline tokens of the turn's stretch, which ends where the server's VAD saw
500 ms of silence (within 100 ms of the speech's measured end plus 500 ms; the test finds the
exact token). Interim transcripts grow toward their final; the plugins' start and end of speech
come from the server's turn events (Deepgram's ``speech_final``, OpenAI's ``speech_stopped``).
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import soxr
from dialogue import RATE, TOKEN, agent_server, as_float

from voxlive.pcm import PcmDecoder

pytest.importorskip("livekit.agents")
pytest.importorskip("onnxruntime")
pytest.importorskip("silero_vad")
from livekit import rtc  # noqa: E402
from livekit.agents import stt, utils  # noqa: E402
from livekit.plugins import deepgram, openai  # noqa: E402

KEY = "livekit-key"
SILENCE = 0.5


@pytest.fixture(scope="module")
def server(varied_dir):
    with agent_server(varied_dir, KEY) as host:
        yield host


def frames(pcm16: np.ndarray, rate: int, seconds: float = 0.1) -> list[rtc.AudioFrame]:
    n = int(rate * seconds)
    return [rtc.AudioFrame(pcm16[i:i + n].tobytes(), rate, 1, len(pcm16[i:i + n])) for i in range(0, len(pcm16), n)]


def kinds(events) -> list[str]:
    return [e.type.name for e in events if e.type is not stt.SpeechEventType.RECOGNITION_USAGE]


def text(event) -> str:
    return event.alternatives[0].text


def per_turn(events) -> list[list]:
    """The events from each START_OF_SPEECH to the next (a turn's final may come after its
    END_OF_SPEECH, as OpenAI's completed item follows speech_stopped)."""
    groups = []
    for e in events:
        if e.type is stt.SpeechEventType.START_OF_SPEECH:
            groups.append([])
        if groups:
            groups[-1].append(e)
    return groups


def stretch_end(tokens: list[int], tok, start: int, final: str, near: float) -> int:
    """The token where ``final`` (the offline tokens from ``start``) ends, within 100 ms of ``near``
    seconds; fails if there is none."""
    guess = math.ceil(near / TOKEN)
    for end in range(guess - 2, guess + 3):
        if tok.decode(tokens[start:end]) == final:
            return end
    raise AssertionError(f"{final!r} is not the offline tokens from {start} to about {near:.2f} s")


def check_turns(events, turns, offline_tokens, tok) -> None:
    """One START/END_OF_SPEECH per turn, each turn's finals its stretch of the offline tokens (the
    stretches following each other), every interim a prefix of the final it grows toward."""
    kind = kinds(events)
    assert kind.count("END_OF_SPEECH") == len(turns), kind
    speech = [k for k in kind if k.endswith("_OF_SPEECH")]
    assert speech[:2 * len(turns)] == ["START_OF_SPEECH", "END_OF_SPEECH"] * len(turns), speech
    groups = per_turn(events)
    start = 0
    for (_, stop), group in zip(turns, groups):
        finals = [text(e) for e in group if e.type is stt.SpeechEventType.FINAL_TRANSCRIPT]
        assert finals, kinds(group)
        start = stretch_end(offline_tokens, tok, start, "".join(finals), stop + SILENCE)
    upcoming = None
    for e in reversed(events):  # every interim is a prefix of the next final
        if e.type is stt.SpeechEventType.FINAL_TRANSCRIPT:
            upcoming = text(e)
        elif e.type is stt.SpeechEventType.INTERIM_TRANSCRIPT:
            assert upcoming is not None and upcoming.startswith(text(e)), (text(e), upcoming)


async def drive(plugin, audio: list[rtc.AudioFrame], *, finals: int | None = None) -> list:
    """Push the frames, end the input, collect events until the stream ends (or ``finals`` finals)."""
    stream = plugin.stream()
    for frame in audio:
        stream.push_frame(frame)
    stream.end_input()
    events = []

    async def collect():
        async for event in stream:
            events.append(event)
            if finals is not None and kinds(events).count("FINAL_TRANSCRIPT") == finals:
                return

    try:
        await asyncio.wait_for(collect(), 120)
    finally:
        await stream.aclose()
        await plugin.aclose()
    return events


def test_deepgram_plugin_turns_and_finals(server, dialogue, varied_model):
    """Deepgram's plugin with ``base_url``, endpointing at 500 ms: one final per turn (speech_final
    ends the plugin's speech), the rest of the audio's text in the finals after the last turn, all
    adding up to offline transcribe of the audio."""
    pcm16, turns = dialogue

    async def go():
        async with utils.http_context.open():
            plugin = deepgram.STT(api_key=KEY, base_url=f"http://{server}/v1/listen", model="nova-3",
                                  language="en-US", sample_rate=RATE, endpointing_ms=int(SILENCE * 1000),
                                  utterance_end_ms=1000)
            return await drive(plugin, frames(pcm16, RATE))

    events = asyncio.run(go())
    tok = varied_model.tokenizer
    offline = varied_model.transcribe(as_float(pcm16))
    check_turns(events, turns, offline.tokens, tok)
    finals = [text(e) for e in events if e.type is stt.SpeechEventType.FINAL_TRANSCRIPT]
    assert "".join(finals) == tok.decode(offline.tokens)  # CloseStream brings the rest
    assert sum(e.type is stt.SpeechEventType.INTERIM_TRANSCRIPT for e in events) >= len(turns)
    seen = set()
    for e in events:  # word times inside the turn that carries them, in order; a final's confidence its words'
        if e.type is stt.SpeechEventType.FINAL_TRANSCRIPT and e.alternatives[0].words:
            times = [(w.start_time, w.end_time) for w in e.alternatives[0].words]
            assert all(a <= b <= c for (a, b), (c, _) in zip(times, times[1:]))
            confidences = [w.confidence for w in e.alternatives[0].words]
            assert all(0 < c <= 1 for c in confidences)
            assert e.alternatives[0].confidence == pytest.approx(sum(confidences) / len(confidences))
            seen.update(confidences)
    assert len(seen) >= 5  # the words' own, not one figure for all


def test_openai_plugin_realtime_turns_and_finals(server, dialogue, varied_model):
    """OpenAI's plugin with ``base_url`` and ``use_realtime``: a transcription session with
    ``server_vad`` (silence 500 ms) on its 24 kHz PCM16; one completed item per turn, each the
    offline tokens of its stretch."""
    pcm16, turns = dialogue
    audio = soxr.resample(as_float(pcm16), RATE, 24000, quality="HQ")
    raw = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 0, "silence_duration_ms": int(SILENCE * 1000)}

    async def go():
        async with utils.http_context.open():
            plugin = openai.STT(api_key=KEY, base_url=f"http://{server}/v1", model="gpt-4o-mini-transcribe",
                                use_realtime=True, turn_detection=vad)
            return await drive(plugin, frames(raw, 24000), finals=len(turns))

    events = asyncio.run(go())
    expected = PcmDecoder("pcm_s16le", 24000).decode(raw.tobytes(), last=True)
    offline = varied_model.transcribe(expected)
    check_turns(events, turns, offline.tokens, varied_model.tokenizer)
