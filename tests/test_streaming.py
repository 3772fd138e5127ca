"""Streaming == offline, token for token, for any chunking; the safe frontier; batching; finish."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import voxlive
from voxlive.session import decode_available

SAMPLES_PER_TOKEN = 1280
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(importlib.util.find_spec("mlx") is None,
                                                                   reason="MLX is not installed"))]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, varied_model, varied_dir):
    """The varied tiny model on each backend (float32)."""
    if request.param == "torch":
        return varied_model
    return voxlive.load(varied_dir, backend=request.param, dtype="float32", device="cpu")


def _stream_tokens(model, audio, chunks, delay_ms=None):
    s = model.stream(delay_ms=delay_ms)
    words = []
    pos = 0
    for n in chunks:
        words += s.feed(audio[pos:pos + n])
        pos += n
    words += s.feed(audio[pos:])
    final = s.finish()
    words += s.take_words()
    return final, words


def _random_chunks(rng, total):
    sizes = []
    while sum(sizes) < total:
        kind = rng.integers(4)
        if kind == 0:
            sizes.append(int(rng.integers(1, 5)))  # tiny
        elif kind == 1:
            sizes.append(int(rng.integers(100, 2000)))  # around a token
        elif kind == 2:
            sizes.append(int(rng.integers(2000, 20000)))
        else:
            sizes.append(int(rng.integers(16000, 48000)))  # seconds
    return sizes


def test_greedy_tokens_depend_on_the_audio(model, speech):
    # Otherwise streaming == offline below would compare constant sequences and prove nothing.
    tokens = model.transcribe(speech).tokens
    assert len(set(tokens)) >= 5
    silence = model.transcribe(np.zeros_like(speech)).tokens
    assert sum(a != b for a, b in zip(tokens, silence)) >= len(tokens) // 4


@pytest.mark.parametrize("seed", range(6))
def test_streaming_equals_offline_for_random_chunkings(model, speech, seed):
    delay_ms = [480, 160, 960][seed % 3]
    offline = model.transcribe(speech, delay_ms=delay_ms)
    rng = np.random.default_rng(seed)
    streamed, words = _stream_tokens(model, speech, _random_chunks(rng, len(speech)), delay_ms)
    assert streamed.tokens == offline.tokens
    assert streamed.text == offline.text
    assert streamed.words == offline.words
    assert words == streamed.words  # events delivered live are exactly the final words


def test_one_token_per_audio_token(model, speech):
    delay = 6
    t = model.transcribe(speech)
    n_audio = -(-len(speech) // SAMPLES_PER_TOKEN)
    total_positions = 32 + n_audio + delay + 1 + 10
    # positions 38 (last prompt position) .. total-1 each emit one token
    assert len(t.tokens) == total_positions - (32 + delay)


def test_never_decodes_audio_that_has_not_arrived(model, speech):
    s = model.stream()
    fed = 0
    rng = np.random.default_rng(7)
    while fed < len(speech):
        n = int(rng.integers(1, 3000))
        s.feed(speech[fed:fed + n])
        fed = min(fed + n, len(speech))
        padded = 32 * SAMPLES_PER_TOKEN + fed
        # audio token p needs its 8 mel frames, the last of which reaches 40 samples past the token
        complete = max(0, (padded - 40) // SAMPLES_PER_TOKEN)
        assert s.encoded == complete
        assert s.decoded == complete  # every position runs as soon as its audio is encoded
        assert len(s.tokens) == max(0, s.decoded - len(s.prompt) + 1)


def test_batched_encode_and_decode_equal_one_by_one(model, speech, monkeypatch):
    audios = [speech, speech[::-1].copy(), 0.5 * speech[: len(speech) // 2]]
    delays = [480, 240, 480]
    steps = [3000, 1700, 5100]  # streams with different numbers of new tokens share encoder passes
    expected = [model.transcribe(a, delay_ms=d) for a, d in zip(audios, delays)]
    streams = [model.stream(delay_ms=d) for d in delays]
    runtime = model.runtime
    batch_sizes = []
    real_encode_batch = runtime.encode_batch

    def spy(states, mels):
        batch_sizes.append(len(states))
        return real_encode_batch(states, mels)

    monkeypatch.setattr(runtime, "encode_batch", spy)
    for i in range(max(-(-len(a) // step) for a, step in zip(audios, steps))):
        for s, a, step in zip(streams, audios, steps):
            s.push(a[i * step:(i + 1) * step])
        decode_available(streams)  # several streams share each encoder pass and decode step
    assert max(batch_sizes) == 3
    for s, exp in zip(streams, expected):
        got = s.finish()
        assert got.tokens == exp.tokens and got.words == exp.words
        np.testing.assert_allclose([w.probability for w in got.words], [w.probability for w in exp.words], rtol=2e-5)


def test_finish_is_idempotent_and_feed_after_finish_fails(model, speech):
    s = model.stream()
    s.feed(speech[:20000])
    a = s.finish()
    b = s.finish()
    assert a.tokens == b.tokens and a.text == b.text
    with pytest.raises(RuntimeError, match="already finished"):
        s.feed(speech[:100])


def test_empty_and_tiny_streams(model):
    s = model.stream()
    assert s.finish().duration == 0
    assert len(s.tokens) == 32 + (6 + 1 + 10) - (32 + 6)  # the right pad alone still runs its positions
    s = model.stream()
    s.feed(np.zeros(1, np.float32))
    assert s.finish().duration == pytest.approx(1 / 16000)


def test_bad_pcm_is_rejected_without_losing_the_stream(model, speech):
    s = model.stream()
    s.feed(speech[:16000])
    before = list(s.tokens)
    with pytest.raises(ValueError, match="1-D"):
        s.feed(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="float"):
        s.feed(np.zeros(100, np.int16))
    with pytest.raises(ValueError, match="NaN"):
        s.feed(np.array([0.0, np.nan], np.float32))
    assert s.tokens == before
    s.feed(speech[16000:])
    assert s.finish().tokens == model.transcribe(speech).tokens


def test_long_audio_memory_is_bounded(model):
    # The KV pools: a stream's keys and values live in its fixed-size slot, whatever the audio's length.
    rt = model.runtime
    s = model.stream()
    rng = np.random.default_rng(0)
    s.feed((0.1 * rng.standard_normal(16000 * 5)).astype(np.float32))

    def sizes():
        return [[a.shape for a in pool.arrays()] for pool in (rt.encoder_pool, rt.decoder_pool)]

    before = sizes()
    s.feed((0.1 * rng.standard_normal(16000 * 20)).astype(np.float32))
    assert sizes() == before
    c = model.config
    assert rt.encoder_pool.capacity == c.encoder.sliding_window
    assert rt.decoder_pool.capacity == c.decoder.sliding_window + rt.max_draft
    assert s.decoded > c.decoder.sliding_window
    assert rt.encoder_pool.length(s.state.encoder_slot) > c.encoder.sliding_window
    assert rt.position(s.state) == s.decoded
    assert sum(t.shape[0] for t in s.state.pending) == 0


class _EosEvery:
    """The real runtime, but every 5th generated token is replaced by </s>; records decode inputs."""

    def __init__(self, runtime, eos):
        self.rt, self.eos, self.inputs, self.count = runtime, eos, [], 0

    def __getattr__(self, name):
        return getattr(self.rt, name)

    def _maybe_eos(self, tokens):
        out = []
        for t in tokens:
            self.count += 1
            out.append(self.eos if self.count % 5 == 0 else t)
        return out

    def decode(self, states, feeds, outputs=None):
        if outputs is None:  # a decode step (prompt positions pass their output counts)
            self.inputs += [t for f in feeds for t in f]
        out = self.rt.decode(states, feeds, outputs=outputs)
        for d in out:
            d.tokens = self._maybe_eos(d.tokens)
        return out


def test_eos_is_fed_back_and_no_audio_is_lost(model, speech):
    from voxlive.session import Stream

    eos = model.tokenizer.eos
    rt = _EosEvery(model.runtime, eos)
    s = Stream(rt, model.tokenizer, model.config)
    for start in range(0, len(speech), 5000):
        s.feed(speech[start:start + 5000])
    t = s.finish()
    assert len(t.tokens) == len(model.transcribe(speech).tokens)  # every position still decoded
    assert t.tokens.count(eos) >= len(t.tokens) // 5
    assert rt.inputs == t.tokens[:-1]  # each token, EOS included, is the next step's input
    assert t.duration == pytest.approx(len(speech) / 16000)


def test_streams_forked_from_the_fresh_stream_are_independent(model, speech):
    from voxlive.session import Stream

    direct = Stream(model.runtime, model.tokenizer, model.config)
    # the left pad's prompt positions run at creation, but the last: its last mel frame needs
    # 40 samples (2.5 ms) of the real audio
    assert direct.decoded == 31
    direct.feed(speech)
    expected = direct.finish().tokens

    a, b = model.stream(), model.stream()
    a.feed(speech[:30000])
    b.feed(speech[::-1].copy())  # a different stream in between must not disturb a
    a.feed(speech[30000:])
    assert a.finish().tokens == expected
    c = model.stream()  # the fresh stream it forks from is unchanged
    c.feed(speech)
    assert c.finish().tokens == expected
    assert b.finish().tokens != expected
