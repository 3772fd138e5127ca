"""Mistral's realtime transcription protocol, driven by the official ``mistralai`` SDK against the
real server, with turn detection by the real Silero VAD on real (espeak-ng) speech.

Every text is compared with offline ``transcribe`` of the same audio on the same weights: a
turn's segment is the offline tokens over its range, a flushed segment is offline ``transcribe`` of
the audio up to the flush, and the deltas add up to the whole.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math

import numpy as np
import pytest
import websockets
from dialogue import RATE, agent_server, as_float, positions_until

from voxlive.pcm import MULAW, PcmDecoder

mistralai = pytest.importorskip("mistralai")
pytest.importorskip("onnxruntime")
pytest.importorskip("silero_vad")
from mistralai.client import Mistral  # noqa: E402
from mistralai.extra.realtime import AudioFormat  # noqa: E402

KEY = "mistral-key"


@pytest.fixture(scope="module")
def server(varied_dir):
    with agent_server(varied_dir, KEY) as host:
        yield host


def chunks(data: bytes, size: int = 3200):
    return [data[i:i + size] for i in range(0, len(data), size)]


async def mistral_session(host, pieces, *, flush_after=None, **connect):
    """Stream ``pieces`` through the SDK (a flush after piece ``flush_after``), end, collect events
    until the server closes the session (a flush's ``transcription.done`` leaves it open)."""
    client = Mistral(api_key=KEY)
    connection = await client.audio.realtime.connect(model="voxtral-mini-transcribe-realtime-2602",
                                                     server_url=f"http://{host}", **connect)
    events = []

    async def send():
        for i, piece in enumerate(pieces):
            await connection.send_audio(piece)
            if i == flush_after:
                await connection.flush_audio()
        await connection.end_audio()

    sender = asyncio.create_task(send())
    async for event in connection:
        events.append(event)
        if event.type == "error":
            break
    await sender
    await connection.close()
    return events


def of(events, kind):
    return [e for e in events if getattr(e, "type", None) == kind]


def deltas(events) -> str:
    return "".join(e.text for e in of(events, "transcription.text.delta"))


def test_turns_from_vad_on_real_speech(server, dialogue, varied_model):
    """One turn per phrase group at min_silence_ms=500 (none inside the 0.3 s pause), start and stop
    within 100 ms of the speech measured from the audio, each segment the offline tokens of its
    stretch, and the deltas adding up to the whole offline transcript."""
    pcm16, turns = dialogue
    events = asyncio.run(mistral_session(server, chunks(pcm16.tobytes()),
                                         turn_detection={"min_silence_ms": 500}))
    assert not of(events, "error"), of(events, "error")
    assert [type(e).__name__ for e in events[:2]] == ["RealtimeTranscriptionSessionCreated",
                                                       "RealtimeTranscriptionSessionUpdated"]
    starts, ends = of(events, "turn.start"), of(events, "turn.end")
    assert len(starts) == len(ends) == len(turns)
    for (start, stop), s, e in zip(turns, starts, ends):
        assert abs(s.time_s - start) <= 0.1, (s.time_s, start)
        assert abs(e.time_s - stop) <= 0.1, (e.time_s, stop)
        assert e.end_reason == "threshold"
    order = [e.type for e in events if e.type in ("turn.start", "turn.end")]
    assert order == ["turn.start", "turn.end"] * len(turns)

    offline = varied_model.transcribe(as_float(pcm16))
    tok = varied_model.tokenizer
    done = of(events, "transcription.done")[0]
    assert deltas(events) == done.text == tok.decode(offline.tokens)
    segments = of(events, "transcription.segment")
    assert len(segments) >= len(turns)
    previous = 0
    for segment in segments[:len(turns)]:
        boundary = positions_until(segment.end)
        assert segment.text == tok.decode(offline.tokens[previous:boundary])
        previous = boundary
    # each turn's segment closes where its silence reached min_silence_ms, before its turn.end
    for (start, stop), segment in zip(turns, segments):
        assert abs(segment.end - (stop + 0.5)) <= 0.1
    assert [s.text for s in done.segments] == [s.text for s in segments]


def test_flush_in_the_middle_of_a_word_and_the_session_goes_on(server, dialogue, varied_model):
    """A flush mid-word gives a segment and a ``transcription.done`` equal to offline transcribe of
    the audio up to the flush; the session goes on, the next segment is the whole audio's offline
    tokens from the cut, and the last done carries that rest: the dones add up like the deltas."""
    pcm16, turns = dialogue
    data = pcm16.tobytes()
    piece = 1280 * 2  # 80 ms
    start, stop = turns[1]
    cut = int((start + 0.4 * (stop - start)) * RATE) // 1280 * 1280  # inside the third phrase
    pieces = chunks(data, piece)
    flush_after = cut // 1280 - 1
    events = asyncio.run(mistral_session(server, pieces, flush_after=flush_after))
    assert not of(events, "error")
    tok = varied_model.tokenizer
    segments = of(events, "transcription.segment")
    upto_cut = varied_model.transcribe(as_float(pcm16[:cut]))
    whole = varied_model.transcribe(as_float(pcm16))
    assert segments[0].text == tok.decode(upto_cut.tokens)
    assert abs(segments[0].end - cut / RATE) < 1e-3
    resume = math.ceil(cut / 1280)
    assert "".join(s.text for s in segments[1:]) == tok.decode(whole.tokens[resume:])
    dones = of(events, "transcription.done")
    assert len(dones) == 2
    assert dones[0].text == segments[0].text and [s.text for s in dones[0].segments] == [segments[0].text]
    assert dones[1].text == "".join(s.text for s in segments[1:])
    assert deltas(events) == dones[0].text + dones[1].text == "".join(s.text for s in segments)
    assert dones[0].usage.completion_tokens == len(upto_cut.tokens)  # the fork's tokens, its padding too
    assert dones[0].usage.prompt_tokens == 0 < dones[1].usage.prompt_tokens  # the prompt counted once
    assert not of(events, "turn.start")  # no turn_detection asked: no turn events


@pytest.mark.parametrize("encoding,rate", [("pcm_s16le", 24000), ("pcm_mulaw", 8000), ("pcm_f32le", 48000)])
def test_audio_formats_resampled_like_offline(server, dialogue, varied_model, encoding, rate):
    pcm16, _ = dialogue
    audio = as_float(pcm16)[: int(3.0 * RATE)]
    import soxr

    source = soxr.resample(audio, RATE, rate, quality="HQ").astype(np.float32)
    if encoding == "pcm_s16le":
        raw = (np.clip(source, -1, 1) * 32767).astype("<i2").tobytes()
    elif encoding == "pcm_f32le":
        raw = source.astype("<f4").tobytes()
    else:  # the nearest mu-law code of each sample
        order = np.argsort(MULAW)
        pos = np.clip(np.searchsorted(MULAW[order], source), 1, 255)
        nearer = np.where(np.abs(MULAW[order][pos - 1] - source) < np.abs(MULAW[order][pos] - source), pos - 1, pos)
        raw = order[nearer].astype(np.uint8).tobytes()
    expected = PcmDecoder(encoding, rate).decode(raw, last=True)
    events = asyncio.run(mistral_session(server, chunks(raw, 2000),
                                         audio_format=AudioFormat(encoding=encoding, sample_rate=rate)))
    assert not of(events, "error")
    assert of(events, "session.updated")[0].session.audio_format.sample_rate == rate
    offline = varied_model.transcribe(expected)
    assert deltas(events) == varied_model.tokenizer.decode(offline.tokens)


def test_noise_without_speech_gives_no_turn(server):
    noise = (np.random.default_rng(3).standard_normal(int(3 * RATE)) * 0.05 * 32767).astype("<i2")
    events = asyncio.run(mistral_session(server, chunks(noise.tobytes()), turn_detection={}))
    assert not of(events, "error")
    assert not of(events, "turn.start") and not of(events, "turn.end")


def test_many_turns_over_a_long_session(server, dialogue, varied_model):
    pcm16, turns = dialogue
    start, stop = turns[2]
    phrase = pcm16[int((start - 0.05) * RATE):int((stop + 0.05) * RATE)]
    gap = np.zeros(int(1.0 * RATE), "<i2")
    audio = np.concatenate([gap] + [np.concatenate([phrase, gap]) for _ in range(8)])
    events = asyncio.run(mistral_session(server, chunks(audio.tobytes(), 6400),
                                         turn_detection={"min_silence_ms": 400}))
    assert len(of(events, "turn.start")) == len(of(events, "turn.end")) == 8
    offline = varied_model.transcribe(as_float(audio))
    assert deltas(events) == varied_model.tokenizer.decode(offline.tokens)


# -- bad input, over a plain WebSocket (the SDK validates before sending) ---------------------------

async def raw_session(host, messages, *, key=KEY, settle=True):
    url = f"ws://{host}/v1/audio/transcriptions/realtime?model=tiny"
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                                  max_size=None) as ws:
        received = [json.loads(await ws.recv())]
        for message in messages:
            await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
        async for text in ws:
            received.append(json.loads(text))
            if received[-1]["type"] == "transcription.done":
                break
        return received


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_bad_input_gets_mistral_errors_and_loses_nothing(server, dialogue, varied_model):
    pcm16, _ = dialogue
    good = pcm16[: int(2.0 * RATE)].tobytes()
    half = len(good) // 2
    messages = [
        "not json",
        [1, 2],
        {"type": "no.such.event"},
        {"type": "session.update", "session": {"audio_format": {"encoding": "opus", "sample_rate": 16000}}},
        {"type": "session.update", "session": {"audio_format": {"encoding": "pcm_s16le", "sample_rate": 96000}}},
        {"type": "session.update", "session": {"turn_detection": {"start_threshold": "high"}}},
        {"type": "input_audio.append", "audio": 42},
        {"type": "input_audio.append", "audio": "***"},
        {"type": "input_audio.append", "audio": b64(good[:half])},
        {"type": "input_audio.append", "audio": b64(b"\x00\x01\x02")},  # odd byte count
        {"type": "input_audio.append", "audio": b64(bytes(300000))},  # over the append limit
        {"type": "session.update", "session": {"target_streaming_delay_ms": 400}},  # after audio
        {"type": "input_audio.append", "audio": b64(good[half:])},
        {"type": "input_audio.end"},
    ]
    received = asyncio.run(raw_session(server, messages))
    errors = [m for m in received if m["type"] == "error"]
    assert len(errors) == 11
    for e in errors:
        assert isinstance(e["error"]["message"], str) and isinstance(e["error"]["code"], int)
    assert "after audio has started" in errors[-1]["error"]["message"]
    text = "".join(m["text"] for m in received if m["type"] == "transcription.text.delta")
    offline = varied_model.transcribe(as_float(np.frombuffer(good, "<i2")))
    assert text == varied_model.tokenizer.decode(offline.tokens)
    assert received[-1]["type"] == "transcription.done" and received[-1]["text"] == text


