"""``python -m voxlive_bench.soak --hours H``: a long session through the real server, sampled.

A ``voxlive`` server runs in its own process (the tiny random model unless ``--model`` says
otherwise); one client per protocol (``/asr?mode=diff``, ``/v1/realtime``), one after the other,
streams H hours of audio to it in one session: espeak-ng sentences with pauses of varied length,
looped with variations of order, gain and pause, sent as fast as the server takes it (or at real
time with ``--pace realtime``). Every audio minute the bench samples the server process's RSS and
CPU time, and the size and spacing of the updates the client received in that minute. The report
gives each minute and compares the first and last tenth of the session (the first and last hour
once a run is long enough): a session that gets slower or bigger with age shows there.

``--check`` also transcribes the same audio offline in this process (as long again) and says
whether the server's final words, or text, equal it. SIGINT or SIGTERM ends the audio early and
the session as it would have ended (its final transcript, the check and the report then cover the
audio sent); ``--log`` keeps each minute's row as it is sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .bench import rss_mb

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Streaming speech to text for hours without a hole.",
    "Please call me back before the meeting starts tomorrow.",
    "Seven hundred and forty two people attended the talk.",
    "Is the weather going to change this afternoon?",
    "We measured the memory of the server every minute.",
    "Nothing that was said should ever be lost.",
    "A long pause follows this sentence.",
]
PAUSES = (0.2, 0.5, 1.0, 2.0, 4.0)  # seconds of silence after a sentence
CHUNK_SECONDS = 0.1
RATE = 16000


def sentences(tmp: str) -> list[np.ndarray]:
    from voxlive.audio import load_audio

    if shutil.which("espeak-ng") is None:
        raise SystemExit("the soak needs espeak-ng (apt-get install espeak-ng)")
    out = []
    for i, text in enumerate(SENTENCES):
        path = os.path.join(tmp, f"s{i}.wav")
        subprocess.run(["espeak-ng", "-w", path, text], check=True, capture_output=True)
        out.append(load_audio(path))
    return out


def audio_chunks(speech: list[np.ndarray], seconds: float, seed: int = 0):
    """``seconds`` of looped speech with varied order, gain and pauses, in CHUNK_SECONDS pieces."""
    rng = np.random.default_rng(seed)
    step, total, buf = int(CHUNK_SECONDS * RATE), round(seconds * RATE), np.zeros(0, np.float32)
    sent = 0
    while sent < total:
        while len(buf) < step:
            s = speech[int(rng.integers(len(speech)))] * float(rng.uniform(0.3, 1.0))
            pause = np.zeros(int(float(rng.choice(PAUSES)) * RATE), np.float32)
            buf = np.concatenate([buf, s.astype(np.float32), pause])
        n = min(step, total - sent)
        yield buf[:n]
        buf, sent = buf[n:], sent + n


def pcm16(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()


# -- the server process ---------------------------------------------------------------------------


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads in this process (None: torch's default, one per core)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def serve_main(model_dir: str, port: int, threads: int | None = None) -> None:
    import voxlive
    from voxlive.server import serve

    use_threads(threads)
    serve(voxlive.load(model_dir, dtype="float32", device="cpu"), model_id="soak", port=port, log_level="warning")


def wait_healthy(proc: subprocess.Popen, port: int, seconds: float) -> None:
    """Until the server on ``port`` answers ``/health`` (its engine has started), or fail."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("the server did not start")


class ServerProcess:
    def __init__(self, model_dir: str, port: int, threads: int | None = None):
        code = f"from voxlive_bench.soak import serve_main; serve_main({model_dir!r}, {port}, {threads!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
        self.port = port
        self.ticks = os.sysconf("SC_CLK_TCK")

    def wait_ready(self) -> None:
        wait_healthy(self.proc, self.port, seconds=60)

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.ticks

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# -- sampling -------------------------------------------------------------------------------------


@dataclass
class Minute:
    minute: int
    rss_mb: float
    cpu_s: float  # server CPU seconds spent on this audio minute
    sizes: list[int] = field(default_factory=list)  # bytes of each update received in it
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive updates


