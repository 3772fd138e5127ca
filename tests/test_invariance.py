"""One recording gives one transcript however it arrives, in bfloat16 (the default precision).

In float32 streaming equals offline (test_streaming.py). In bfloat16 it holds only if each stream's
numbers do not depend on how many frames, positions or streams a call holds: by default
(VOXLIVE_BATCH_INVARIANT) every product and attention row is computed on its own in a fixed order
(voxlive's CPU kernels with AMX), so these tests compare tokens exactly. Without AMX the stock GEMM
blocks rows by the call's size, and they skip. At the tiny model's sizes the previous paths (oneDNN,
the pool's batched attention) happen to pass them too: oneDNN's rows vary with M from inputs of ~1280
on (test_cpu_kernels.py shows it), which only a full-size model has; these guard the model's paths.
"""

from __future__ import annotations

import numpy as np
import pytest

import voxlive
from voxlive.backends.torch import cpu_kernels
from voxlive.session import decode_available

from test_streaming import _random_chunks, _stream_tokens

pytestmark = pytest.mark.skipif(not cpu_kernels.amx_available(),
                                reason=f"needs the AMX kernels ({cpu_kernels.unavailable_reason() or 'no AMX here'})")


@pytest.fixture(scope="module", autouse=True)
def batch_invariant():
    """As by default (VOXLIVE_BATCH_INVARIANT unset or 1), whatever the environment of the test run."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cpu_kernels, "_batch_invariant", True)
        yield


@pytest.fixture(scope="module")
def bf16_model(varied_dir, batch_invariant):
    return voxlive.load(varied_dir, dtype="bfloat16", device="cpu")


@pytest.fixture(scope="module")
def offline(bf16_model, speech):
    return {delay: bf16_model.transcribe(speech, delay_ms=delay) for delay in (480, 160)}


def test_bf16_tokens_depend_on_the_audio(bf16_model, offline, speech):
    # Otherwise the equalities below would compare constant sequences.
    tokens = offline[480].tokens
    assert len(set(tokens)) >= 5
    assert bf16_model.transcribe(np.zeros_like(speech)).tokens != tokens


@pytest.mark.parametrize("seed", range(4))
def test_bf16_stream_in_random_chunks_equals_transcribe(bf16_model, offline, speech, seed):
    delay = (480, 160)[seed % 2]
    rng = np.random.default_rng(100 + seed)
    streamed, _ = _stream_tokens(bf16_model, speech, _random_chunks(rng, len(speech)), delay)
    assert streamed.tokens == offline[delay].tokens


def test_bf16_stream_in_80ms_chunks_equals_transcribe(bf16_model, offline, speech):
    streamed, _ = _stream_tokens(bf16_model, speech, [1280] * (len(speech) // 1280), 480)
    assert streamed.tokens == offline[480].tokens


def test_bf16_batched_streams_equal_transcribe(bf16_model, offline, speech):
    """Streams sharing encoder passes and decode steps with others, each fed its own chunk sizes."""
    audios = [speech, speech[::-1].copy(), 0.5 * speech, speech[: len(speech) // 3]]
    delays = [480, 480, 160, 480]
    expected = [offline[480].tokens] + [bf16_model.transcribe(a, delay_ms=d).tokens
                                        for a, d in zip(audios[1:], delays[1:])]
    streams = [bf16_model.stream(delay_ms=d) for d in delays]
    steps = [2900, 700, 5100, 1280]
    for i in range(max(-(-len(a) // step) for a, step in zip(audios, steps))):
        for s, a, step in zip(streams, audios, steps):
            s.push(a[i * step:(i + 1) * step])
        decode_available(streams)
    for s, exp in zip(streams, expected):
        assert s.finish().tokens == exp


def _embeddings(model, mel, tokens_per_call):
    """Audio embeddings of one stream whose mel frames go to the encoder ``tokens_per_call[i]`` tokens at a time."""
    rt = model.runtime
    state = rt.new_state(model.config.delay_tokens(None))
    try:
        start = 0
        for n in tokens_per_call:
            rt.encode(state, mel[:, start:start + 8 * n])
            start += 8 * n
        return rt.take_embeddings(state)
    finally:
        rt.release(state)


def test_bf16_audio_embeddings_are_the_same_bits_in_any_chunking(bf16_model, speech):
    """Stronger than equal tokens (which a random model's margins can hide): the encoder's output,
    bit for bit, whole or in chunks of 1 to 40 tokens (across its 24-frame window)."""
    mel = voxlive.log_mel(speech)
    tokens = mel.shape[1] // 8
    whole = _embeddings(bf16_model, mel, [tokens])
    rng = np.random.default_rng(5)
    cuts = sorted(set(int(c) for c in rng.integers(1, tokens, 12)))
    for chunks in ([1] * tokens, [b - a for a, b in zip([0] + cuts, cuts + [tokens])]):
        assert np.array_equal(_embeddings(bf16_model, mel, chunks), whole)