def test_session_update_reports_what_it_applied(server):
    messages = [{"type": "session.update", "session": {"target_streaming_delay_ms": 500, "language": "fr",
                                                       "context_bias": ["Voxtral"]}},
                {"type": "input_audio.end"}]
    received = asyncio.run(raw_session(server, messages))
    updated = next(m for m in received if m["type"] == "session.updated")["session"]
    assert updated["target_streaming_delay_ms"] == 480  # the nearest allowed delay
    assert set(updated["not_applied"]) == {"language", "context_bias"}
    assert updated["language"] is None


def test_wrong_key_is_refused_in_mistral_shape(server):
    from mistralai.extra.exceptions import RealtimeTranscriptionWSError

    async def go():
        client = Mistral(api_key="wrong")
        await client.audio.realtime.connect(model="tiny", server_url=f"http://{server}")

    with pytest.raises(RealtimeTranscriptionWSError) as info:
        asyncio.run(go())
    assert info.value.payload.error.code == 401


def test_an_upgrade_whose_connection_header_comes_in_two_fields_is_accepted(server):
    """``Connection: Upgrade`` and ``Connection: keep-alive`` as two fields are one list (RFC 9110):
    LiveKit's mistralai plugin sends its upgrade so, and it must reach the route, not a 404."""
    async def go():
        headers = [("Authorization", f"Bearer {KEY}"), ("Connection", "keep-alive")]
        async with websockets.connect(f"ws://{server}/v1/audio/transcriptions/realtime?model=tiny",
                                      additional_headers=headers) as ws:
            return json.loads(await ws.recv())["type"]

    assert asyncio.run(go()) == "session.created"