class Sampler:
    """Samples once per minute of audio the server has transcribed (the end of the last word it
    sent), so a minute is the server's minute, not how far ahead of it the client is: audio waits
    in socket buffers that no lag figure counts."""

    def __init__(self, server: ServerProcess, log=None):
        self.server = server
        self.log = log  # a text file: each minute's row as soon as it is sampled (and the wall time, load)
        self._t0 = time.monotonic()
        self.minutes: list[Minute] = []
        self._cpu = server.cpu_seconds()
        self._sizes, self._gaps, self._last = [], [], None

    def message(self, size: int, words: list[dict]) -> None:
        now = time.monotonic()
        if self._last is not None:
            self._gaps.append(now - self._last)
        self._last = now
        self._sizes.append(size)
        if words:
            while words[-1]["end"] >= 60 * (len(self.minutes) + 1):
                self.minute()

    def minute(self) -> None:
        cpu = self.server.cpu_seconds()
        self.minutes.append(Minute(len(self.minutes) + 1, self.server.rss_mb(), cpu - self._cpu, self._sizes, self._gaps))
        if self.log is not None:
            load = os.getloadavg()[0]
            print(f"{row(self.minutes[-1])} wall {time.monotonic() - self._t0:.0f} s, load {load:.1f}", file=self.log,
                  flush=True)
        self._cpu, self._sizes, self._gaps = cpu, [], []


# -- the clients ----------------------------------------------------------------------------------


STOP = threading.Event()  # set by the first SIGINT or SIGTERM: no more audio (see stop_on_signals)


def stop_on_signals() -> None:
    """The first SIGINT or SIGTERM ends the audio early: each session then ends as it would at the
    end of its audio (final transcript, check, report). A second one stops the bench at once."""
    def handler(sig, frame):
        STOP.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


async def feed(chunks, send, sampler: Sampler, pace: str) -> int:
    """Send the chunks until they run out or STOP is set; returns the samples sent."""
    t0, sent = time.monotonic(), 0
    for i, chunk in enumerate(chunks, 1):
        if STOP.is_set():
            break
        await send(chunk)
        sent += len(chunk)
        if pace == "realtime":
            await asyncio.sleep(max(0.0, t0 + i * CHUNK_SECONDS - time.monotonic()))
    return sent


async def soak_asr(port: int, chunks, sampler: Sampler, pace: str) -> dict:
    import websockets

    lines: list[dict] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/asr?mode=diff", ping_interval=None, max_size=None) as ws:
        await ws.recv()

        async def receive():
            nonlocal lines
            while True:
                raw = await ws.recv()
                m = json.loads(raw)
                new_lines = m.get("lines") or m.get("new_lines") or [{}]
                sampler.message(len(raw), new_lines[-1].get("words"))
                if m.get("type") == "ready_to_stop":
                    return
                if m["type"] == "snapshot":
                    lines = m["lines"]
                else:
                    new = m.get("new_lines", [])
                    lines = lines[:m["n_lines"] - len(new)] + new

        receiving = asyncio.create_task(receive())
        sent = await feed(chunks, lambda c: ws.send(pcm16(c)), sampler, pace)
        await ws.send(b"")
        await receiving
    return {"words": [w for line in lines for w in line["words"]], "samples": sent}


async def soak_realtime(port: int, chunks, sampler: Sampler, pace: str) -> dict:
    import websockets

    async with websockets.connect(f"ws://127.0.0.1:{port}/v1/realtime", ping_interval=None, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        text, words, done = [], [], None

        async def receive():
            nonlocal done
            while True:
                raw = await ws.recv()
                event = json.loads(raw)
                sampler.message(len(raw), event.get("words"))
                if event["type"] == "transcription.delta":
                    text.append(event["delta"])
                    words.extend(event.get("words", []))
                elif event["type"] == "transcription.done":
                    done = event
                    return

        async def send(chunk):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm16(chunk)).decode()}))

        receiving = asyncio.create_task(receive())
        sent = await feed(chunks, send, sampler, pace)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
        await receiving
    return {"text": done["text"], "delta_text": "".join(text), "words": words, "samples": sent}


# -- the report -----------------------------------------------------------------------------------


def summary(minutes: list[Minute]) -> dict:
    sizes = [s for m in minutes for s in m.sizes]
    gaps = [g for m in minutes for g in m.gaps]
    return {"rss_mb": minutes[-1].rss_mb, "cpu_s_per_audio_min": float(np.mean([m.cpu_s for m in minutes])),
            "updates_per_audio_min": len(sizes) / len(minutes), "mean_update_bytes": float(np.mean(sizes or [0])),
            "max_update_bytes": max(sizes or [0]), "mean_interval_ms": 1000 * float(np.mean(gaps or [0])),
            "max_interval_ms": 1000 * max(gaps or [0])}


