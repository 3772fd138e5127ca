"""voxlive on Ray Serve: a local Ray cluster started here, two CPU replicas of the tiny model behind
Ray's HTTP proxy, driven by the same real clients as the plain server's tests.

Every transcript is compared with offline ``transcribe`` on the same weights; which replica serves
a WebSocket is read from its handshake (``x-voxlive-replica``). One cluster serves the whole
module (Ray's start is the slow part); the replica-killing test runs last.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
import soundfile
import websockets

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from serving import free_port, refused, running  # noqa: E402
from test_agents_mistral import chunks, mistral_session  # noqa: E402
from test_server import as_sent, asr_stream, pcm16, realtime_utterance, snapshot_words, words_of  # noqa: E402

from voxlive import cli  # noqa: E402
from voxlive.rut import RutPolicy  # noqa: E402
from voxlive.server import replicas, routing  # noqa: E402
from voxlive.server.routing import (  # noqa: E402
    CLOSE_INTERNAL, LOST_REASON, LeastLoadedRouter, ReplicaLostMiddleware, desired_replicas, routing_key)

MAX_SESSIONS = 3
PUSH_INTERVAL = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"
READY_SECONDS = 300  # generous: Ray on two shared cores is slow to start and restart


# Every replica's server options, none of them the default: the cluster is deployed through the
# Serve config's builder (``build``), and /health shows what each replica got.
SERVER_OPTIONS = {"idle_timeout": 900.0, "send_timeout": 30.0,
                  "rut": {"after": 120, "speech_after": None, "slope": 0.75, "cap": 6.0}}
RUT = RutPolicy(**SERVER_OPTIONS["rut"])


def deploy(model_dir, **scaling) -> None:
    # half a CPU each: a third replica fits in the two CPUs when the autoscaler asks for one
    serve.run(replicas.build({"model": str(model_dir), "model_id": "tiny", "max_sessions": MAX_SESSIONS,
                              "cpus_per_replica": 0.5, "dtype": "float32", "device": "cpu", **SERVER_OPTIONS,
                              **scaling}),
              name=replicas.APP_NAME, route_prefix="/", blocking=False)


@pytest.fixture(scope="module")
def cluster(varied_dir):
    port = free_port()
    # replicas push their autoscaling metrics every second instead of every 10 (the cluster's
    # processes inherit this process's environment)
    os.environ[PUSH_INTERVAL] = "1"
    try:
        replicas.connect(num_cpus=2, port=port, dashboard=False)
        deploy(varied_dir, replicas=2)
        yield f"127.0.0.1:{port}"
    finally:
        os.environ.pop(PUSH_INTERVAL, None)
        serve.shutdown()
        ray.shutdown()


async def open_asr(host: str):
    """A WLK connection (its engine session opens with it), its config read; and its replica."""
    ws = await websockets.connect(f"ws://{host}/asr")
    first = json.loads(await ws.recv())
    assert first.get("type") == "config", first
    return ws, ws.response.headers["x-voxlive-replica"]


async def open_realtime(host: str):
    ws = await websockets.connect(f"ws://{host}/v1/realtime")
    assert json.loads(await ws.recv())["type"] == "session.created"
    await ws.send(json.dumps({"type": "session.update", "model": "tiny"}))
    return ws, ws.response.headers["x-voxlive-replica"]


async def finish(ws, data: bytes) -> dict:
    """The rest of a WLK stream; its last snapshot. The connection is closed."""
    last = await asr_stream(ws, [data], config_read=True)
    await ws.close()
    return last


def replica_pid(name: str) -> int:
    from ray.serve._private.common import DeploymentID, ReplicaID

    actor_name = ReplicaID(name, DeploymentID("VoxliveReplica", replicas.APP_NAME)).to_full_id_str()
    actor = ray.get_actor(actor_name, namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=60)


def test_replicas_are_tried_keeping_up_first_then_behind_then_full_fewest_sessions_first():
    stats = {"a": {"sessions": 1, "max_sessions": 4, "lag": 0.2}, "b": {"sessions": 0, "max_sessions": 4, "lag": 3.0},
             "c": {"sessions": 4, "max_sessions": 4, "lag": 0.0}, "d": {"sessions": 2, "max_sessions": 4, "lag": 0.5},
             "e": {}}  # not reported yet
    order = sorted(stats, key=lambda r: routing_key(stats[r], None))
    assert order == ["e", "a", "d", "b", "c"]
    # the router's own count of requests in flight wins over a report a second old, both ways
    assert routing_key(stats["c"], 1) < routing_key(stats["a"], None)
    assert routing_key(stats["a"], 4) > routing_key(stats["b"], None)
    # ... and so does its own count of the sessions it placed, Ray's not having them yet; never added
    assert routing_key(stats["a"], 1, placed=3) == routing_key(stats["a"], 3) > routing_key(stats["d"], None)
    assert routing_key(stats["a"], 2, placed=1) == routing_key(stats["a"], 2)
    assert routing_key(stats["b"], None, placed=4)[0]  # full, though its report says nothing of them


def test_sessions_ranked_before_any_is_sent_take_every_free_slot_first(monkeypatch):
    """Ray sends a request only after the router ranked it, and ranks the next ones meanwhile:
    twelve sessions ranked at once on four replicas of three slots put three first on each, and the
    next goes first to a full one (to be refused there). A session Ray sent and the replica
    accepted is counted once, and its slot is free when it ends; a slot held for one Ray never
    sends is given back after a while."""
    from types import SimpleNamespace

    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    clock = [1000.0]
    monkeypatch.setattr(routing, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    deployment = DeploymentID("VoxliveReplica", replicas.APP_NAME)
    requests = {}

    async def run():
        router = LeastLoadedRouter(deployment_id=deployment, handle_source=DeploymentHandleSource.PROXY,
                                   use_replica_queue_len_cache=True)
        router.initialize_state()
        candidates = [SimpleNamespace(replica_id=ReplicaID(name, deployment),
                                      routing_stats={"sessions": 0, "max_sessions": MAX_SESSIONS, "lag": 0.0})
                      for name in "abcd"]

        async def first_choice(i: int) -> str:
            requests[i] = PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(str(i), str(i)))
            return (await router.choose_replicas(candidates, requests[i]))[0][0].replica_id.unique_id

        firsts = [await first_choice(i) for i in range(4 * MAX_SESSIONS)]
        over = await first_choice(99)  # every replica full: one is tried, to refuse it
        name = next(n for n in "abcd" if n != over)
        replica = ReplicaID(name, deployment)
        mine = [i for i, n in enumerate(firsts) if n == name]
        for i in mine:  # Ray sends that replica's three, which accepts them and says so
            router.on_request_routed(requests[i], replica, None)
        router.on_new_queue_len_info(replica, MAX_SESSIONS)
        router.on_request_completed(replica, str(mine[0]))  # one of them ends
        router.on_new_queue_len_info(replica, MAX_SESSIONS - 1)
        freed = await first_choice(100)  # the others still hold their reservations
        clock[0] += routing.PLACING_SECONDS + 1  # ... which Ray never sends
        afterwards = [await first_choice(200 + i) for i in range(3)]
        return firsts, over, name, freed, afterwards

    firsts, over, name, freed, afterwards = asyncio.run(run())
    assert sorted(firsts.count(n) for n in "abcd") == [MAX_SESSIONS] * 4, firsts
    assert over in "abcd" and freed == name
    assert sorted(afterwards) == sorted(set("abcd") - {name})


def test_serve_ray_passes_the_plain_servers_session_options_to_every_replica(monkeypatch, varied_dir):
    got = []
    monkeypatch.setattr(replicas, "serve_on_ray", lambda source, **options: got.append(options))
    common = ["serve", "--ray", "--model", str(varied_dir), "--port", str(free_port())]
    assert cli.main([*common, "--rut-after", "120", "--rut-speech-after", "off", "--rut-slope", "0.75",
                     "--rut-cap", "6", "--idle-timeout", "900", "--send-timeout", "0"]) == 0
    assert cli.main([*common, "--no-rut-penalty"]) == 0
    assert got[0]["rut"] == RUT and got[0]["idle_timeout"] == 900 and got[0]["send_timeout"] is None
    assert got[1]["rut"] is None and got[1]["idle_timeout"] == 7200 and got[1]["send_timeout"] == 60


def test_autoscaling_wants_replicas_for_the_sessions_and_one_more_while_behind():
    assert desired_replicas([3.0, 3.0], [0.1, 0.1], 2, target_sessions=2) == 3
    assert desired_replicas([0.5, 0.0], [0.0, 0.0], 2, target_sessions=2) == 0.25  # Ray rounds up, keeps the minimum
    assert desired_replicas([1.0, 1.0], [4.0, 3.0], 2, target_sessions=2) == 3  # few sessions, but falling behind


def test_a_request_ray_ends_without_an_answer_gets_a_503_or_a_1011():
    """What Ray's proxy does when a replica dies: the request ends with nothing sent (an upload) or
    nothing more after the handshake (a WebSocket). The middleware answers for it; a request that
    was answered, or whose client left, is passed through untouched."""

    async def ray_like(scope, receive, send):
        if scope["path"] == "/answered":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await receive()  # the client's first message, then the replica is gone

    async def websocket(host):
        async with websockets.connect(f"ws://{host}/asr") as ws:
            await ws.send("hello")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
        return closed.value.rcvd

    with running(ReplicaLostMiddleware(ray_like)) as host:
        lost = httpx.post(f"http://{host}/v1/audio/transcriptions", content=b"x")
        answered = httpx.get(f"http://{host}/answered")
        close = asyncio.run(websocket(host))
    assert lost.status_code == 503 and lost.headers["retry-after"] == "1"
    assert lost.json()["error"]["code"] == "replica_lost" and "retry" in lost.json()["error"]["message"]
    assert answered.status_code == 200 and answered.text == "ok"
    assert close is not None and close.code == CLOSE_INTERNAL and close.reason == LOST_REASON


def test_health_and_metrics_through_the_proxy_name_their_replica_and_its_options(cluster):
    """/health from both replicas (the router sends an idle cluster's requests to either) shows the
    deployment's session options on each; /metrics carries the replica's label."""
    seen = {}
    for _ in range(40):
        health = httpx.get(f"http://{cluster}/health", timeout=60).json()
        seen[health["replica"]] = health
        if len(seen) == 2:
            break
    assert len(seen) == 2, list(seen)
    for health in seen.values():
        assert health["status"] == "ok" and health["max_sessions"] == MAX_SESSIONS
        assert health["idle_timeout"] == 900 and health["send_timeout"] == 30
        assert health["rut"] == {**SERVER_OPTIONS["rut"], "speech_threshold": RUT.speech_threshold}
    metrics = httpx.get(f"http://{cluster}/metrics", timeout=60)
    assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = metrics.text.splitlines()
    for name in ("voxlive_sessions", "voxlive_lag_seconds", "voxlive_step_seconds_total", "voxlive_decode_batch_size",
                 "voxlive_blank_ruts_total", "process_resident_memory_bytes"):
        assert any(line.startswith(f'{name}{{replica="') for line in lines), name


def test_sessions_spread_over_both_replicas_and_every_protocol_equals_offline(cluster, varied_model, speech,
                                                                             tmp_path):
    """Four live sessions opened one after the other land two on each replica (the least loaded
    takes the next); vLLM realtime and WLK streams, a Mistral SDK session and an OpenAI SDK upload,
    all at once (every slot of both replicas), each give offline ``transcribe``'s transcript under
    the deployment's blank-rut policy."""
    import openai

    expected = varied_model.transcribe(as_sent(speech), rut=RUT)
    path = tmp_path / "speech.wav"
    soundfile.write(path, speech, 16000, subtype="PCM_16")
    upload = openai.OpenAI(base_url=f"http://{cluster}/v1", api_key="none", timeout=300)

    def uploaded():
        with open(path, "rb") as f:
            return upload.audio.transcriptions.create(model="tiny", file=f)

    async def run():
        opened = [await opener(cluster) for opener in (open_realtime, open_asr, open_realtime, open_asr)]
        data = pcm16(speech)
        streams = [realtime_utterance(ws, speech) if i % 2 == 0 else
                   asr_stream(ws, [data[j:j + 3200] for j in range(0, len(data), 3200)], config_read=True)
                   for i, (ws, _) in enumerate(opened)]
        results = await asyncio.gather(*streams, mistral_session(cluster, chunks(data)), asyncio.to_thread(uploaded))
        for ws, _ in opened:
            await ws.close()
        return [name for _, name in opened], results

    names, (rt1, asr1, rt2, asr2, events, uploaded) = asyncio.run(run())
    assert len(set(names)) == 2 and all(names.count(n) == 2 for n in names), names
    for text, done, _ in (rt1, rt2):
        assert text == done["text"] == expected.text
    for last in (asr1, asr2):
        assert snapshot_words(last) == words_of(expected)
    done = [e for e in events if e.type == "transcription.done"]
    # the last events say why, should a session end without its done
    assert done and done[0].text == varied_model.tokenizer.decode(expected.tokens), [str(e)[:200] for e in events[-4:]]
    assert uploaded.text == expected.text.strip()


def test_sessions_opened_all_at_once_fill_every_slot_then_the_next_gets_1013(cluster):
    """As many sessions as both replicas hold, opened at the same instant, are all admitted (none
    is placed on a replica another one filled meanwhile); the next one is refused with the usual
    1013, and so is an upload with the usual 503."""

    async def run():
        held = await asyncio.gather(*(open_asr(cluster) for _ in range(2 * MAX_SESSIONS)), return_exceptions=True)
        admitted = [h for h in held if not isinstance(h, BaseException)]
        if len(admitted) < len(held):  # close what was admitted, then say what was not
            for ws, _ in admitted:
                await ws.close()
            return held, None, None, None
        busy, code = await refused(f"ws://{cluster}/asr")
        wav = io.BytesIO()
        soundfile.write(wav, np.zeros(16000, np.float32), 16000, format="WAV")
        async with httpx.AsyncClient(timeout=120) as client:
            upload = await client.post(f"http://{cluster}/v1/audio/transcriptions",
                                       files={"file": ("a.wav", wav.getvalue())})
        for ws, _ in held:
            await ws.close()
        return held, busy, code, upload

    held, busy, code, upload = asyncio.run(run())
    assert all(not isinstance(h, BaseException) for h in held), [repr(h)[:160] for h in held]
    names = [name for _, name in held]
    assert sorted(names.count(n) for n in set(names)) == [MAX_SESSIONS, MAX_SESSIONS]
    assert "busy" in busy["error"] and code == 1013
    assert upload.status_code == 503 and "busy" in upload.json()["error"]["message"]


def test_a_killed_replica_fails_only_its_own_sessions_and_comes_back(cluster, varied_model, speech):
    """Four streams over the two replicas (at least one on each: one replica takes at most three);
    one replica's process is killed mid-stream: its clients get a 1011 close with the reason (not a
    hang), the other replica's streams finish exactly as offline,
    a new session right after the kill is served by the live replica, and Ray starts a new replica
    that takes sessions again."""
    expected = varied_model.transcribe(as_sent(speech))
    data = pcm16(speech)
    half = len(data) // 2 // 2 * 2

    async def run():
        opened = [await open_asr(cluster) for _ in range(4)]
        victim = opened[0][1]
        for ws, _ in opened:  # half the audio each, and a snapshot back: every stream is under way
            await ws.send(data[:half])
            json.loads(await ws.recv())
        os.kill(replica_pid(victim), signal.SIGKILL)
        lost, survivors = [], []
        for ws, name in opened:
            if name == victim:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    while True:  # snapshots already under way may come before the close
                        await asyncio.wait_for(ws.recv(), READY_SECONDS)
                lost.append(closed.value.rcvd)
            else:
                survivors.append(finish(ws, data[half:]))
        finished = await asyncio.gather(*survivors)
        ws, after = await open_asr(cluster)
        fresh = await finish(ws, data)
        return victim, lost, finished, after, fresh

    victim, lost, finished, after, fresh = asyncio.run(run())
    assert lost and all(c is not None and c.code == CLOSE_INTERNAL and c.reason == LOST_REASON for c in lost)
    assert finished and all(snapshot_words(last) == words_of(expected) for last in finished)
    assert len(lost) + len(finished) == 4
    assert after != victim and snapshot_words(fresh) == words_of(expected)

    async def served_by() -> str:
        ws, name = await open_asr(cluster)
        await ws.close()
        return name

    deadline = time.monotonic() + READY_SECONDS
    while asyncio.run(served_by()) in (after, victim):  # until the new replica takes sessions
        assert time.monotonic() < deadline, "no new replica took the killed one's place"
        time.sleep(1)


def test_the_autoscaler_adds_a_replica_for_live_sessions(cluster, varied_dir):
    """Autoscaled between 2 and 3 replicas at one session each: four live sessions (four
    connections, which Ray's default policy at two requests per replica would serve with two
    replicas) make Ray's autoscaler start a third replica, through voxlive's policy."""
    deploy(varied_dir, min_replicas=2, max_replicas=3, target_sessions=1,
           autoscaling={"upscale_delay_s": 0, "look_back_period_s": 2})

    def running() -> int:
        status = serve.status().applications[replicas.APP_NAME].deployments["VoxliveReplica"]
        return status.replica_states.get("RUNNING", 0)

    async def hold_sessions():
        opened = [await open_asr(cluster) for _ in range(4)]
        deadline = time.monotonic() + READY_SECONDS
        while running() < 3:
            assert time.monotonic() < deadline, "no replica was added"
            await asyncio.sleep(1)
        for ws, _ in opened:
            await ws.close()

    assert running() == 2
    asyncio.run(hold_sessions())
