"""Blank ruts: a forced rut (``voxlive.testing.ForcedPad``: the pad's margin set to a rut's +5 over a
span of positions) is broken by the progressive penalty, with every position before it untouched
and no audio lost; true silence's margins (+8.5) never change a token; drafts do not change what
the penalty chooses. The demo checkpoint says a word at every position, so every position of the
span is text in the unforced run: a pad there is the forced rut, a text token is the way out."""

from __future__ import annotations

import numpy as np
import pytest

import voxlive
from voxlive.rut import Rut, RutPolicy
from voxlive.testing import forced_pad, write_demo_checkpoint

RUT = range(60, 290)  # decoder positions of the forced rut
RUT_MARGIN = 5.0  # inside the +3.5 .. +6.6 vLLM #47614 measured in real ruts
PLAIN = RutPolicy(speech_after=None)  # the default thresholds without the VAD's
CHUNK = 4 * 16000


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return voxlive.load(write_demo_checkpoint(tmp_path_factory.mktemp("demo")), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def long_speech(speech):
    return np.tile(speech, 6)  # ~24 s: more positions than the rut span


def run(model, pcm, **options):
    s = model.stream(**options)
    for start in range(0, len(pcm), CHUNK):
        s.feed(pcm[start:start + CHUNK])
    return s, s.finish()


@pytest.fixture(scope="module")
def runs(demo, long_speech):
    """run(), once per (margin forced over RUT or None, options) for the whole module."""
    done = {}

    def get(margin, **options):
        key = (margin, tuple(sorted(options.items())))
        if key not in done:
            model = demo if margin is None else forced_pad(demo, RUT, margin)
            done[key] = run(model, long_speech, **options)
        return done[key]

    return get


def positions_of(stream, tokens, pad, span) -> list[int]:
    """The decoder positions in ``span`` whose token is not the pad."""
    first = len(stream.prompt) - 1  # the position of tokens[0]
    return [first + i for i, t in enumerate(tokens) if t != pad and first + i in span]


def test_the_penalty_is_zero_up_to_the_threshold_then_grows_by_the_slope_to_the_cap():
    p = RutPolicy()
    assert [p.penalty(run, 0) for run in (0, 200, 201, 202, 210, 214, 10_000)] == [0, 0, 0.5, 1.0, 5.0, 7.0, 7.0]
    assert p.penalty(60, 51) == 0.5  # over speech, the tighter threshold counts the speech pads
    assert PLAIN.penalty(60, 60) == 0.0
    with pytest.raises(ValueError, match="slope and cap"):
        RutPolicy(cap=float("nan")).check()


def test_a_forced_rut_breaks_where_the_penalty_passes_its_margin_keeping_every_earlier_position(demo, runs,
                                                                                                 long_speech):
    pad = demo.tokenizer.streaming_pad
    _, clean = runs(None, rut=PLAIN)
    s, hole = runs(RUT_MARGIN, rut=None)
    assert positions_of(s, hole.tokens, pad, RUT) == []  # pure greedy: a hole over the whole span
    s, t = runs(RUT_MARGIN, rut=PLAIN)
    # The run at position 100 + k is k pads long: 0.5 * (k - 200) first exceeds +5 at k = 211.
    out = positions_of(s, t.tokens, pad, RUT)
    assert out[0] == RUT.start + 211
    assert out == [RUT.start + 211]  # then a new run starts, shorter than the rest of the span
    before = RUT.start - (len(s.prompt) - 1)
    assert t.tokens[:before] == clean.tokens[:before]  # nothing before the rut moved
    assert len(t.tokens) == len(clean.tokens) == len(hole.tokens)  # one position per audio token
    assert s.decoded == s.encoded and t.duration == len(long_speech) / 16000
    offset = demo.config.audio.n_left_pad_tokens + s.delay_tokens  # words' clock: (p - offset) * 80 ms
    assert t.ruts == [Rut(start=round((RUT.start - offset) * 0.08, 3), end=round((out[0] - offset) * 0.08, 3),
                          positions=211)]
    assert s.ruts == 1 and t.to_dict()["blank_ruts"] == [t.ruts[0].to_dict()]


def test_over_speech_the_vad_threshold_breaks_the_rut_sooner_and_fed_probabilities_agree(demo, runs, long_speech):
    pad = demo.tokenizer.streaming_pad
    forced = forced_pad(demo, RUT, RUT_MARGIN)
    s, t = runs(RUT_MARGIN)  # the default policy, its VAD run on the fed audio
    out = positions_of(s, t.tokens, pad, RUT)
    assert RUT.start + 61 <= out[0] < RUT.start + 211  # 50 speech pads, then 11 to pass +5
    assert len(out) > 1 and s.ruts == len(out)
    fed = forced.stream(speech="fed")
    fed.add_speech(demo.vad().probabilities(long_speech))  # computed elsewhere, all at once
    for start in range(0, len(long_speech), 70_000):
        fed.feed(long_speech[start:start + 70_000])
    assert fed.finish().tokens == t.tokens


def test_true_silence_margins_of_8_5_never_change_a_token(demo, long_speech):
    silence = forced_pad(demo, range(0, 10**6), 8.5)  # every position a pad, as confident as silence
    s, t = run(silence, long_speech)
    _, greedy = run(silence, long_speech, rut=None)
    assert t.tokens == greedy.tokens and set(t.tokens) == {demo.tokenizer.streaming_pad}
    assert s.ruts == 0 and t.ruts == []


def test_drafts_on_and_off_give_the_same_tokens_and_ruts_with_the_penalty_active(runs):
    on, with_drafts = runs(RUT_MARGIN)
    off, without = runs(RUT_MARGIN, drafts=False)
    assert on.drafts_accepted > 0 and off.drafts_fed == 0  # drafts really verified in one run only
    assert with_drafts.tokens == without.tokens and with_drafts.ruts == without.ruts != []


class FedTokens:
    """A runtime that records the token each decoder position was fed, minus rewound ones."""

    def __init__(self, runtime):
        self.inner, self.fed = runtime, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, states, feeds, *, outputs=None):
        for feed in feeds:
            self.fed += feed
        return self.inner.decode(states, feeds, outputs=outputs)

    def rewind(self, state, n):
        del self.fed[len(self.fed) - n:]
        self.inner.rewind(state, n)


