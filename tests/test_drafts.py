"""Drafted tokens change the number of decoder passes, never the tokens: against one-step-at-a-time
decoding (``drafts=False``), in float32 on the tiny model whose greedy tokens follow the audio.

The speech (~4.4 s, 55 audio tokens, plus 32 prompt positions and the right pad) is longer than the
tiny decoder window (40 positions), so verification passes and rewinds cross the window's wrap.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import voxlive
from voxlive.backends.pool import KEY_BLOCK
from voxlive.drafts import Adaptive, Bigrams, Drafting, Fallback, Fixed, Oracle, PadRuns
from voxlive.session import decode_available, decode_step, encode_and_prefill
from voxlive_bench.replay import Replayer

DELAYS = (480, 160, 960)


@pytest.fixture(scope="module", params=["torch", "mlx"])
def model(request, varied_dir):
    if request.param == "mlx":
        pytest.importorskip("mlx.core", reason="MLX is not installed")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add overhead
    yield voxlive.load(varied_dir, backend=request.param, dtype="float32", device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def audio(speech):
    """Speech, then silence (a long pad run): ~6 s, 120 decoder positions, three windows."""
    return np.concatenate((speech, np.zeros(24000, np.float32)))


@pytest.fixture(scope="module")
def stepwise_streams(model, audio):
    """One-step-at-a-time streams, finished, per delay."""
    streams = {d: model.stream(delay_ms=d, drafts=False) for d in DELAYS}
    for s in streams.values():
        s.feed(audio)
        s.finish()
    return streams


@pytest.fixture(scope="module")
def stepwise(stepwise_streams):
    """One-step-at-a-time tokens, per delay."""
    return {d: s.tokens for d, s in stepwise_streams.items()}


def assert_stepwise_probabilities(stream, stepwise_stream):
    """A token verified in a pass of several rows has the probability stepwise decoding gave it (to
    float32 rounding: the passes' matrix products have other shapes), and so has every word."""
    np.testing.assert_allclose(stream.probabilities, stepwise_stream.probabilities, rtol=2e-5, atol=1e-6)
    words, expected = stream.transcript().words, stepwise_stream.transcript().words
    assert words == expected
    np.testing.assert_allclose([w.probability for w in words], [w.probability for w in expected], rtol=2e-5)


def _stream(model, delay_ms, drafting):
    s = model.stream(delay_ms=delay_ms, drafts=False)
    s.use_drafting(drafting)
    return s


def _feed(stream, audio, chunks):
    pos = 0
    for n in chunks:
        stream.feed(audio[pos:pos + n])
        pos += n
    stream.feed(audio[pos:])
    return stream.finish()


def _random_chunks(rng, total):
    """Chunk sizes from a tenth of a token to three seconds (the tiny ones are test_streaming's)."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.choice([rng.integers(100, 1280), rng.integers(1280, 8000), rng.integers(8000, 48000)])))
    return sizes


def _oracle(model, tokens, accuracy, length, seed=0):
    return Drafting(Oracle(tokens, accuracy=accuracy, vocab_size=model.config.decoder.vocab_size, seed=seed), length)


@pytest.mark.parametrize("seed", range(3))
def test_default_drafts_give_the_stepwise_tokens_and_probabilities_offline_and_for_random_chunkings(
        model, audio, stepwise, stepwise_streams, seed):
    delay = DELAYS[seed]
    offline = model.transcribe(audio, delay_ms=delay)  # drafts on: the load default
    assert offline.tokens == stepwise[delay]
    s = model.stream(delay_ms=delay)
    streamed = _feed(s, audio, _random_chunks(np.random.default_rng(seed), len(audio)))
    assert streamed.tokens == stepwise[delay]
    assert 0 < s.drafts_accepted <= s.drafts_fed  # drafts were really verified, not skipped
    assert_stepwise_probabilities(s, stepwise_streams[delay])


@pytest.mark.parametrize("accuracy,delay", [(1.0, 480), (0.0, 160), (0.6, 960)])
def test_oracle_drafts_right_wrong_or_mixed_give_the_stepwise_tokens_and_probabilities(
        model, audio, stepwise, stepwise_streams, accuracy, delay):
    truth = stepwise[delay]
    s = _stream(model, delay, _oracle(model, truth, accuracy, Fixed(model.runtime.max_draft), seed=delay))
    got = _feed(s, audio, _random_chunks(np.random.default_rng(delay), len(audio)))
    assert got.tokens == truth
    assert_stepwise_probabilities(s, stepwise_streams[delay])
    assert s.drafts_fed >= len(truth) // 4
    if accuracy == 1.0:
        assert s.drafts_accepted == s.drafts_fed
    elif accuracy == 0.0:
        assert s.drafts_accepted == 0
    else:
        assert 0 < s.drafts_accepted < s.drafts_fed


def test_batched_streams_each_with_its_own_drafts_give_their_stepwise_tokens(model, audio, stepwise):
    drafters = [lambda t: _oracle(model, t, 1.0, Fixed(8)), lambda t: _oracle(model, t, 0.0, Fixed(3), seed=1),
                lambda t: _oracle(model, t, 0.7, Fixed(5), seed=2), lambda t: Drafting.default(model.tokenizer.streaming_pad),
                lambda t: None]
    delays = [480, 160, 960, 480, 160]
    streams = [_stream(model, d, make(stepwise[d])) for make, d in zip(drafters, delays)]
    sizes = [1280 * 3, 7000, 16000, 555, 40000, 2000]
    pos, i = 0, 0
    while pos < len(audio):  # all streams get the same chunk, decoded in batched steps
        n = sizes[i % len(sizes)]
        for s in streams:
            s.push(audio[pos:pos + n])
        decode_available(streams)
        pos, i = pos + n, i + 1
    for s in streams:
        s.end_audio()
    decode_available(streams)
    for s, d in zip(streams, delays):
        assert s.transcript().tokens == stepwise[d]
    assert streams[0].drafts_accepted == streams[0].drafts_fed > 0
    assert streams[1].drafts_accepted == 0 < streams[1].drafts_fed


def _window(rt, state):
    """The decoder pool's keys and values of the positions in the stream's window, by position:
    [layers, kv_heads, positions, head_dim] (the pool keeps index i in block i // KEY_BLOCK)."""
    pool = rt.decoder_pool
    length, start = pool.length(state.decoder_slot), int(pool._start[state.decoder_slot])
    at = np.array([(p - start) % pool.capacity for p in range(max(start, length - pool.window), length)])
    return [b[:, state.decoder_slot][:, at // KEY_BLOCK, :, at % KEY_BLOCK].permute(1, 2, 0, 3).float().numpy()
            for b in (pool.k, pool.v)]


@pytest.mark.parametrize("rejected", [1, 4, 8])
def test_after_a_rewind_the_caches_equal_a_run_that_never_saw_the_rejected_positions(model, audio, stepwise,
                                                                                     rejected):
    rt = model.runtime
    a = model.stream(drafts=False)
    a.push(audio)
    encode_and_prefill([a])
    while a.decoded < len(a.prompt) + rt.config.decoder.sliding_window + 7:  # past the wrap
        decode_step([a])
    truth = stepwise[480]
    for _ in range(3):  # b: every step feeds drafts that are all wrong, and rewinds them
        b = a.fork()
        b.use_drafting(_oracle(model, truth, 0.0, Fixed(rejected)))
        decode_step([a])
        decode_step([b])
        assert b.drafts_fed == rejected and b.drafts_accepted == 0
        assert b.tokens == a.tokens and rt.position(b.state) == rt.position(a.state)
        if rt.backend == "torch":
            for x, y in zip(_window(rt, a.state), _window(rt, b.state)):
                assert x.shape[2] == rt.config.decoder.sliding_window
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        feed = a.tokens[-1:] + truth[len(a.tokens):len(a.tokens) + 3]
        # the next positions, from the audio embeddings the rewind put back in the queue
        la, lb = rt.logits(a.fork().state, feed), rt.logits(b.fork().state, feed)
        np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-5)
        assert sum(e.shape[0] for e in b.state.pending) == sum(e.shape[0] for e in a.state.pending)


def test_the_server_engine_drafts(model, audio, stepwise):
    from voxlive.server.engine import Engine

    engine = Engine(model, max_buffer_seconds=len(audio) / 16000 + 1)
    engine.start()

    async def serve():
        session = engine.open(delay_ms=480)
        await session.append(audio)  # all at once: a backlog, so positions wait with their audio in
        session.end()
        while (update := await session.next_update()).transcript is None:
            pass
        return session, update.transcript

    try:
        session, transcript = asyncio.run(serve())
    finally:
        engine.stop()
    assert transcript.tokens == stepwise[480]
    assert engine.steps < len(transcript.tokens)  # some steps accepted drafts (the stream itself is freed by now)


def test_drafts_off_feed_one_token_per_step(varied_dir, speech):
    off = voxlive.load(varied_dir, dtype="float32", device="cpu", drafts=False)
    s = off.stream()
    s.feed(speech)
    s.finish()
    assert s.drafting is None and s.drafts_fed == 0
    on = off.stream(drafts=True)  # the stream option overrides the load option
    on.feed(speech)
    assert on.finish().tokens == s.transcript().tokens and on.drafts_fed > 0


def test_streams_choose_their_draft_length_with_their_runtimes_row_cost(varied_dir, speech):
    """A model's streams weigh drafts against their runtime's cost of a row: rows dearer than any
    acceptance below 1 can pay for, and they draft nothing (and give the same tokens)."""
    m = voxlive.load(varied_dir, dtype="float32", device="cpu")
    cheap = m.stream()
    cheap.feed(speech)
    tokens = cheap.finish().tokens
    assert cheap.drafts_fed > 0
    m.runtime.row_cost = 10.0
    dear = m.stream()
    dear.feed(speech)
    assert dear.finish().tokens == tokens and dear.drafts_fed == 0


def test_pad_runs_and_bigrams_guess_from_what_the_stream_said():
    pads = PadRuns(pad_id=32)
    assert pads.draft(3) == []
    pads.observe(32)
    assert pads.draft(3) == [32, 32, 32]
    pads.observe(7)
    assert pads.draft(3) == []
    grams = Bigrams()
    assert grams.draft(4) == []  # nothing said yet
    for t in [5, 6, 5, 7, 5, 7, 7, 9]:
        grams.observe(t)
    # 5 was followed by 7 twice, by 6 once; 7 by 5, 7 and 9 once each (5 came first); 9 by nothing
    # yet, so the most frequent token so far (5 and 7, 3 times each; 5 got there first) stands for it
    assert grams.draft(4) == [5, 7, 5, 7]
    grams.observe(5)
    assert grams.draft(4) == [7, 5, 7, 5]
    grams.observe(8)  # a new token: its follower is unknown
    assert grams.draft(3) == [5, 7, 5]  # the most frequent, 5 (4 times), then its followers
    both = Fallback(PadRuns(32), Bigrams())
    for t in [32, 4, 32, 4, 32]:
        both.observe(t)
    assert both.draft(2) == [32, 32]
    both.observe(4)
    assert both.draft(2) == [32, 4]
    speech = Fallback(PadRuns(32), Bigrams())
    for t in [32, 32, 32, 4, 32, 32, 11]:  # a word never heard before, after pads ...
        speech.observe(t)
    assert speech.draft(3) == [32, 32, 32]  # ... is taken to be followed by pads


def test_adaptive_length_follows_acceptance_and_cost():
    length = Adaptive(row_cost=0.25)
    assert length.choose(16, 5) > 0  # the prior is worth a try
    for _ in range(50):
        length.update(length.choose(8, 5), length.choose(8, 5), 5)  # every draft confirmed
    assert length.choose(8, 5) == 8 and length.choose(3, 5) == 3
    for _ in range(200):
        length.update(2, 0, 5)  # every draft wrong
    assert length.choose(8, 5) == 0
    for _ in range(100):
        length.update(0, 0, 5)  # no drafts: the estimate drifts back to the prior, and it tries again
    assert length.choose(8, 5) > 0
    assert Adaptive(row_cost=10.0).choose(8, None) == 0  # rows too dear for any acceptance below 1


def test_adaptive_length_learns_each_context_apart():
    """Drafts after one token always confirmed, after another always wrong: the length is long after
    the first and nothing after the second, and a context never seen takes the overall estimate."""
    length = Adaptive(row_cost=0.1)
    for _ in range(100):
        length.update(length.choose(8, 32), length.choose(8, 32), 32)  # pads after a pad
        length.update(length.choose(8, 33), 0, 33)  # a word after the word marker: never guessed
    assert length.choose(8, 32) == 8
    assert length.choose(8, 33) == 0
    assert length.acceptance(7) == length.acceptance(None) < length.acceptance(32)  # the overall one


def test_a_stream_stops_drafting_where_its_guesses_never_hold(varied_dir, monkeypatch):
    """A stream whose every word marker is followed by a text token never said before (so never
    guessed): once it has learnt that, it feeds at most one draft after the marker (now and then,
    to try again), while it goes on drafting the pad runs; it emits its script (replayed through the
    session as in the bench)."""
    m = voxlive.load(varied_dir, dtype="float32", device="cpu")
    pad, word, first = m.tokenizer.streaming_pad, m.tokenizer.streaming_word, m.tokenizer.num_special
    script = []
    for i in range(40):  # a word marker, a new text token, then pads
        script += [word, first + i] + [pad] * 6
    fed_after = []
    update = Adaptive.update

    def watched(self, fed, accepted, after):
        fed_after.append((after, fed))
        update(self, fed, accepted, after)

    monkeypatch.setattr(Adaptive, "update", watched)
    rows = Replayer(m, row_cost=0.1).rows(script, chunk_seconds=30.0)
    after_word = [fed for after, fed in fed_after if after == word]
    after_text = [fed for after, fed in fed_after if after is not None and after >= first]
    assert len(after_word) >= 30 and after_word[0] > 1 and max(after_word[-20:]) <= 1
    assert sum(after_text[-20:]) > 3 * 20  # each a new token, drafted by the overall estimate: pads
    assert len(rows) < len(script) / 2  # drafting still pays where it can
