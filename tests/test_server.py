"""The server, really started under uvicorn and driven by real clients over loopback.

Every transcript a client receives is compared with offline ``transcribe`` of the same audio on
the same weights (the tiny checkpoint whose tokens follow the audio): batching, protocols and
bad input around a session must not change a single token.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import av
import httpx
import numpy as np
import pytest
import soundfile
import websockets
from serving import refused, running

import voxlive
from voxlive.audio import load_audio
from voxlive.server import Engine, create_app

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_MESSAGE = 256 * 1024


@pytest.fixture(scope="module")
def offline(varied_model):
    return varied_model


@pytest.fixture(scope="module")
def server(varied_dir):
    """A server with its own copy of the model (the tests compute expectations on another one)."""
    model = voxlive.load(varied_dir, dtype="float32", device="cpu")
    engine = Engine(model, max_sessions=12)
    app = create_app(engine, model_id="tiny", api_key=KEY, max_upload_mb=1.0)
    with running(app, ws_max_size=MAX_MESSAGE) as host:
        yield host, engine


def pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


def as_sent(pcm: np.ndarray) -> np.ndarray:
    """The float audio the server sees after PCM16 transport."""
    return np.frombuffer(pcm16(pcm), dtype="<i2").astype(np.float32) / 32768.0


def words_of(transcript) -> list[dict]:
    return [{"text": w.text, "start": w.start, "end": w.end} for w in transcript.words]


def delta_words(deltas: list[dict]) -> list[dict]:
    return [w for d in deltas for w in d.get("words", [])]


async def realtime_utterance(ws, pcm: np.ndarray, chunk: int = 2560) -> tuple[str, dict, list[dict]]:
    """vLLM's client flow for one utterance: commit, appends, final commit; text, done, the deltas."""
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    data = pcm16(pcm)
    for i in range(0, len(data), chunk):
        audio = base64.b64encode(data[i:i + chunk]).decode()
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
    text, deltas = "", []
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "transcription.delta":
            text += event["delta"]
            deltas.append(event)
        elif event["type"] == "transcription.done":
            return text, event, deltas
        else:
            raise AssertionError(f"unexpected event {event}")


async def realtime_transcribe(host: str, pcm: np.ndarray, chunk: int = 2560, delay_ms: int | None = None,
                              done_words: bool = False):
    query = "?" + "&".join(([f"delay_ms={delay_ms}"] if delay_ms else []) + (["done_words=true"] if done_words else []))
    async with websockets.connect(f"ws://{host}/v1/realtime{query}", additional_headers=AUTH) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.send(json.dumps({"type": "session.update", "model": "tiny"}))
        return await realtime_utterance(ws, pcm, chunk)


async def asr_stream(ws, frames, *, collect_errors: list | None = None, config_read: bool = False) -> dict:
    """Send binary frames then the empty end frame; return the last snapshot before ready_to_stop."""
    if not config_read:
        config = json.loads(await ws.recv())
        assert config == {"type": "config", "useAudioWorklet": True, "mode": "full"}
    for frame in frames:
        await ws.send(frame)
    await ws.send(b"")
    last = None
    while True:
        message = json.loads(await ws.recv())
        if message.get("type") == "ready_to_stop":
            return last
        if "error" in message and collect_errors is not None:
            collect_errors.append(message["error"])
        last = message


def snapshot_words(snapshot: dict) -> list[dict]:
    return [w for line in snapshot["lines"] for w in line["words"]]


async def asr_transcribe(host: str, pcm: np.ndarray, chunk: int = 3200, delay_ms: int | None = None) -> dict:
    query = f"?token={KEY}" + (f"&delay_ms={delay_ms}" if delay_ms else "")
    data = pcm16(pcm)
    async with websockets.connect(f"ws://{host}/asr{query}") as ws:
        return await asr_stream(ws, [data[i:i + chunk] for i in range(0, len(data), chunk)])


# -- plain HTTP ----------------------------------------------------------------------------------


