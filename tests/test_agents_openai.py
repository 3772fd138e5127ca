"""OpenAI Realtime transcription sessions on /v1/realtime, driven by the official ``openai`` SDK
(``client.realtime.connect``) against the real server, beside vLLM's protocol on the same path.

Each item's completed transcript is compared with offline ``transcribe`` of the same audio,
resampled the same way (24 kHz PCM16 and 8 kHz G.711 -> 16 kHz with voxlive's PcmDecoder).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math

import numpy as np
import pytest
import soxr
import websockets
from dialogue import RATE, agent_server, as_float, positions_until

from voxlive.pcm import MULAW, PcmDecoder

openai = pytest.importorskip("openai")
pytest.importorskip("onnxruntime")
pytest.importorskip("silero_vad")

KEY = "openai-key"


@pytest.fixture(scope="module")
def server(varied_dir):
    with agent_server(varied_dir, KEY) as host:
        yield host


def to_24k_pcm16(pcm16: np.ndarray) -> bytes:
    audio = soxr.resample(as_float(pcm16), RATE, 24000, quality="HQ")
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def to_mulaw(pcm16: np.ndarray) -> bytes:
    audio = soxr.resample(as_float(pcm16), RATE, 8000, quality="HQ")
    order = np.argsort(MULAW)
    pos = np.clip(np.searchsorted(MULAW[order], audio), 1, 255)
    nearer = np.where(np.abs(MULAW[order][pos - 1] - audio) < np.abs(MULAW[order][pos] - audio), pos - 1, pos)
    return order[nearer].astype(np.uint8).tobytes()


async def openai_session(host, session: dict, pieces, *, commit_after=(), intent=True, until_items=1):
    """Connect with the SDK, update the session, append ``pieces`` (a commit after the listed ones),
    and collect events until ``until_items`` transcripts are completed."""
    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"http://{host}/v1")
    extra = {"intent": "transcription"} if intent else {}
    events = []
    async with client.realtime.connect(model="tiny" if not intent else openai.omit, extra_query=extra) as conn:
        await conn.session.update(session=session)

        async def send():
            for i, piece in enumerate(pieces):
                await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
                if i in commit_after:
                    await conn.input_audio_buffer.commit()

        sender = asyncio.create_task(send())
        completed = 0
        async for event in conn:
            events.append(event)
            assert event.event_id
            if event.type == "error":
                break
            if event.type == "conversation.item.input_audio_transcription.completed":
                completed += 1
                if completed == until_items:
                    break
        await sender
    return events


def of(events, kind):
    return [e for e in events if e.type == kind]


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


GA_VAD = {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": 24000}, "transcription": {"model": "tiny"},
    "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 0, "silence_duration_ms": 500}}}}


def test_server_vad_items_on_24k_pcm16(server, dialogue, varied_model):
    """server_vad: one item per turn, speech_started/stopped within 100 ms of the speech (stopped
    counting the silence, as OpenAI's audio_end_ms does), each transcript the offline tokens of its
    stretch, each item's deltas adding up to its transcript."""
    pcm16, turns = dialogue
    raw = to_24k_pcm16(pcm16)
    events = asyncio.run(openai_session(server, GA_VAD, pieces_of(raw, 4800), until_items=len(turns)))
    assert not of(events, "error"), of(events, "error")
    assert events[0].type == "session.created" and events[1].type == "session.updated"
    started, stopped = of(events, "input_audio_buffer.speech_started"), of(events, "input_audio_buffer.speech_stopped")
    committed = of(events, "input_audio_buffer.committed")
    completed = of(events, "conversation.item.input_audio_transcription.completed")
    assert len(started) == len(stopped) == len(committed) == len(completed) == len(turns)
    for (start, stop), a, b in zip(turns, started, stopped):
        assert abs(a.audio_start_ms / 1000 - start) <= 0.1
        assert abs(b.audio_end_ms / 1000 - (stop + 0.5)) <= 0.1
        assert a.item_id == b.item_id
    assert [c.item_id for c in committed] == [c.item_id for c in completed] == [s.item_id for s in started]
    assert committed[0].previous_item_id is None and committed[1].previous_item_id == committed[0].item_id

    expected = PcmDecoder("pcm_s16le", 24000).decode(raw, last=True)
    offline = varied_model.transcribe(expected)
    tok = varied_model.tokenizer
    previous = 0
    for stop_event, done in zip(stopped, completed):
        boundary = positions_until(stop_event.audio_end_ms / 1000)
        assert done.transcript == tok.decode(offline.tokens[previous:boundary])
        deltas = [d.delta for d in of(events, "conversation.item.input_audio_transcription.delta")
                  if d.item_id == done.item_id]
        assert "".join(deltas) == done.transcript
        previous = boundary


def test_client_commits_on_mulaw_without_turn_detection(server, dialogue, varied_model):
    """turn_detection null: the client's commits cut the items; each transcript equals offline
    transcribe of the audio up to its commit over its tokens, and the session goes on."""
    pcm16, turns = dialogue
    raw = to_mulaw(pcm16)
    pieces = pieces_of(raw, 800)  # 100 ms each
    cuts = [int((turns[0][1] + 0.2) * 10), int((turns[1][1] + 0.2) * 10)]
    session = {"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcmu"},
                                                            "turn_detection": None}}}
    events = asyncio.run(openai_session(server, session, pieces, commit_after=cuts, until_items=2))
    assert not of(events, "error"), of(events, "error")
    assert not of(events, "input_audio_buffer.speech_started")
    assert events[1].session.audio.input.turn_detection is None
    completed = of(events, "conversation.item.input_audio_transcription.completed")
    decoder = PcmDecoder("pcm_mulaw", 8000)
    streamed = np.concatenate([decoder.decode(p) for p in pieces])
    n1, n2 = (len(PcmDecoder("pcm_mulaw", 8000).decode(b"".join(pieces[:cut + 1]))) for cut in cuts)
    tok = varied_model.tokenizer
    first = varied_model.transcribe(streamed[:n1])
    second = varied_model.transcribe(streamed[:n2])
    assert completed[0].transcript == tok.decode(first.tokens)
    assert completed[1].transcript == tok.decode(second.tokens[math.ceil(n1 / 1280):])


