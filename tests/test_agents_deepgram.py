"""Deepgram live (v1) on /v1/listen, driven by the official ``deepgram-sdk`` with a custom base URL
against the real server; finals compared with offline ``transcribe`` of the same audio."""

from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import websockets
from dialogue import RATE, TOKEN, agent_server, as_float, positions_until

from voxlive.pcm import PcmDecoder
from voxlive.server.deepgram import DeepgramConnection

deepgram = pytest.importorskip("deepgram")
pytest.importorskip("onnxruntime")
pytest.importorskip("silero_vad")
from deepgram import AsyncDeepgramClient  # noqa: E402
from deepgram.environment import DeepgramClientEnvironment  # noqa: E402

KEY = "deepgram-key"


@pytest.fixture(scope="module")
def server(varied_dir):
    with agent_server(varied_dir, KEY) as host:
        yield host


def client(host, key=KEY):
    env = DeepgramClientEnvironment(base=f"http://{host}", production=f"ws://{host}",
                                    agent=f"ws://{host}", agent_rest=f"http://{host}")
    return AsyncDeepgramClient(api_key=key, environment=env)


async def listen(host, frames, *, finalize_after=(), **query):
    """Send binary ``frames`` through the SDK (Finalize after the listed ones), CloseStream, collect."""
    messages = []
    async with client(host).listen.v1.connect(model="nova-3", **query) as socket:
        async def send():
            for i, frame in enumerate(frames):
                await socket.send_media(frame)
                if i in finalize_after:
                    await socket.send_finalize()
            await socket.send_close_stream()

        sender = asyncio.create_task(send())
        async for message in socket:
            messages.append(message)
        await sender
    return messages


def of(messages, kind):
    return [m for m in messages if getattr(m, "type", None) == kind]


def finals(messages):
    return [m for m in of(messages, "Results") if m.is_final]


def offline_stream(model, pcm):
    """The offline transcription of ``pcm`` as a finished stream: its tokens and their probabilities."""
    s = model.stream()
    s.feed(pcm)
    s.finish()
    return s


def assert_confidences(results, stream, tokenizer, duration: float) -> int:
    """Every word's confidence is in (0, 1] and is the mean of the offline probabilities of the text
    tokens it spans (token j is the audio's [0.08 j, 0.08 j + 0.08)); the alternative's is the mean
    of its words'. Returns how many words were checked (those not clipped at the audio's end)."""
    checked = 0
    for m in results:
        alternative = m.channel.alternatives[0]
        for w in alternative.words:
            assert 0 < w.confidence <= 1
            if w.end > duration - TOKEN:
                continue
            span = range(round(w.start / TOKEN), round(w.end / TOKEN))
            expected = np.mean([stream.probabilities[j] for j in span if tokenizer.is_text(stream.tokens[j])])
            assert w.confidence == pytest.approx(expected, rel=1e-4), (w, m.is_final)
            checked += 1
        expected = np.mean([w.confidence for w in alternative.words]) if alternative.words else 0.0
        assert alternative.confidence == pytest.approx(expected)
    return checked


def test_endpointing_utterances_on_linear16(server, dialogue, varied_model):
    """endpointing=500: one speech_final result per turn, SpeechStarted within 100 ms of the speech,
    UtteranceEnd after each, finals equal to the offline tokens of their stretch and adding up (with
    the closing result) to the offline transcript; interim results grow toward each final."""
    pcm16, turns = dialogue
    data = pcm16.tobytes()
    frames = [data[i:i + 3201] for i in range(0, len(data), 3201)]  # frames that split samples
    messages = asyncio.run(listen(server, frames, encoding="linear16", sample_rate="16000", interim_results="true",
                                  endpointing="500", utterance_end_ms="1000", vad_events="true"))
    assert not of(messages, "Error"), of(messages, "Error")
    started = of(messages, "SpeechStarted")
    assert len(started) == len(turns)
    for (start, _), s in zip(turns, started):
        assert abs(s.timestamp - start) <= 0.1
    speech_final = [m for m in finals(messages) if m.speech_final]
    assert len(speech_final) == len(turns)
    for (_, stop), m in zip(turns, speech_final):
        assert abs(m.start + m.duration - (stop + 0.5)) <= 0.1
    offline = varied_model.transcribe(as_float(pcm16))
    tok = varied_model.tokenizer
    texts = [m.channel.alternatives[0].transcript for m in finals(messages)]
    assert "".join(texts) == tok.decode(offline.tokens)
    previous = 0
    for m in speech_final:
        boundary = positions_until(m.start + m.duration)
        assert m.channel.alternatives[0].transcript == tok.decode(offline.tokens[previous:boundary])
        previous = boundary
        words = m.channel.alternatives[0].words
        assert all(m.start - 1e-6 <= w.start <= w.end <= m.start + m.duration + 1e-6 for w in words)
    interim = [m for m in of(messages, "Results") if not m.is_final]
    assert interim and all(m.channel.alternatives[0].transcript for m in interim), [m.channel.alternatives[0].transcript for m in interim]
    # word confidences: the offline words' probabilities, and the offline tokens' means in interim results too
    stream = offline_stream(varied_model, as_float(pcm16))
    duration = len(pcm16) / RATE
    assert assert_confidences(finals(messages), stream, tok, duration) >= 10
    assert assert_confidences(interim, stream, tok, duration) >= 10
    offline_words = {(w.text, w.start, w.end): w.probability for w in offline.words}
    same = [(w.confidence, offline_words[w.word, w.start, w.end]) for m in finals(messages)
            for w in m.channel.alternatives[0].words if (w.word, w.start, w.end) in offline_words]
    assert len(same) >= len(offline.words) // 2
    assert [c for c, _ in same] == pytest.approx([p for _, p in same], rel=1e-4)
    # UtteranceEnd only after a second (utterance_end_ms) without speech: the 2 s pause and the tail
    assert len(of(messages, "UtteranceEnd")) == 2
    assert of(messages, "Metadata")[-1].request_id == speech_final[0].metadata.request_id


