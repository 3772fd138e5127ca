"""Connections that live long and misbehave, against the real server under uvicorn.

One server with short timeouts and a slowed engine (a sleep in every decode step, so audio sent
as fast as the socket takes it outruns the engine): backpressure must not drop a client that
keepalive pings would have dropped, idle and stuck clients lose their slot with a clear close
code, a long pause is not idleness of the session, and finished utterances free their state.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import socket
import time
import weakref

import httpx
import numpy as np
import pytest
import websockets
from serving import running
from test_server import as_sent, asr_stream, pcm16, snapshot_words, webm_opus, words_of

import voxlive
from voxlive.audio import load_audio
from voxlive.server import WEBSOCKET_OPTIONS, Engine, create_app
from voxlive.server.stream_decoder import StreamDecoder

IDLE, SEND = 2.0, 1.0  # seconds


@pytest.fixture(scope="module")
def strict(varied_dir):
    model = voxlive.load(varied_dir, dtype="float32", device="cpu")
    decode = model.runtime.decode

    def slow_decode(states, feeds, **options):
        time.sleep(0.005 * sum(map(len, feeds)))  # per position: a pass of verified drafts is no faster
        return decode(states, feeds, **options)

    model.runtime.decode = slow_decode
    engine = Engine(model, max_sessions=4, max_buffer_seconds=0.5)
    streams = []
    stream = model.stream

    def recorded(**kw):
        s = stream(**kw)
        streams.append(weakref.ref(s))
        return s

    model.stream = recorded
    app = create_app(engine, model_id="tiny", idle_timeout=IDLE, send_timeout=SEND)
    options = dict(WEBSOCKET_OPTIONS, ws_ping_interval=0.1)  # the server pings ten times a second
    with running(app, **options) as host:
        yield host, engine, streams


def sessions(host) -> int:
    return httpx.get(f"http://{host}/health").json()["sessions"]


def wait_for_no_sessions(host, seconds=10.0) -> int:
    deadline = time.monotonic() + seconds
    while sessions(host) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sessions(host)


def test_a_client_slowed_by_backpressure_is_not_dropped_by_keepalive(strict, varied_model, speech):
    """Audio sent far faster than the engine goes: the server stops reading, pings go unanswered
    for seconds, and the client is slowed down, not dropped; nothing it sent is lost."""
    host, engine, _ = strict
    audio = np.concatenate([speech] * 3)
    expected = varied_model.transcribe(as_sent(audio))
    data = pcm16(audio)

    async def run():
        async with websockets.connect(f"ws://{host}/asr", ping_interval=None) as ws:
            t0 = time.monotonic()
            last = await asr_stream(ws, [data[i:i + 3200] for i in range(0, len(data), 3200)])
            return last, time.monotonic() - t0

    last, seconds = asyncio.run(run())
    assert snapshot_words(last) == words_of(expected)
    assert seconds > 1.0  # long enough for ten unanswered pings


def test_an_idle_connection_is_closed_with_1001_and_frees_its_slot(strict):
    host, _, _ = strict

    async def run():
        async with websockets.connect(f"ws://{host}/asr") as ws:
            assert json.loads(await ws.recv())["type"] == "config"
            busy = sessions(host)
            t0 = time.monotonic()
            told = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return busy, told, closed.value.rcvd.code, time.monotonic() - t0

    busy, told, code, seconds = asyncio.run(run())
    assert busy == 1 and code == 1001 and "nothing received" in told["error"]
    assert IDLE - 0.5 < seconds < IDLE + 3
    assert wait_for_no_sessions(host) == 0


def test_a_pause_shorter_than_the_idle_timeout_keeps_the_session(strict, varied_model, speech):
    """A client that stops sending (the server's pings still flowing) and resumes: one transcript."""
    host, _, _ = strict
    expected = varied_model.transcribe(as_sent(speech))
    data = pcm16(speech)
    half = len(data) // 2

    async def run():
        async with websockets.connect(f"ws://{host}/v1/realtime") as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[:half]).decode()}))
            await asyncio.sleep(IDLE * 0.75)
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[half:]).decode()}))
            await asyncio.sleep(IDLE * 0.75)  # twice the timeout in all, never that long at once
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            while (event := json.loads(await ws.recv()))["type"] != "transcription.done":
                assert event["type"] == "transcription.delta"
            return event

    assert asyncio.run(run())["text"] == expected.text


def test_a_client_that_stops_reading_loses_its_slot_after_the_send_timeout(strict, speech):
    host, _, _ = strict
    data = pcm16(np.concatenate([speech] * 4))

    async def run():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        sock.connect(tuple(host.rsplit(":", 1)[:1]) + (int(host.rsplit(":", 1)[1]),))
        ws = await websockets.connect(f"ws://{host}/asr", sock=sock, max_queue=1, ping_interval=None)
        for i in range(0, len(data), 3200):  # never reads a snapshot
            await ws.send(data[i:i + 3200])
        await ws.send(b"")
        left = wait_for_no_sessions(host, 30)
        ws.transport.abort()
        return left

    assert asyncio.run(run()) == 0


def test_finished_utterances_free_their_streams_on_a_long_connection(strict, speech):
    host, _, streams = strict
    data = pcm16(speech[:16000])

    async def run():
        async with websockets.connect(f"ws://{host}/v1/realtime") as ws:
            await ws.recv()
            before = len(streams)
            for _ in range(5):
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}))
                await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
                while json.loads(await ws.recv())["type"] != "transcription.done":
                    pass
            await asyncio.sleep(0.2)
            gc.collect()
            return len(streams) - before, sum(ref() is not None for ref in streams[before:])

    opened, alive = asyncio.run(run())
    assert opened == 5 and alive == 0  # the connection is still open; none of its utterances lives on


def test_a_webm_stream_waits_for_the_decoder_instead_of_piling_up(speech):
    """The container bytes a decoder holds stay under its bound while its consumer is slow."""
    data = webm_opus(np.concatenate([speech] * 6))
    got, done = [], []

    def on_pcm(pcm):
        time.sleep(0.01)  # the engine is behind
        got.append(pcm)

    decoder = StreamDecoder(on_pcm, done.append, max_buffer=8192)
    for i in range(0, len(data), 1000):
        decoder.feed(data[i:i + 1000])
    decoder.close()
    for _ in range(400):
        if done:
            break
        time.sleep(0.05)
    assert done == [None] and len(data) > 20 * 8192
    assert decoder.peak_buffered <= 8192 + 1000
    pcm = np.concatenate(got)
    assert abs(len(pcm) - len(load_audio(data))) <= 16000 * 0.1