def test_without_intent_the_first_session_update_picks_openai(server, dialogue, varied_model):
    """A client that connects with ?model= only (no intent) and sends a GA transcription
    session.update is served as OpenAI; vLLM's clients (tests/test_server.py) are unchanged."""
    pcm16, _ = dialogue
    raw = to_24k_pcm16(pcm16[: int(2.0 * RATE)])
    session = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
    pieces = pieces_of(raw, 4800)
    events = asyncio.run(openai_session(server, session, pieces, commit_after=[len(pieces) - 1], intent=False))
    assert not of(events, "error")
    assert events[1].type == "session.updated" and events[1].session.type == "transcription"
    done = of(events, "conversation.item.input_audio_transcription.completed")[0]
    streamed = PcmDecoder("pcm_s16le", 24000).decode(raw)
    assert done.transcript == varied_model.tokenizer.decode(varied_model.transcribe(streamed).tokens)


# -- beta shape and bad input over a plain WebSocket -------------------------------------------------

async def raw_session(host, messages, *, key=KEY, items=0, query="?intent=transcription"):
    async with websockets.connect(f"ws://{host}/v1/realtime{query}", additional_headers={"Authorization": f"Bearer {key}"},
                                  max_size=None) as ws:
        received = [json.loads(await ws.recv())] if "intent" in query else []
        for message in messages:
            await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
        await ws.send(json.dumps({"type": "no.such.event", "event_id": "evt_last"}))
        done, last_seen = 0, False
        async for text in ws:
            received.append(json.loads(text))
            event = received[-1]
            if event["type"] == "conversation.item.input_audio_transcription.completed":
                done += 1
            last_seen |= event["type"] == "error" and event["error"].get("event_id") == "evt_last"
            if done >= items and last_seen:
                break
        return received


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_beta_transcription_session_update(server, dialogue, varied_model):
    pcm16, _ = dialogue
    raw = to_24k_pcm16(pcm16[: int(1.5 * RATE)])
    messages = [{"type": "transcription_session.update",
                 "session": {"input_audio_format": "pcm16", "turn_detection": None,
                             "input_audio_transcription": {"model": "tiny", "language": "en"}}},
                {"type": "input_audio_buffer.append", "audio": b64(raw)},
                {"type": "input_audio_buffer.commit"}]
    received = asyncio.run(raw_session(server, messages, items=1, query=""))
    updated = next(m for m in received if m["type"] == "transcription_session.updated")["session"]
    assert updated["input_audio_format"] == "pcm16" and updated["turn_detection"] is None
    assert any("language" in note for note in updated["voxlive_notes"])
    done = next(m for m in received if m["type"] == "conversation.item.input_audio_transcription.completed")
    streamed = PcmDecoder("pcm_s16le", 24000).decode(raw)
    assert done["transcript"] == varied_model.tokenizer.decode(varied_model.transcribe(streamed).tokens)