def test_finalize_in_a_word_on_mulaw_and_the_stream_goes_on(server, dialogue, varied_model):
    pcm16, turns = dialogue
    from test_agents_openai import to_mulaw

    raw = to_mulaw(pcm16)
    frames = [raw[i:i + 400] for i in range(0, len(raw), 400)]  # 50 ms
    start, stop = turns[1]
    at = int((start + 0.4 * (stop - start)) * 20)
    messages = asyncio.run(listen(server, frames, finalize_after=[at], encoding="mulaw", sample_rate="8000",
                                  endpointing="false"))
    assert not of(messages, "Error")
    results = finals(messages)
    assert results[0].from_finalize and not results[0].speech_final
    n = len(PcmDecoder("pcm_mulaw", 8000).decode(b"".join(frames[:at + 1])))
    streamed = PcmDecoder("pcm_mulaw", 8000).decode(raw, last=True)
    tok = varied_model.tokenizer
    assert results[0].channel.alternatives[0].transcript == tok.decode(varied_model.transcribe(streamed[:n]).tokens)
    rest = "".join(m.channel.alternatives[0].transcript for m in results[1:])
    assert rest == tok.decode(varied_model.transcribe(streamed).tokens[math.ceil(n / 1280):])
    # the forced final's words have the fork's probabilities: the offline ones of the audio up to the cut
    assert assert_confidences(results[:1], offline_stream(varied_model, streamed[:n]), tok, n / RATE) >= 2
    assert assert_confidences(results[1:], offline_stream(varied_model, streamed), tok, len(streamed) / RATE) >= 5


def test_wrong_key_and_bad_parameters_are_refused_at_the_handshake(server):
    async def status(query, key=KEY):
        with pytest.raises(websockets.InvalidStatus) as info:
            async with websockets.connect(f"ws://{server}/v1/listen?{query}",
                                          additional_headers={"Authorization": f"Token {key}"}):
                pass
        return info.value.response.status_code, json.loads(info.value.response.body)

    assert asyncio.run(status("encoding=linear16&sample_rate=16000", key="wrong"))[0] == 401
    for query in ("encoding=amr-nb&sample_rate=8000", "encoding=linear16&sample_rate=96000",
                  "encoding=linear16", "encoding=linear16&sample_rate=16000&interim_results=maybe"):
        code, body = asyncio.run(status(query))
        assert code == 400 and body["err_msg"], query

    async def sdk_wrong_key():
        async with client(server, key="wrong").listen.v1.connect(model="nova-3", encoding="linear16",
                                                                 sample_rate="16000"):
            pass

    from deepgram.core.api_error import ApiError

    with pytest.raises(ApiError) as info:
        asyncio.run(sdk_wrong_key())
    assert info.value.status_code == 401


def test_bad_messages_get_errors_and_the_stream_goes_on(server, dialogue, varied_model):
    pcm16, _ = dialogue
    data = pcm16[: int(1.5 * RATE)].tobytes()

    async def go():
        async with websockets.connect(f"ws://{server}/v1/listen?encoding=linear16&sample_rate=16000",
                                      additional_headers={"Authorization": f"Token {KEY}"}) as ws:
            await ws.send(data[:1001])
            await ws.send("not json")
            await ws.send(json.dumps({"type": "Configure"}))
            await ws.send(json.dumps({"type": "KeepAlive"}))
            await ws.send(data[1001:])
            await ws.send(json.dumps({"type": "CloseStream"}))
            return [json.loads(m) async for m in ws]

    messages = asyncio.run(go())
    errors = [m for m in messages if m["type"] == "Error"]
    assert len(errors) == 2 and all(e["description"] for e in errors)
    text = "".join(m["channel"]["alternatives"][0]["transcript"] for m in messages
                   if m["type"] == "Results" and m["is_final"])
    assert text == varied_model.tokenizer.decode(varied_model.transcribe(as_float(pcm16[: int(1.5 * RATE)])).tokens)
    assert messages[-1]["type"] == "Metadata"


def test_idle_stream_is_closed_with_net_0001(server, monkeypatch):
    monkeypatch.setattr(DeepgramConnection, "idle_seconds", 0.5)

    async def go():
        async with websockets.connect(f"ws://{server}/v1/listen?encoding=linear16&sample_rate=16000",
                                      additional_headers={"Authorization": f"Token {KEY}"}) as ws:
            message = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return message, closed.value.rcvd.code

    message, code = asyncio.run(go())
    assert message["type"] == "Error" and message["variant"] == "NET-0001"
    assert code == 1011