def row(m: Minute) -> str:
    s = summary([m])
    return (f"| {m.minute} | {m.rss_mb:.0f} | {m.cpu_s:.1f} | {len(m.sizes)} | {s['mean_update_bytes']:.0f} | "
            f"{s['max_update_bytes']} | {s['mean_interval_ms']:.0f} | {s['max_interval_ms']:.0f} |")


def report(protocol: str, minutes: list[Minute], wall: float) -> str:
    out = [f"## {protocol}: {len(minutes)} audio minutes in {wall / 60:.1f} wall minutes",
           "| audio min | RSS MB | server CPU s | updates | mean bytes | max bytes | mean interval ms | max interval ms |",
           "|---|---|---|---|---|---|---|---|"]
    out += [row(m) for m in minutes]
    span = 60 if len(minutes) >= 120 else max(1, len(minutes) // 10)
    first, last = summary(minutes[:span]), summary(minutes[-span:])
    out.append(f"\nfirst {span} vs last {span} audio minutes:")
    for key in first:
        out.append(f"- {key}: {first[key]:.1f} -> {last[key]:.1f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m voxlive_bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--hours", type=float, required=True, help="hours of audio per protocol (samples: one per minute)")
    p.add_argument("--protocols", nargs="+", default=["asr", "realtime"], choices=["asr", "realtime"])
    p.add_argument("--pace", choices=["fast", "realtime"], default="fast")
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--check", action="store_true", help="compare with offline transcription of the same audio")
    p.add_argument("--threads", type=int,
                   help="torch threads of the server and of the check (default: 1 on the tiny model, whose tensors "
                        "are too small to split across threads, torch's default with --model)")
    p.add_argument("--log", help="append each minute's row to this file as it is sampled (a run cut short keeps them)")
    a = p.parse_args(argv)
    threads = a.threads if a.threads is not None or a.model else 1
    if a.hours * 60 < 1:
        p.error(f"--hours {a.hours} is under one audio minute, the sampling period")
    tmp = tempfile.mkdtemp(prefix="voxlive-soak-")
    model_dir = a.model
    if model_dir is None:
        from voxlive.testing import write_random_checkpoint

        model_dir = str(write_random_checkpoint(os.path.join(tmp, "tiny"), "tiny", seed=1, dtype="float32",
                                                adapter_scale=100.0))
    speech = sentences(tmp)
    seconds = a.hours * 3600
    clients = {"asr": soak_asr, "realtime": soak_realtime}
    log = open(a.log, "a") if a.log else None
    stop_on_signals()
    for protocol in a.protocols:
        server = ServerProcess(model_dir, a.port, threads)
        try:
            server.wait_ready()
            if log is not None:
                print(f"## {protocol}, {a.hours} h, pace {a.pace}, torch threads {threads or 'default'}", file=log,
                      flush=True)
            sampler = Sampler(server, log)
            t = time.monotonic()
            result = asyncio.run(clients[protocol](a.port, audio_chunks(speech, seconds), sampler, a.pace))
            wall = time.monotonic() - t
            print(report(protocol, sampler.minutes, wall), flush=True)
            print(f"- audio sent: {result['samples'] / RATE / 60:.1f} minutes; words received: {len(result['words'])}",
                  flush=True)
            if a.check:
                equal = check(model_dir, speech, result["samples"] / RATE, result, threads)
                print(f"- equal to offline: {equal}", flush=True)
        finally:
            server.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def check(model_dir: str, speech, seconds: float, result: dict, threads: int | None = None) -> bool:
    import voxlive

    use_threads(threads)
    model = voxlive.load(model_dir, dtype="float32", device="cpu")
    stream = model.stream()
    for chunk in audio_chunks(speech, seconds):
        stream.feed(np.frombuffer(pcm16(chunk), dtype="<i2").astype(np.float32) / 32768.0)
    expected = stream.finish()
    if "text" in result:
        return (result["text"] == result["delta_text"] == expected.text
                and result["words"] == [w.to_dict() for w in expected.words])
    return result["words"] == [w.to_dict() for w in expected.words]


if __name__ == "__main__":
    sys.exit(main())
