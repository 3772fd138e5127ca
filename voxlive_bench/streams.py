"""``voxlive bench --streams 1,2,4,8,16``: what batching buys the server.

For each count N, N sessions go through the server's own engine (the scheduler thread, batched
encoder passes and decode steps), each fed the same-length synthetic audio in 80 ms chunks as
fast as the engine takes it. Reported per N: decode ms per batched step, the positions a step
runs (all streams: with drafts a stream verifies several positions in one pass, so a step of 16
streams can be a pass of 144 rows, compute-bound, not 16), decode ms per position, encoder ms per
audio second (all streams), wall time, aggregate real-time factor (wall / audio seconds of all streams:
below 1 means N live streams keep up), and the gain over serving the N streams one after another
(N x the wall time of one stream / the wall time of N).

``--by-minute`` instead runs the N streams once, for sessions of hours, and reports a row per audio
minute: decode ms per step and per position, encoder ms per audio second and the process's RSS,
against the streams' age (the decoder's window fills after about 11 minutes; after that a step
should cost what it costs at the window's end, and memory should stay flat).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from voxlive.audio import SAMPLE_RATE
from voxlive.config import MS_PER_TOKEN

from .bench import bench_audio, rss_mb

CHUNK_SECONDS = 0.08
CHUNK = int(CHUNK_SECONDS * SAMPLE_RATE)
TOKENS_PER_MINUTE = 60_000 // MS_PER_TOKEN


class _StepTimer:
    """Times the runtime's batched calls from inside the engine thread."""

    def __init__(self, runtime):
        self.seconds = {"decode": 0.0, "encode": 0.0}
        self.steps = 0
        self.positions = 0  # decoder positions the decode steps ran, all streams
        for name, key in (("decode", "decode"), ("encode_batch", "encode")):
            real = getattr(runtime, name)
            setattr(runtime, name, self._timed(real, key))

    def _timed(self, real, key):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = real(*args, **kwargs)
            # decode calls with output counts run prompt positions, not decode steps
            step = key if key == "encode" or "outputs" not in kwargs else "prefill"
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t
            if step == "decode":
                self.steps += 1
                self.positions += sum(len(feed) for feed in args[1])
            return out

        return timed

    def totals(self) -> dict:
        return {"decode": self.seconds["decode"], "encode": self.seconds["encode"], "steps": self.steps,
                "positions": self.positions}

    def figures(self, since: dict, audio_seconds: float) -> dict:
        """What the calls since ``since`` (a ``totals()``) cost, per step, position and audio second."""
        now = self.totals()
        decode, steps = now["decode"] - since["decode"], now["steps"] - since["steps"]
        positions = now["positions"] - since["positions"]
        return {"decode_ms_per_step": 1000 * decode / max(1, steps), "positions_per_step": positions / max(1, steps),
                "decode_ms_per_position": 1000 * decode / max(1, positions),
                "encoder_ms_per_audio_s": 1000 * (now["encode"] - since["encode"]) / audio_seconds, "steps": steps}


async def _send(session, pcm: np.ndarray) -> None:
    for start in range(0, len(pcm), CHUNK):
        await session.append(pcm[start:start + CHUNK])


async def _serve(engine, pcm, n: int, delay_ms) -> float:
    async def one():
        session = engine.open(delay_ms=delay_ms)
        await _send(session, pcm)
        session.end()
        while (await session.next_update()).transcript is None:
            pass

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t


def _aged_streams(model, tokens: int) -> None:
    """Every new stream starts ``tokens`` decoder positions old (its cache filled with zeros)."""
    fresh = model.stream

    def stream(**options):
        s = fresh(**options)
        model.runtime.decoder_pool.age(s.state.decoder_slot, tokens)
        return s

    model.stream = stream