def test_with_drafts_every_position_is_fed_the_penalised_choice_before_it(demo, long_speech):
    recorder = FedTokens(forced_pad(demo, RUT, RUT_MARGIN).runtime)
    s = voxlive.Model(recorder, demo.tokenizer, demo.source).stream(rut=PLAIN, drafts=True)
    s.feed(long_speech)
    t = s.finish()
    assert s.ruts == 1 and s.drafts_accepted > 0
    first = len(s.prompt) - 1  # the position of tokens[0]; the position after it is fed it
    assert recorder.fed[:first + 1] == s.prompt and recorder.fed[first + 1:] == t.tokens[:len(recorder.fed) - first - 1]


def test_choose_takes_the_best_other_token_where_the_pad_wins_by_less_than_the_penalty(demo):
    from voxlive.backends.runtime import Decoded

    pad = demo.tokenizer.streaming_pad
    d = Decoded(tokens=[pad, pad, 1234], pad_margins=[3.5, 9.0, -1.0], best_other=[1500, 1600, 1234],
                logprobs=[-0.05, -0.001, -0.4])
    s = demo.stream(rut=RutPolicy(after=10, speech_after=None))
    assert [s.choose(d, i) for i in range(3)] == [pad, pad, 1234]  # no run yet: greedy
    for p in range(24):
        s.rut.accepted(pad, p, broke=False)
    assert s.pad_penalty == 7.0  # 14 pads past the threshold: the cap
    assert [s.choose(d, i) for i in range(3)] == [1500, pad, 1234]  # a rut's +3.5 breaks, silence's +9 not


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_a_token_the_penalty_chose_has_the_models_own_probability_not_the_penalised_one(demo, speech, monkeypatch):
    """The demo model's pad never wins; +20 on its logit (in the runtime's logits, so decode and the
    teacher-forced reference both see it) makes it win at most positions, by margins on both sides of
    a penalty of 7 from the first pad of a run on. Every token's probability is the model's
    softmax of those logits at it: pads kept, text greedy, and the best others the penalty chose
    (whose probability comes from the pad's and the margin, not from a second softmax)."""
    from voxlive.session import Stream
    from voxlive_bench.reference import offline_padded_audio

    rt, pad = demo.runtime, demo.tokenizer.streaming_pad
    real = rt._logits

    def stronger_pad(hidden):
        logits = real(hidden).clone()
        logits[:, pad] += 20.0
        return logits

    monkeypatch.setattr(rt, "_logits", stronger_pad)
    s = Stream(rt, demo.tokenizer, demo.config)  # not a fork of the model's fresh stream: that ran unbiased
    s.use_rut(RutPolicy(after=0, speech_after=None, slope=7.0, cap=7.0))
    s.feed(speech)
    t = s.finish()
    mel = voxlive.log_mel(offline_padded_audio(speech, s.delay_tokens, demo.config.audio))
    ids = s.prompt + t.tokens[:-1]
    logits = demo.logits(ids, demo.embed_audio(mel), delay_ms=s.delay_ms)[len(s.prompt) - 1:]
    reference = _log_softmax(logits)
    rows, tokens = np.arange(len(t.tokens)), np.array(t.tokens)
    broken = logits.argmax(-1) != tokens
    assert broken.sum() == s.ruts >= 3 and (tokens == pad).sum() >= 3 and ((tokens != pad) & ~broken).sum() >= 3
    ours = np.log(np.asarray(s.probabilities, dtype=np.float64))
    np.testing.assert_allclose(ours, reference[rows, tokens], atol=1e-4)
    penalised = logits.copy()
    penalised[:, pad] -= 7.0
    assert (np.abs(ours - _log_softmax(penalised)[rows, tokens])[broken] > 0.1).all()  # the test tells them apart


