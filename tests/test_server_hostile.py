"""Hostile input against the real server: every case gets a clear answer, and the server goes on.

Found by fuzzing: a WAV header that claims 1 Hz, a client that hangs up during its upload's
transcription, a chunked upload without Content-Length, NaN and huge numbers in /v1/subtitles,
lone surrogates, 5,000-digit integers and deep nesting on /v1/realtime, abrupt disconnects.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import select
import socket
import struct
import time

import httpx
import numpy as np
import pytest
import soundfile
import websockets
from serving import running
from test_server import as_sent, pcm16, realtime_utterance

import voxlive
from voxlive.server import Engine, create_app

MAX_SECONDS = 600


@pytest.fixture(scope="module")
def server(varied_dir):
    model = voxlive.load(varied_dir, dtype="float32", device="cpu")
    decode = model.runtime.decode

    def slow_decode(*args, **options):  # long uploads take seconds, so a client can give up on one
        time.sleep(0.002)
        return decode(*args, **options)

    model.runtime.decode = slow_decode
    engine = Engine(model, max_sessions=4)
    app = create_app(engine, model_id="tiny", max_upload_mb=4.0, max_upload_seconds=MAX_SECONDS)
    with running(app) as host:
        yield host, engine


def wav_header_claiming(rate: int, samples: int) -> bytes:
    data = bytes(2 * samples)
    fmt = struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(data)) + data


def wav(pcm: np.ndarray) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, pcm, 16000, format="WAV")
    return out.getvalue()


def test_an_upload_longer_than_the_limit_is_refused_from_its_header(server):
    host, _ = server
    t0 = time.monotonic()
    r = httpx.post(f"http://{host}/v1/audio/transcriptions", files={"file": ("hz.wav", wav_header_claiming(1, 2000))},
                   timeout=60)
    assert r.status_code == 400 and "over the limit of 600 s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10  # refused, not resampled to 128 MB and transcribed


def test_a_client_that_hangs_up_cancels_its_transcription(server, speech):
    host, engine = server
    audio = np.concatenate([speech] * 25)  # ~2 minutes: far more steps than the test waits for
    positions = len(audio) // 1280
    before = engine.steps
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"http://{host}/v1/audio/transcriptions", files={"file": ("long.wav", wav(audio))}, timeout=1.0)
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    stopped = engine.steps
    time.sleep(0.5)
    assert engine.steps == stopped and stopped - before < positions  # not run to the end


def test_a_chunked_upload_is_cut_off_at_the_limit_while_it_arrives(server):
    host, _ = server
    addr, port = host.rsplit(":", 1)
    sock = socket.create_connection((addr, int(port)))
    boundary = "x" * 16
    sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
    chunk = bytes(64 * 1024)
    sent = 0
    try:
        while sent < 300 * 1024 * 1024 and not select.select([sock], [], [], 0)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = sock.recv(4096)
    sock.close()
    assert response.startswith(b"HTTP/1.1 413")
    assert sent < 16 * 1024 * 1024  # the server answered once it had seen 4 MB (plus the socket buffers)


@pytest.mark.parametrize("body", [
    '{"words": [{"text": "a", "start": NaN, "end": 1}]}',
    '{"words": [{"text": "a", "start": 0, "end": Infinity}]}',
    '{"words": [{"text": "a", "start": 0, "end": 1e308}]}',
    '{"words": [{"text": "a", "start": 2, "end": 1}]}',
    '{"words": [{"text": ["a"], "start": 0, "end": 1}]}',
    '{"words": [{"text": "a", "start": 0, "end": 1}], "format": "' + "[" * 100 + '"}',
    '{"words": ' + "[" * 100000 + "]" * 100000 + "}",
    '{"words": [{"text": "a", "start": ' + "9" * 5000 + ', "end": 1}]}',
    '[1, 2]',
])
def test_subtitles_refuse_what_is_not_a_word_with_400(server, body):
    host, _ = server
    r = httpx.post(f"http://{host}/v1/subtitles", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_subtitles_still_work(server):
    host, _ = server
    r = httpx.post(f"http://{host}/v1/subtitles", json={"words": [{"text": "hi", "start": 0.5, "end": 1.25}]})
    assert r.status_code == 200 and "00:00:00,500 --> 00:00:01,250" in r.text


def test_realtime_survives_surrogates_huge_integers_and_deep_nesting(server, varied_model, speech):
    host, _ = server
    expected = varied_model.transcribe(as_sent(speech))
    bad = ['{"type": "\\ud800"}', '{"type": "x", "n": ' + "9" * 5000 + "}", "[" * 100000 + "]" * 100000,
           '{"type": "input_audio_buffer.append", "audio": "\\udfff"}']

    async def run():
        async with websockets.connect(f"ws://{host}/v1/realtime") as ws:
            await ws.recv()
            errors = []
            for message in bad:
                await ws.send(message)
                errors.append(json.loads(await ws.recv()))
            return errors, await realtime_utterance(ws, speech)

    errors, (text, done, _) = asyncio.run(run())
    assert [e["type"] for e in errors] == ["error"] * 4
    assert [e["code"] for e in errors] == ["unknown_event", "invalid_json", "invalid_json", "invalid_audio"]
    assert done["text"] == text == expected.text


def test_abrupt_disconnects_are_not_logged_as_errors(server, speech, caplog):
    host, engine = server
    data = pcm16(speech)

    async def run():
        ws = await websockets.connect(f"ws://{host}/asr")
        await ws.recv()
        await ws.send(data)
        await asyncio.sleep(0.3)
        ws.transport.abort()
        ws = await websockets.connect(f"ws://{host}/v1/realtime")
        await ws.recv()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        await asyncio.sleep(0.3)
        ws.transport.abort()
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(f"http://{host}/v1/audio/transcriptions",
                                  files={"file": ("a.wav", wav(np.concatenate([speech] * 25)))}, timeout=1.0)
        await asyncio.sleep(1.0)

    with caplog.at_level(logging.INFO):
        asyncio.run(run())
    deadline = time.monotonic() + 10
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
