"""``python -m voxlive_bench.proxy``: what Ray Serve's proxy costs against a plain ``voxlive serve``.

The same model (the tiny random one unless ``--model`` says otherwise) is served twice on this
machine, one after the other, by the real command: ``voxlive serve`` (one process), then
``voxlive serve --ray --replicas 1`` (a local Ray cluster: Ray's HTTP proxy in front of one
replica). Both engines run on one thread (OMP_NUM_THREADS=1; Ray gives a one-CPU replica the
same), so the difference is the path, not the arithmetic. Against each, in turn:

- ``/health`` round trips, one after another: the cost of one request through the path;
- word latency: ``--streams`` vLLM-realtime streams paced at real time, each word's arrival
  minus the moment the audio where it ends was sent (the model's delay and the wait for the next
  word are in both; the difference is the path's);
- throughput: the same streams sent as fast as the server takes them; audio seconds transcribed
  per wall second, over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from .soak import audio_chunks, pcm16, sentences

CHUNK_SECONDS = 0.1  # audio_chunks' piece


def server_command(model_dir: str, port: int, ray: bool) -> list[str]:
    command = [sys.executable, "-m", "voxlive", "serve", "--model", model_dir, "--dtype", "float32", "--device", "cpu",
               "--port", str(port), "--max-sessions", "64"]
    return command + (["--ray", "--replicas", "1"] if ray else [])


class Server:
    """``voxlive serve`` (with ``--ray`` or not) in its own process group, stopped with Ctrl-C."""

    def __init__(self, model_dir: str, port: int, ray: bool):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(server_command(model_dir, port, ray), env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.port = port

    def wait_ready(self, seconds: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def health_round_trips(port: int, n: int) -> list[float]:
    import httpx

    with httpx.Client() as client:
        client.get(f"http://127.0.0.1:{port}/health")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            client.get(f"http://127.0.0.1:{port}/health").raise_for_status()
            times.append(time.perf_counter() - t)
    return times


async def realtime_stream(port: int, chunks: list[np.ndarray], paced: bool) -> tuple[list[float], float]:
    """One vLLM-realtime utterance; each word's latency (paced only) and the stream's wall time."""
    import websockets

    sent_at = []  # when the chunk holding audio [i * CHUNK, (i + 1) * CHUNK) went out
    latencies = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", max_size=None) as ws:
        json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "session.update", "model": "bench"}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        started = time.perf_counter()

        async def send():
            for i, chunk in enumerate(chunks):
                if paced:
                    await asyncio.sleep(max(0.0, started + i * CHUNK_SECONDS - time.perf_counter()))
                audio = base64.b64encode(pcm16(chunk)).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                sent_at.append(time.perf_counter())
            await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))

        sender = asyncio.create_task(send())
        while True:
            event = json.loads(await ws.recv())
            if event["type"] == "transcription.done":
                break
            now = time.perf_counter()
            for word in event.get("words", []):
                piece = min(int(word["end"] / CHUNK_SECONDS), len(chunks) - 1)
                if paced and piece < len(sent_at):
                    latencies.append(now - sent_at[piece])
        await sender
    return latencies, time.perf_counter() - started


async def streams(port: int, audio: list[list[np.ndarray]], paced: bool) -> tuple[list[float], float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(realtime_stream(port, chunks, paced) for chunks in audio))
    return [x for latencies, _ in results for x in latencies], time.perf_counter() - started


def measure(server: Server, audio: list[list[np.ndarray]], health_n: int) -> dict:
    server.wait_ready()
    asyncio.run(streams(server.port, audio[:1], paced=False))  # warm: the first stream's allocations
    health = health_round_trips(server.port, health_n)
    latencies, _ = asyncio.run(streams(server.port, audio, paced=True))
    _, wall = asyncio.run(streams(server.port, audio, paced=False))
    seconds = sum(len(chunks) for chunks in audio) * CHUNK_SECONDS
    return {"health_ms": 1000 * float(np.median(health)),
            "word_ms_median": 1000 * float(np.median(latencies)),
            "word_ms_p90": 1000 * float(np.percentile(latencies, 90)), "words": len(latencies),
            "audio_s_per_s": seconds / wall}


def report(rows: dict[str, dict], n_streams: int, seconds: float) -> str:
    plain, ray = rows["plain"], rows["ray"]
    lines = [f"{n_streams} streams of {seconds:g} s, vLLM realtime; /health median of one-by-one round trips",
             f"{'':10} {'/health ms':>11} {'word ms p50':>12} {'word ms p90':>12} {'words':>6} {'audio s/s':>10}"]
    for name, r in rows.items():
        lines.append(f"{name:10} {r['health_ms']:11.1f} {r['word_ms_median']:12.0f} {r['word_ms_p90']:12.0f} "
                     f"{r['words']:6d} {r['audio_s_per_s']:10.1f}")
    lines.append(f"{'ray-plain':10} {ray['health_ms'] - plain['health_ms']:+11.1f} "
                 f"{ray['word_ms_median'] - plain['word_ms_median']:+12.0f} "
                 f"{ray['word_ms_p90'] - plain['word_ms_p90']:+12.0f} {'':6} "
                 f"{ray['audio_s_per_s'] / plain['audio_s_per_s']:9.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one, written here)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0, help="audio per stream")
    p.add_argument("--health", type=int, default=200, help="/health round trips")
    p.add_argument("--port", type=int, default=8123)
    a = p.parse_args(argv)
    from voxlive.testing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or str(write_random_checkpoint(os.path.join(tmp, "tiny"), "tiny", seed=1, dtype="float32",
                                                       adapter_scale=100.0))
        speech = sentences(tmp)
        audio = [list(audio_chunks(speech, a.seconds, seed=i)) for i in range(a.streams)]
        rows = {}
        for name, ray in (("plain", False), ("ray", True)):
            server = Server(model, a.port, ray)
            try:
                rows[name] = measure(server, audio, a.health)
            finally:
                server.stop()
    print(report(rows, a.streams, a.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
