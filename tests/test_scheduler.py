"""The engine thread on its own (no HTTP): coalesced updates, bounded buffers, the lag figure."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import voxlive
from voxlive.server import Engine
from voxlive.server.engine import EngineBusy, SessionOver


@pytest.fixture(scope="module")
def model(varied_dir):
    return voxlive.load(varied_dir, dtype="float32", device="cpu")


def run_engine(model, body, **options):
    engine = Engine(model, **options)
    engine.start()
    try:
        return asyncio.run(body(engine))
    finally:
        engine.stop()


def test_updates_are_coalesced_for_a_reader_that_waits(model, varied_model, speech):
    """A client that reads late gets one update with everything, not a queue of messages."""
    expected = varied_model.transcribe(speech)

    async def body(engine):
        session = engine.open()
        await session.append(speech)
        session.end()
        while not session.finished:
            await asyncio.sleep(0.05)
        update = await session.next_update()
        return update

    update = run_engine(model, body)
    assert update.transcript is not None
    assert update.tokens == expected.tokens
    assert update.words == expected.words


def test_inbox_is_bounded_and_lag_is_reported(model, varied_model, speech):
    """Audio sent faster than it is transcribed waits in a bounded inbox; the lag says how far behind."""
    chunk = 1600
    limit = 4000  # samples: 0.25 s

    async def body(engine):
        session = engine.open()
        peak, lags = 0, []

        async def reader():
            while True:
                update = await session.next_update()
                lags.append(update.lag)
                if update.transcript is not None:
                    return update.transcript

        reading = asyncio.create_task(reader())
        for start in range(0, len(speech), chunk):
            await session.append(speech[start:start + chunk])
            peak = max(peak, session._inbox_samples)
        session.end()
        return peak, lags, await reading

    peak, lags, transcript = run_engine(model, body, max_buffer_seconds=limit / 16000, max_backlog_seconds=0.16,
                                       refill_below_seconds=0.08)
    assert peak <= limit + chunk  # append waited for room instead of queueing the whole file
    assert max(lags) > 0.2 and lags[-1] == 0.0
    assert transcript.tokens == varied_model.transcribe(speech).tokens  # nothing lost by waiting


def test_session_limit_and_closed_sessions(model):
    async def body(engine):
        first = engine.open()
        engine.open()
        with pytest.raises(EngineBusy):
            engine.open()
        first.close()
        for _ in range(100):
            if engine.active < 2:
                break
            await asyncio.sleep(0.02)
        engine.open()  # the closed session's slot is free again
        with pytest.raises(SessionOver):
            await first.append(np.zeros(160, dtype=np.float32))
        with pytest.raises(ValueError):
            engine.open(delay_ms=100)  # not a multiple of 80

    run_engine(model, body, max_sessions=2)


def test_a_failing_step_fails_its_sessions_and_the_engine_goes_on(model, varied_model, speech, monkeypatch):
    async def body(engine):
        runtime = engine.model.runtime
        real = runtime.decode
        calls = {"n": 0}

        def flaky(states, feeds, **options):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
            return real(states, feeds, **options)

        monkeypatch.setattr(runtime, "decode", flaky)
        doomed = engine.open()
        await doomed.append(speech)
        doomed.end()
        failure = await doomed.next_update()
        while not failure.error and not failure.transcript:
            failure = await doomed.next_update()
        monkeypatch.setattr(runtime, "decode", real)
        healthy = engine.open()
        await healthy.append(speech)
        healthy.end()
        while True:
            update = await healthy.next_update()
            if update.transcript:
                return failure, update.transcript

    failure, transcript = run_engine(model, body)
    assert "boom" in failure.error
    assert transcript.tokens == varied_model.transcribe(speech).tokens
