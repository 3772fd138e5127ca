"""Blank ruts through the real server: a forced rut (``voxlive.testing.ForcedPad``) is broken in a
``/asr`` and a ``/v1/realtime`` session exactly as offline, each rut is on the wire and counted in
``/health`` and ``/metrics``, and a connection may choose its own policy or none in its query."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import numpy as np
import pytest
import websockets
from serving import refused, running

import voxlive
from voxlive.rut import RutPolicy
from voxlive.server import Engine, create_app
from voxlive.testing import forced_pad, write_demo_checkpoint

RUT = range(60, 290)
MARGIN = 5.0


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    demo = voxlive.load(write_demo_checkpoint(tmp_path_factory.mktemp("demo")), dtype="float32", device="cpu")
    return forced_pad(demo, RUT, MARGIN)


@pytest.fixture(scope="module")
def server(forced):
    engine = Engine(forced, max_sessions=4)
    with running(create_app(engine, model_id="tiny")) as host:
        yield host, engine


@pytest.fixture(scope="module")
def audio(speech):
    data = (np.clip(np.tile(speech, 6), -1, 1) * 32767).astype("<i2").tobytes()
    return data, np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0  # as sent, as the server sees it


def ruts_of(transcript) -> list[dict]:
    return [r.to_dict() for r in transcript.ruts]


def health(host) -> int:
    return httpx.get(f"http://{host}/health").json()["blank_ruts"]


def metrics(host) -> int:
    """The Prometheus counter of blank ruts (its TYPE line says it is one)."""
    text = httpx.get(f"http://{host}/metrics").text
    assert "# TYPE voxlive_blank_ruts_total counter" in text
    return int(next(line.split(" ")[1] for line in text.splitlines() if line.startswith("voxlive_blank_ruts_total ")))


async def asr(host: str, query: str, data: bytes) -> list[dict]:
    async with websockets.connect(f"ws://{host}/asr{query}", max_size=None) as ws:
        for i in range(0, len(data), 16000):
            await ws.send(data[i:i + 16000])
        await ws.send(b"")
        messages = []
        while (message := json.loads(await ws.recv())).get("type") != "ready_to_stop":
            messages.append(message)
        return messages


def test_asr_reports_each_rut_broken_as_offline_and_health_and_metrics_count_them(server, forced, audio):
    host, _ = server
    data, pcm = audio
    expected = forced.transcribe(pcm)  # the default policy, the VAD's threshold included
    before = health(host), metrics(host)
    messages = asyncio.run(asr(host, "?mode=diff", data))
    got = [r for m in messages for r in m.get("blank_ruts", [])]
    assert got == ruts_of(expected) and len(got) > 1
    assert (health(host), metrics(host)) == (before[0] + len(got), before[1] + len(got))


def test_a_connection_sets_its_policy_or_turns_it_off_in_its_query(server, forced, audio):
    host, _ = server
    data, pcm = audio
    plain = forced.transcribe(pcm, rut=RutPolicy(speech_after=None))
    assert [r["positions"] for r in ruts_of(plain)] == [211]
    messages = asyncio.run(asr(host, "?rut_speech_after=off", data))
    assert [r for m in messages for r in m.get("blank_ruts", [])] == ruts_of(plain)
    before = health(host)
    messages = asyncio.run(asr(host, "?rut=off", data))
    assert not any("blank_ruts" in m for m in messages) and health(host) == before
    words = [w["text"] for line in messages[-1]["lines"] for w in line["words"]]
    assert words == [w.text for w in forced.transcribe(pcm, rut=None).words]  # pure greedy: the hole


def test_a_bad_rut_parameter_closes_with_1008_and_a_clear_error(server):
    host, _ = server

    message, code = asyncio.run(refused(f"ws://{host}/asr?rut_cap=lots"))
    assert "rut_cap must be a number" in message["error"] and code == 1008


def test_vllm_realtime_deltas_carry_the_ruts_and_the_text_is_offline_s(server, forced, audio):
    host, _ = server
    data, pcm = audio
    expected = forced.transcribe(pcm)

    async def go():
        async with websockets.connect(f"ws://{host}/v1/realtime", max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            for i in range(0, len(data), 16000):
                chunk = base64.b64encode(data[i:i + 16000]).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
            deltas = []
            while (event := json.loads(await ws.recv()))["type"] != "transcription.done":
                deltas.append(event)
            return deltas, event

    deltas, done = asyncio.run(go())
    assert [r for d in deltas for r in d.get("blank_ruts", [])] == ruts_of(expected) != []
    assert "".join(d["delta"] for d in deltas) == done["text"] == expected.text