@pytest.mark.parametrize("margin", [5.0, -2.0])
def test_forced_pad_log_probabilities_are_those_of_the_biased_logits(demo, margin):
    from voxlive.testing import ForcedPad

    rt, pad = demo.runtime, demo.tokenizer.streaming_pad
    rng = np.random.default_rng(0)
    embeds = (30 * rng.standard_normal((12, demo.config.decoder.dim))).astype(np.float32)
    tokens = [int(t) for t in rng.integers(1000, demo.config.decoder.vocab_size, 12)]
    a, b = rt.new_state(6), rt.new_state(6)
    rt.add_embeddings(a, embeds)
    rt.add_embeddings(b, embeds)
    logits = rt.logits(a, tokens).astype(np.float64)
    others = np.delete(logits, pad, axis=1).max(-1)
    logits[:, pad] = others + margin  # the bias that gives the pad exactly this margin
    d = ForcedPad(rt, range(0, 10**6), margin).decode([b], [tokens])[0]
    assert d.tokens == logits.argmax(-1).tolist()
    np.testing.assert_allclose(d.logprobs, _log_softmax(logits)[np.arange(12), d.tokens], atol=1e-4)


def test_the_speech_track_keeps_only_the_frames_still_to_be_asked_about():
    from voxlive.rut import SpeechTrack

    track = SpeechTrack(1280, 0.5)
    probs = np.zeros(31 * 3600, dtype=np.float32)  # an hour of 32 ms frames
    probs[5] = 0.9  # samples 2560..3072: input token 2 (2560..3840)
    track.add(probs)
    assert [track.speech(j) for j in range(4)] == [False, False, True, False]
    track.forget_before(44_000)  # the stream has accepted the position about token 44,000
    assert len(track._probs) == 31 * 3600 - 44_000 * 1280 // 512 and not track.speech(44_000)