def test_bad_input_gets_openai_errors_and_loses_nothing(server, dialogue, varied_model):
    pcm16, _ = dialogue
    raw = to_24k_pcm16(pcm16[: int(1.5 * RATE)])
    half = len(raw) // 2 // 2 * 2
    no_vad = {"type": "transcription", "audio": {"input": {"turn_detection": None}}}
    messages = [
        "not json",
        {"type": "input_audio_buffer.commit", "event_id": "evt_empty"},  # nothing to commit yet
        {"type": "session.update", "session": {"type": "realtime"}},
        {"type": "session.update", "session": {"type": "transcription",
                                               "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}},
        {"type": "session.update", "session": {"type": "transcription",
                                               "audio": {"input": {"format": {"type": "audio/opus"}}}}},
        {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "threshold": 3}}}}},
        {"type": "session.update", "session": no_vad},
        {"type": "input_audio_buffer.append", "audio": 7},
        {"type": "input_audio_buffer.append", "audio": "%%%"},
        {"type": "input_audio_buffer.append", "audio": b64(raw[:half])},
        {"type": "input_audio_buffer.append", "audio": b64(b"\x01\x02\x03")},  # odd byte count
        {"type": "session.update", "session": no_vad},  # after audio
        {"type": "input_audio_buffer.append", "audio": b64(raw[half:])},
        {"type": "input_audio_buffer.commit"},
    ]
    received = asyncio.run(raw_session(server, messages, items=1))
    assert all(m.get("event_id") for m in received)
    errors = [m["error"] for m in received if m["type"] == "error"]
    assert len(errors) == 10 + 1  # and the closing unknown event
    for e in errors:
        assert e["type"] == "invalid_request_error" and isinstance(e["message"], str)
    assert errors[1]["code"] == "input_audio_buffer_commit_empty" and errors[1]["event_id"] == "evt_empty"
    done = next(m for m in received if m["type"] == "conversation.item.input_audio_transcription.completed")
    streamed = PcmDecoder("pcm_s16le", 24000).decode(raw)
    assert done["transcript"] == varied_model.tokenizer.decode(varied_model.transcribe(streamed).tokens)


def test_wrong_key_is_refused_in_openai_shape(server):
    async def go():
        async with websockets.connect(f"ws://{server}/v1/realtime?intent=transcription",
                                      additional_headers={"Authorization": "Bearer wrong"}) as ws:
            event = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return event, closed.value.rcvd.code

    event, code = asyncio.run(go())
    assert event["type"] == "error" and event["error"]["code"] == "unauthorized" and event["event_id"]
    assert code == 1008


def test_clear_drops_the_uncommitted_transcript_and_the_session_goes_on(server, dialogue, varied_model):
    pcm16, _ = dialogue
    raw = to_24k_pcm16(pcm16[: int(2.0 * RATE)])
    first, second = raw[: len(raw) // 2 // 2 * 2], raw[len(raw) // 2 // 2 * 2:]
    messages = [{"type": "session.update", "session": {"type": "transcription",
                                                       "audio": {"input": {"turn_detection": None}}}},
                {"type": "input_audio_buffer.append", "audio": b64(first)},
                {"type": "input_audio_buffer.clear"},
                {"type": "input_audio_buffer.append", "audio": b64(second)},
                {"type": "input_audio_buffer.commit"}]
    received = asyncio.run(raw_session(server, messages, items=1))
    assert any(m["type"] == "input_audio_buffer.cleared" for m in received)
    completed = [m for m in received if m["type"] == "conversation.item.input_audio_transcription.completed"]
    assert len(completed) == 1
    decoder = PcmDecoder("pcm_s16le", 24000)
    n_clear = len(decoder.decode(first))
    streamed = np.concatenate([PcmDecoder("pcm_s16le", 24000).decode(first + second)])
    offline = varied_model.transcribe(streamed[: n_clear + len(decoder.decode(second))])
    assert completed[0]["transcript"] == varied_model.tokenizer.decode(offline.tokens[math.ceil(n_clear / 1280):])


def test_audio_before_any_session_update_uses_the_announced_defaults(server, dialogue, varied_model):
    """?intent=transcription announces PCM16 24 kHz with server_vad; audio sent at once is taken so."""
    pcm16, turns = dialogue
    raw = to_24k_pcm16(pcm16)
    messages = [{"type": "input_audio_buffer.append", "audio": b64(raw[i:i + 48000])} for i in range(0, len(raw), 48000)]
    received = asyncio.run(raw_session(server, messages, items=len(turns)))
    created = received[0]["session"]["audio"]["input"]
    assert created["format"] == {"type": "audio/pcm", "rate": 24000} and created["turn_detection"]["type"] == "server_vad"
    completed = [m for m in received if m["type"] == "conversation.item.input_audio_transcription.completed"]
    stopped = [m for m in received if m["type"] == "input_audio_buffer.speech_stopped"]
    assert len(completed) == len(stopped) == len(turns)
    offline = varied_model.transcribe(PcmDecoder("pcm_s16le", 24000).decode(raw, last=True))
    boundary = positions_until(stopped[0]["audio_end_ms"] / 1000)
    assert completed[0]["transcript"] == varied_model.tokenizer.decode(offline.tokens[:boundary])
