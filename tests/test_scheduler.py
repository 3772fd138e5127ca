"""The engine's scheduler as pure plans, then the engine thread on its own (no HTTP).

The plans are checked without threads or a model: joins, leaves, lagging streams and ends are
sessions' public states in, step plans out. The engine thread is then checked for what only it
can show: coalesced updates, bounded buffers, the lag figure, failures.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

import voxlive
from voxlive.server import Engine
from voxlive.server.engine import Cut, EngineBusy, SessionOver, Update
from voxlive.server.scheduler import Policy, SessionView, schedule

POLICY = Policy(samples_per_token=1280, max_backlog_tokens=50, refill_below_tokens=12)
LIVE = SessionView("live", started=True, backlog=1, can_decode=True)


def test_a_joining_session_starts_takes_its_audio_and_decodes_from_the_next_step():
    plan = schedule([LIVE, SessionView("new", inbox=3200)], POLICY)
    assert plan.start == ["new"]
    assert plan.ingest == {"new": 3200}
    assert plan.prepare == ["new"]
    assert plan.decode == ["live"]  # the newcomer has nothing encoded yet: it joins the batch later
    assert not plan.drop and not plan.end_audio and not plan.complete


def test_a_closed_session_is_dropped_and_nothing_else_is_done_for_it():
    closed = replace(LIVE, key="gone", closed=True, inbox=5000, can_prepare=True)
    plan = schedule([closed, LIVE, SessionView("over", started=True, done=True, inbox=10)], POLICY)
    assert plan.drop == ["gone"]
    assert plan.decode == ["live"]
    assert not plan.ingest and not plan.prepare and not plan.complete  # a done session is left alone


def test_a_stream_that_keeps_up_takes_everything_up_to_the_backlog_bound():
    keeping_up = SessionView("s", started=True, backlog=12, inbox=10 * 1280)
    assert schedule([keeping_up], POLICY).ingest == {"s": 10 * 1280}
    flood = replace(keeping_up, inbox=10**7)
    assert schedule([flood], POLICY).ingest == {"s": (50 - 12) * 1280}


def test_a_lagging_stream_drains_to_the_mark_then_is_topped_up_in_one_go():
    lagging = SessionView("up", started=True, backlog=13, inbox=10**7, can_decode=True)
    plan = schedule([lagging], POLICY)
    assert plan.ingest == {} and plan.decode == ["up"]  # lagging: decode, take nothing
    drained = replace(lagging, backlog=12)
    assert schedule([drained], POLICY).ingest == {"up": 38 * 1280}


def test_ending_waits_for_the_inbox_then_decodes_the_pad_then_completes():
    ending = SessionView("e", started=True, backlog=13, inbox=2000, ending=True, can_decode=True)
    assert schedule([ending], POLICY).end_audio == []  # audio still in the inbox: not yet
    last = replace(ending, backlog=3)
    plan = schedule([last], POLICY)
    assert plan.ingest == {"e": 2000} and plan.end_audio == ["e"] and plan.prepare == ["e"]
    padded = SessionView("e", started=True, ending=True, audio_ended=True, backlog=18, can_prepare=True)
    plan = schedule([padded], POLICY)
    assert plan.prepare == ["e"] and not plan.end_audio and not plan.complete
    decoding = replace(padded, can_prepare=False, can_decode=True)
    assert schedule([decoding], POLICY).decode == ["e"] and not schedule([decoding], POLICY).complete
    drained = replace(decoding, can_decode=False, backlog=0)
    assert schedule([drained], POLICY).complete == ["e"]
    assert not schedule([replace(drained, done=True)], POLICY)  # finished: nothing more to do


def test_a_session_that_ends_without_audio_starts_and_ends_in_one_step():
    plan = schedule([SessionView("empty", ending=True)], POLICY)
    assert plan.start == plan.end_audio == plan.prepare == ["empty"] and not plan.ingest


def test_an_idle_engine_has_an_empty_plan():
    idle = SessionView("idle", started=True, backlog=0)
    assert not schedule([idle, replace(idle, key="other")], POLICY)
    assert schedule([replace(idle, can_prepare=True)], POLICY).prepare == ["idle"]


def test_simulated_sessions_lose_no_audio_and_keep_the_backlog_bounded():
    """Plans applied to a toy model of streams (each whole token is encoded when prepared, one
    position decoded per step): every sample is ingested once, in order, and each session ends."""
    rng = np.random.default_rng(0)
    spt = POLICY.samples_per_token
    sims = {k: {"sent": int(rng.integers(0, 400_000)), "inbox": 0, "received": 0, "taken": 0, "pending": 0,
                "encoded": 0, "decoded": 0, "started": False, "ended": False, "done": False, "at": int(rng.integers(0, 40))}
            for k in range(6)}
    for step in range(5000):
        for k, s in sims.items():  # clients send 0.5 s per step, after their join step
            if step >= s["at"] and s["received"] < s["sent"]:
                n = min(8000, s["sent"] - s["received"])
                s["received"] += n
                s["inbox"] += n
        views = [SessionView(k, started=s["started"], done=s["done"], inbox=s["inbox"],
                             ending=s["received"] == s["sent"] and step >= s["at"], audio_ended=s["ended"],
                             backlog=s["encoded"] + s["pending"] // spt - s["decoded"],
                             can_prepare=s["pending"] >= spt, can_decode=s["decoded"] < s["encoded"])
                 for k, s in sims.items()]
        plan = schedule(views, POLICY)
        for k in plan.start:
            sims[k]["started"] = True
        for k, n in plan.ingest.items():
            assert sims[k]["started"] and n <= sims[k]["inbox"]
            sims[k]["inbox"] -= n
            sims[k]["taken"] += n
            sims[k]["pending"] += n
        for k in plan.end_audio:
            assert sims[k]["inbox"] == 0 and sims[k]["taken"] == sims[k]["sent"]
            sims[k]["ended"] = True
            sims[k]["pending"] += -sims[k]["pending"] % spt + 7 * spt
        for k in plan.prepare:
            sims[k]["encoded"] += sims[k]["pending"] // spt
            sims[k]["pending"] %= spt
        for k in plan.decode:
            sims[k]["decoded"] += 1
        for k in plan.complete:
            assert sims[k]["ended"] and sims[k]["decoded"] == sims[k]["encoded"]
            sims[k]["done"] = True
        for s in sims.values():
            assert s["encoded"] + s["pending"] // spt - s["decoded"] <= POLICY.max_backlog_tokens + 8
        if all(s["done"] for s in sims.values()):
            break
    assert all(s["done"] and s["taken"] == s["sent"] for s in sims.values())


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
            peak = max(peak, session.buffered)
        session.end()
        return peak, lags, await reading

    peak, lags, transcript = run_engine(model, body, max_buffer_seconds=limit / 16000, max_backlog_seconds=0.16,
                                       refill_below_seconds=0.08)
    assert peak <= limit + chunk  # append waited for room instead of queueing the whole file
    assert max(lags) > 0.2 and lags[-1] == 0.0
    assert transcript.tokens == varied_model.transcribe(speech).tokens  # nothing lost by waiting


def test_the_session_limit_holds_and_a_closed_sessions_slot_is_free_at_once(model):
    async def body(engine):
        first = engine.open()
        engine.open()
        with pytest.raises(EngineBusy):
            engine.open()
        first.close()
        engine.open()  # the closed session's slot is free at once, before the engine thread drops it
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


def test_merged_updates_give_tokens_published_before_a_cut_before_it():
    """A reader that fell behind gets one merged update holding tokens published before a cut, the
    cut, and tokens published after it: ``in_order`` gives them back in that order, from what the
    reader has taken so far."""
    cut = Cut(samples=16000, forked_at=5, tokens=[1, 2, 3, 4, 5, 6, 7], probabilities=[0.5] * 7)
    merged = Update(tokens=[1, 2, 3], probabilities=[0.1, 0.2, 0.3])
    merged.merge(Update(cuts=[cut]))
    merged.merge(Update(tokens=[8, 9], probabilities=[0.8, 0.9]))
    assert merged.tokens == [1, 2, 3, 8, 9]
    # tokens 3 to 5 came before the cut; each run keeps its tokens' probabilities
    assert merged.in_order(seen=2) == [([1, 2, 3], [0.1, 0.2, 0.3]), cut, ([8, 9], [0.8, 0.9])]
    assert Update(cuts=[cut], tokens=[8, 9], probabilities=[0.8, 0.9]).in_order(seen=5) == [cut, ([8, 9], [0.8, 0.9])]
    assert Update(cuts=[cut]).in_order(seen=5) == [cut]