def test_health_models_and_api_key(server):
    host, _ = server
    health = httpx.get(f"http://{host}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"  # no key needed
    # the settings a session gets unless it asks otherwise: create_app's defaults here
    assert (health.json()["idle_timeout"], health.json()["send_timeout"]) == (7200.0, 60.0)
    assert health.json()["rut"] == {"after": 200, "speech_after": 50, "slope": 0.5, "cap": 7.0, "speech_threshold": 0.5}
    denied = httpx.get(f"http://{host}/v1/models")
    assert denied.status_code == 401
    assert "API key" in denied.json()["error"]["message"]
    assert httpx.get(f"http://{host}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    models = httpx.get(f"http://{host}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(f"http://{host}/v1/models?token={KEY}").status_code == 200


def test_metrics_are_prometheus_text_of_the_engine_load(server, speech):
    host, engine = server
    asyncio.run(asr_transcribe(host, speech))
    response = httpx.get(f"http://{host}/metrics")  # no key needed, like /health
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in response.text.splitlines():
        if not line.startswith("#"):
            name, value = line.split(" ")
            values[name] = float(value)
    assert values["voxlive_max_sessions"] == 12 and values["voxlive_sessions"] == engine.active
    assert values["voxlive_decode_steps_total"] >= 1 and values["voxlive_step_seconds_total"] > 0
    assert 1 <= values["voxlive_decode_batch_size_max"] <= 12
    assert values["process_resident_memory_bytes"] > 50 * 1024 * 1024  # the model and torch are in it
    assert "# TYPE voxlive_decode_steps_total counter" in response.text
    assert "replica" not in response.text and "replica" not in httpx.get(f"http://{host}/health").json()


# -- vLLM realtime protocol ----------------------------------------------------------------------


def test_realtime_protocol_matches_offline(server, offline, speech):
    host, _ = server
    first, second = speech[: len(speech) // 2], speech[len(speech) // 2:][::-1].copy()
    expected = [offline.transcribe(as_sent(a)) for a in (first, second)]

    async def run():
        async with websockets.connect(f"ws://{host}/v1/realtime", additional_headers=AUTH) as ws:
            created = json.loads(await ws.recv())
            assert created["type"] == "session.created" and created["id"]
            await ws.send(json.dumps({"type": "session.update", "model": "tiny"}))
            # two utterances on one connection, as vLLM allows after transcription.done
            return [await realtime_utterance(ws, a) for a in (first, second)]

    for (text, done, deltas), exp in zip(asyncio.run(run()), expected):
        assert len(exp.words) >= 3
        assert done["text"] == exp.text
        assert text == exp.text  # the deltas add up to exactly the final text
        assert delta_words(deltas) == words_of(exp)  # words arrive as they complete
        assert "words" not in done  # the whole list is opt-in
        assert done["usage"]["completion_tokens"] == len(exp.tokens)
        assert deltas and all(d["lag"] >= 0 for d in deltas)


def test_realtime_bad_events_get_errors_and_the_connection_goes_on(server, offline, speech):
    host, _ = server
    expected = offline.transcribe(as_sent(speech))

    async def run():
        async with websockets.connect(f"ws://{host}/v1/realtime", additional_headers=AUTH) as ws:
            await ws.recv()
            errors = []
            for bad in ("{not json", json.dumps({"type": "no.such.event"}), json.dumps([1, 2]),
                        json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}),
                        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
                        b"\x00\x01 binary"):
                await ws.send(bad)
                errors.append(json.loads(await ws.recv()))
            return errors, await realtime_utterance(ws, speech)

    errors, (text, done, _) = asyncio.run(run())
    assert [e["type"] for e in errors] == ["error"] * 6
    assert [e["code"] for e in errors] == ["invalid_json", "unknown_event", "invalid_event", "invalid_audio",
                                           "invalid_audio", "invalid_event"]
    assert "no.such.event" in errors[1]["error"]
    assert "even number of bytes" in errors[4]["error"]
    assert done["text"] == text == expected.text


def test_message_larger_than_the_limit_is_refused_with_1009(server, offline, speech):
    host, _ = server

    async def run():
        async with websockets.connect(f"ws://{host}/v1/realtime", additional_headers=AUTH) as ws:
            await ws.recv()
            big = base64.b64encode(bytes(MAX_MESSAGE)).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": big}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return closed.value.rcvd.code

    assert asyncio.run(run()) == 1009
    text, done, _ = asyncio.run(realtime_transcribe(host, speech))  # the server goes on
    assert done["text"] == offline.transcribe(as_sent(speech)).text


def test_wrong_api_key_is_told_and_closed(server):
    host, _ = server

    event, code = asyncio.run(refused(f"ws://{host}/v1/realtime", additional_headers={"Authorization": "Bearer nope"}))
    assert event["type"] == "error" and event["code"] == "unauthorized" and code == 1008
    snapshot, code = asyncio.run(refused(f"ws://{host}/asr?token=nope"))
    assert "API key" in snapshot["error"] and code == 1008
    assert httpx.post(f"http://{host}/v1/audio/transcriptions", files={"file": b"x"}).status_code == 401


# -- WhisperLiveKit protocol ---------------------------------------------------------------------


def test_asr_pcm_matches_offline(server, offline, speech):
    host, _ = server
    expected = offline.transcribe(as_sent(speech), delay_ms=240)
    last = asyncio.run(asr_transcribe(host, speech, delay_ms=240))
    assert snapshot_words(last) == words_of(expected)
    assert " ".join(line["text"] for line in last["lines"]) == " ".join(w.text for w in expected.words)
    assert last["buffer_transcription"] == "" and last["remaining_time_transcription"] == 0.0
    assert all(line["start"].count(":") == 2 for line in last["lines"])


def test_asr_diff_mode_applied_by_a_client_gives_the_full_transcript(server, offline, speech):
    from test_wlk_lines import apply

    host, _ = server
    expected = offline.transcribe(as_sent(speech))
    data = pcm16(speech)

    async def run():
        async with websockets.connect(f"ws://{host}/asr?token={KEY}&mode=diff") as ws:
            assert json.loads(await ws.recv()) == {"type": "config", "useAudioWorklet": True, "mode": "diff"}
            for i in range(0, len(data), 3200):
                await ws.send(data[i:i + 3200])
            await ws.send(b"")
            messages = []
            while (message := json.loads(await ws.recv())).get("type") != "ready_to_stop":
                messages.append(message)
            return messages

    messages = asyncio.run(run())
    assert messages[0]["type"] == "snapshot" and {m["type"] for m in messages[1:]} == {"diff"}
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    state = None
    for message in messages:
        state = apply(state, message)
    assert snapshot_words(state) == words_of(expected) and len(expected.words) >= 3
    assert state["buffer_transcription"] == "" and state["remaining_time_transcription"] == 0.0


def test_asr_unknown_mode_is_refused_with_1008(server):
    host, _ = server

    first, code = asyncio.run(refused(f"ws://{host}/asr?token={KEY}&mode=delta"))
    assert "mode must be one of full, diff" in first["error"] and code == 1008


def webm_opus(pcm: np.ndarray) -> bytes:
    """What a browser's MediaRecorder sends: Opus in WebM, 48 kHz."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48000, layout="mono")
        audio = np.repeat(pcm, 3)  # crude 16 -> 48 kHz; any audio will do
        for start in range(0, len(audio), 960):
            frame = av.AudioFrame.from_ndarray(audio[None, start:start + 960].astype(np.float32), format="flt",
                                               layout="mono")
            frame.sample_rate = 48000
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


def test_asr_webm_opus_stream_decodes_like_the_file(server, offline, speech):
    host, _ = server
    data = webm_opus(speech)
    expected = offline.transcribe(load_audio(data))  # the same bytes as a whole file

    async def run():
        async with websockets.connect(f"ws://{host}/asr?token={KEY}") as ws:
            return await asr_stream(ws, [data[i:i + 1000] for i in range(0, len(data), 1000)])

    last = asyncio.run(run())
    assert len(expected.words) >= 3
    assert snapshot_words(last) == words_of(expected)


def test_asr_bad_frames_are_reported_and_accepted_audio_is_kept(server, offline, speech):
    host, _ = server
    good = pcm16(speech)
    half = len(good) // 2
    expected = offline.transcribe(as_sent(speech))
    errors = []

    async def run():
        async with websockets.connect(f"ws://{host}/asr?token={KEY}") as ws:
            return await asr_stream(ws, [good[:half], b"\x01\x02\x03", "a text frame", good[half:]],
                                    collect_errors=errors)

    last = asyncio.run(run())
    assert any("even number of bytes" in e for e in errors)
    assert any("binary frames" in e for e in errors)
    assert snapshot_words(last) == words_of(expected)


def test_asr_undecodable_container_is_reported_and_the_session_ends_cleanly(server, offline, speech):
    host, _ = server
    data = webm_opus(speech)
    garbage = data[:4] + bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8))
    errors = []

    async def run():
        async with websockets.connect(f"ws://{host}/asr?token={KEY}") as ws:
            return await asr_stream(ws, [garbage[i:i + 4000] for i in range(0, len(garbage), 4000)],
                                    collect_errors=errors)

    last = asyncio.run(run())
    assert any("could not decode" in e for e in errors)
    assert last is not None  # the stream still ended with a final snapshot and ready_to_stop
    asyncio.run(asr_transcribe(host, speech))  # and the server goes on


# -- OpenAI-compatible upload --------------------------------------------------------------------


def test_openai_client_every_response_format(server, offline, speech, tmp_path):
    import openai

    host, _ = server
    path = tmp_path / "speech.wav"
    soundfile.write(path, speech, 16000, subtype="FLOAT")
    expected = offline.transcribe(speech)
    client = openai.OpenAI(base_url=f"http://{host}/v1", api_key=KEY)

    def create(fmt):
        with open(path, "rb") as f:
            return client.audio.transcriptions.create(model="tiny", file=f, response_format=fmt, language="en")

    assert create("json").text == expected.text.strip()
    assert create("text").strip() == expected.text.strip()
    assert create("srt") == expected.format("srt")
    assert create("vtt") == expected.format("vtt")
    verbose = create("verbose_json")
    assert [(w.word, w.start, w.end) for w in verbose.words] == [(w.text, w.start, w.end) for w in expected.words]
    assert verbose.duration == pytest.approx(expected.duration, abs=1e-3)
    assert verbose.segments and verbose.segments[0].start == expected.words[0].start


def test_upload_errors(server, tmp_path):
    host, _ = server
    url = f"http://{host}/v1/audio/transcriptions"
    corrupt = httpx.post(url, headers=AUTH, files={"file": ("x.wav", b"RIFF\x00\x00not really a wav" * 10)})
    assert corrupt.status_code == 400 and "x.wav" in corrupt.json()["error"]["message"]
    assert httpx.post(url, headers=AUTH, data={"model": "tiny"}).status_code == 400  # no file
    too_big = httpx.post(url, headers=AUTH, files={"file": ("big.wav", bytes(2 * 1024 * 1024))})
    assert too_big.status_code == 413
    bad_format = httpx.post(url, headers=AUTH, files={"file": ("a.wav", b"x")}, data={"response_format": "xml"})
    assert bad_format.status_code == 400 and bad_format.json()["error"]["param"] == "response_format"
    bad_delay = httpx.post(url, headers=AUTH, files={"file": ("a.wav", b"x")}, data={"delay_ms": "100"})
    assert bad_delay.status_code == 400 and "delay" in bad_delay.json()["error"]["message"]


# -- many sessions -------------------------------------------------------------------------------


def test_concurrent_streams_are_batched_and_each_equals_offline(server, offline, speech):
    host, engine = server
    rng = np.random.default_rng(0)
    cases = []
    for i in range(10):
        start = int(rng.integers(0, len(speech) // 3))
        audio = speech[start:] if i % 3 else speech[::-1][start:].copy()
        audio = (audio * (0.3 + 0.7 * rng.random())).astype(np.float32)
        cases.append((audio, [480, 240, 160][i % 3], int(rng.integers(400, 6000)) * 2))
    expected = [offline.transcribe(as_sent(a), delay_ms=d) for a, d, _ in cases]
    batches_before = engine.max_batch

    async def one(i, audio, delay, chunk):
        if i % 2:
            return (await asr_transcribe(host, audio, chunk, delay_ms=delay))
        return (await realtime_transcribe(host, audio, chunk, delay_ms=delay, done_words=True))[1]

    async def run():
        return await asyncio.gather(*(one(i, *case) for i, case in enumerate(cases)))

    results = asyncio.run(run())
    for i, (result, exp) in enumerate(zip(results, expected)):
        words = snapshot_words(result) if i % 2 else result["words"]
        assert words == words_of(exp), f"stream {i}"
    assert engine.max_batch >= 2 or batches_before >= 2  # several streams shared decode steps


def test_more_sessions_than_the_limit_are_refused_and_the_others_go_on(varied_dir, offline, speech):
    model = voxlive.load(varied_dir, dtype="float32", device="cpu")
    app = create_app(Engine(model, max_sessions=2), model_id="tiny")
    expected = offline.transcribe(as_sent(speech))

    async def run(host):
        first = await websockets.connect(f"ws://{host}/asr")
        second = await websockets.connect(f"ws://{host}/asr")
        for ws in (first, second):
            assert json.loads(await ws.recv())["type"] == "config"
        async with websockets.connect(f"ws://{host}/asr") as third:
            refused = json.loads(await third.recv())
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await third.recv()
        wav = io.BytesIO()
        soundfile.write(wav, speech, 16000, format="WAV")
        async with httpx.AsyncClient() as client:
            busy = await client.post(f"http://{host}/v1/audio/transcriptions", files={"file": ("a.wav", wav.getvalue())})
        data = pcm16(speech)
        last = await asr_stream(first, [data], config_read=True)
        await second.close()
        await asyncio.sleep(0.5)
        again = await asr_transcribe_open(host, speech)
        return refused, closed.value.rcvd.code, busy, last, again

    with running(app) as host:
        refused, code, busy, last, again = asyncio.run(run(host))
    assert "busy" in refused["error"] and code == 1013
    assert busy.status_code == 503 and "busy" in busy.json()["error"]["message"]
    assert snapshot_words(last) == words_of(expected)
    assert snapshot_words(again) == words_of(expected)


async def asr_transcribe_open(host, pcm):
    async with websockets.connect(f"ws://{host}/asr") as ws:
        return await asr_stream(ws, [pcm16(pcm)])


def test_a_client_that_vanishes_frees_its_slot_and_others_are_served(server, offline, speech):
    host, engine = server
    expected = offline.transcribe(as_sent(speech))

    async def vanish():
        ws = await websockets.connect(f"ws://{host}/asr?token={KEY}")
        await ws.recv()
        await ws.send(pcm16(speech)[: len(speech)])  # half of it, then the TCP connection drops
        await asyncio.sleep(0.2)
        ws.transport.abort()

    async def run():
        _, other = await asyncio.gather(vanish(), asr_transcribe(host, speech))
        return other

    other = asyncio.run(run())
    assert snapshot_words(other) == words_of(expected)
    for _ in range(100):
        if httpx.get(f"http://{host}/health").json()["sessions"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert httpx.get(f"http://{host}/health").json()["sessions"] == 0


def test_a_slow_reader_loses_nothing_and_does_not_hold_up_others(server, offline, speech):
    host, _ = server
    expected = offline.transcribe(as_sent(speech))

    async def slow():
        async with websockets.connect(f"ws://{host}/v1/realtime", additional_headers=AUTH) as ws:
            await ws.recv()
            data = pcm16(speech)
            for i in range(0, len(data), 1280):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(data[i:i + 1280]).decode()}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            await asyncio.sleep(3)  # not reading while the other client is served
            text = ""
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "transcription.done":
                    return text, event
                text += event["delta"]

    async def run():
        slow_task = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        t0 = asyncio.get_running_loop().time()
        _, other, _ = await realtime_transcribe(host, speech)
        other_seconds = asyncio.get_running_loop().time() - t0
        return await slow_task, other, other_seconds

    (text, done), other, other_seconds = asyncio.run(run())
    assert other_seconds < 3  # served while the slow client was not reading
    assert other["text"] == expected.text
    assert text == done["text"] == expected.text