def bench_streams(model, counts: list[int], *, seconds: float, delay_ms=None, age_tokens: int = 0) -> list[dict]:
    from voxlive.server.engine import Engine

    if age_tokens:
        _aged_streams(model, age_tokens)
    pcm = bench_audio(seconds)
    timer = _StepTimer(model.runtime)
    engine = Engine(model, max_sessions=max(counts), max_buffer_seconds=seconds + 1)
    engine.start()
    try:
        asyncio.run(_serve(engine, pcm[:SAMPLE_RATE], 1, delay_ms))  # warm-up: the fresh stream's prefill
        rows = []
        for n in counts:
            since = timer.totals()
            wall = asyncio.run(_serve(engine, pcm, n, delay_ms))
            audio = n * len(pcm) / SAMPLE_RATE
            rows.append({"streams": n, "wall_s": wall, "rtf": wall / audio, **timer.figures(since, audio)})
    finally:
        engine.stop()
    single = next((r["wall_s"] for r in rows if r["streams"] == 1), None)
    for r in rows:
        r["gain_vs_sequential"] = single * r["streams"] / r["wall_s"] if single else None
    return rows


def _minute_audio(minute: int) -> np.ndarray:
    """A minute of bench audio, made when it is sent (an hour held at once would be 230 MB of RSS)."""
    return bench_audio(60.0, seed=minute)


async def _serve_by_minute(engine, n: int, minutes: int, delay_ms, timer: _StepTimer, log) -> list[dict]:
    """N sessions of ``minutes`` audio minutes each; a row each time every stream has been
    transcribed one more minute (counted in tokens: one per 80 ms)."""
    tokens = [0] * n
    rows: list[dict] = []
    t0 = time.perf_counter()
    since = timer.totals()

    def sample():
        nonlocal since
        rows.append({"minute": len(rows) + 1, **timer.figures(since, 60 * n), "rss_mb": rss_mb(),
                     "wall_s": time.perf_counter() - t0})
        since = timer.totals()
        if log is not None:
            print(minute_row(rows[-1]), file=log, flush=True)

    async def feed(session):
        for minute in range(minutes):
            await _send(session, _minute_audio(minute))
        session.end()

    async def read(i, session):
        while True:
            update = await session.next_update()
            tokens[i] += len(update.tokens)
            while min(tokens) >= TOKENS_PER_MINUTE * (len(rows) + 1) and len(rows) < minutes:
                sample()
            if update.transcript is not None:
                return

    sessions = [engine.open(delay_ms=delay_ms) for _ in range(n)]
    await asyncio.gather(*(feed(s) for s in sessions), *(read(i, s) for i, s in enumerate(sessions)))
    return rows


def soak_streams(model, n: int, *, minutes: int, delay_ms=None, log=None) -> list[dict]:
    """``voxlive bench --streams N --by-minute``: see the module's docstring."""
    from voxlive.server.engine import Engine

    timer = _StepTimer(model.runtime)
    # a bounded inbox, as the server has: the audio waits in the feeder, not in memory
    engine = Engine(model, max_sessions=n, max_buffer_seconds=10.0)
    engine.start()
    try:
        return asyncio.run(_serve_by_minute(engine, n, minutes, delay_ms, timer, log))
    finally:
        engine.stop()


MINUTE_HEADER = "audio min  decode ms/step  positions/step  ms/position  encoder ms/audio-s  RSS MB  wall s"


def minute_row(r: dict) -> str:
    return (f"{r['minute']:9d}  {r['decode_ms_per_step']:14.1f}  {r['positions_per_step']:14.1f}"
            f"  {r['decode_ms_per_position']:11.1f}  {r['encoder_ms_per_audio_s']:18.1f}  {r['rss_mb']:6.0f}"
            f"  {r['wall_s']:6.0f}")


def report_by_minute(rows: list[dict], n: int) -> str:
    return "\n".join([f"{n} stream(s), a row per audio minute of each, through the server's engine", MINUTE_HEADER,
                      *(minute_row(r) for r in rows)])


def report_streams(rows: list[dict], seconds: float) -> str:
    lines = [f"{seconds:.0f} s of audio per stream, fed in 80 ms chunks through the server's engine",
             "streams  decode ms/step  positions/step  ms/position  encoder ms/audio-s  wall s  aggregate RTF"
             "  gain vs one-by-one"]
    for r in rows:
        gain = f"{r['gain_vs_sequential']:.2f}x" if r["gain_vs_sequential"] else "-"
        lines.append(f"{r['streams']:7d}  {r['decode_ms_per_step']:14.1f}  {r['positions_per_step']:14.1f}"
                     f"  {r['decode_ms_per_position']:11.1f}  {r['encoder_ms_per_audio_s']:18.1f}"
                     f"  {r['wall_s']:6.1f}  {r['rtf']:13.3f}  {gain:>18}")
    return "\n".join(lines)
