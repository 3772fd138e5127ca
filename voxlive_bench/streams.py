"""``voxlive bench --streams 1,2,4,8,16``: what batching buys the server.

For each count N, N sessions go through the server's own engine (the scheduler thread, batched
encoder passes and decode steps), each fed the same-length synthetic audio in 80 ms chunks as
fast as the engine takes it. Reported per N: decode ms per batched step, the positions a step
runs (all streams: with drafts a stream verifies several positions in one pass, so a step of 16
streams can be a pass of 144 rows, compute-bound, not 16), decode ms per position, encoder ms per
audio second (all streams), wall time, aggregate real-time factor (wall / audio seconds of all streams:
below 1 means N live streams keep up), and the gain over serving the N streams one after another
(N x the wall time of one stream / the wall time of N).
"""

from __future__ import annotations

import asyncio
import time

from .bench import bench_audio

CHUNK_SECONDS = 0.08


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

    def reset(self):
        self.seconds = {"decode": 0.0, "encode": 0.0}
        self.steps = 0
        self.positions = 0


async def _serve(engine, pcm, n: int, delay_ms) -> float:
    step = int(CHUNK_SECONDS * 16000)

    async def one():
        session = engine.open(delay_ms=delay_ms)
        for start in range(0, len(pcm), step):
            await session.append(pcm[start:start + step])
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
        asyncio.run(_serve(engine, pcm[:16000], 1, delay_ms))  # warm-up: the fresh stream's prefill
        rows = []
        for n in counts:
            timer.reset()
            wall = asyncio.run(_serve(engine, pcm, n, delay_ms))
            audio = n * len(pcm) / 16000
            rows.append({"streams": n, "wall_s": wall, "rtf": wall / audio,
                         "decode_ms_per_step": 1000 * timer.seconds["decode"] / max(1, timer.steps),
                         "positions_per_step": timer.positions / max(1, timer.steps),
                         "decode_ms_per_position": 1000 * timer.seconds["decode"] / max(1, timer.positions),
                         "encoder_ms_per_audio_s": 1000 * timer.seconds["encode"] / audio, "steps": timer.steps})
    finally:
        engine.stop()
    single = next((r["wall_s"] for r in rows if r["streams"] == 1), None)
    for r in rows:
        r["gain_vs_sequential"] = single * r["streams"] / r["wall_s"] if single else None
    return rows


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
