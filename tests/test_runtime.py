"""The runtime contract, on both backends: the same signatures, the KV slot pool (rewind, reuse,
capacity), multi-token decode results, exact positions far from 0, int8 KV caches."""

from __future__ import annotations

import importlib.util
import inspect

import numpy as np
import pytest

import voxlive
from voxlive.backends.runtime import BaseRuntime, Runtime
from voxlive.session import decode_available

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(importlib.util.find_spec("mlx") is None,
                                                                   reason="MLX is not installed"))]


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, varied_dir):
    return voxlive.load(varied_dir, backend=request.param, dtype="float32", device="cpu")


def _contract_methods():
    return [name for name, value in vars(Runtime).items() if callable(value) and not name.startswith("_")]


def test_both_runtimes_expose_the_contracts_signatures():
    pytest.importorskip("mlx.core")
    from voxlive.backends.mlx.runtime import MLXRuntime
    from voxlive.backends.torch.runtime import TorchRuntime

    methods = _contract_methods()
    assert {"new_state", "clone_state", "release", "encode_batch", "decode", "rewind", "logits"} <= set(methods)
    for name in methods:
        expected = inspect.signature(getattr(Runtime, name))
        for cls in (TorchRuntime, MLXRuntime):
            assert inspect.signature(getattr(cls, name)) == expected, (cls.__name__, name)
    public = {n for cls in (TorchRuntime, MLXRuntime) for n in vars(cls) if not n.startswith("_")}
    # nothing public beyond the contract (and the constructor's parameters are the same but compile)
    assert public <= set(methods) | {"backend"}
    torch_init = inspect.signature(TorchRuntime.__init__).parameters
    mlx_init = inspect.signature(MLXRuntime.__init__).parameters
    assert [p for p in torch_init if p != "compile"] == list(mlx_init)


def test_runtime_attributes(model):
    rt = model.runtime
    assert isinstance(rt, BaseRuntime)
    for name in inspect.get_annotations(Runtime):
        assert hasattr(rt, name), name
    assert rt.quantize is None and rt.kv_dtype == "float32" and rt.pad_id == model.tokenizer.streaming_pad


def _embeds(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return (30 * rng.standard_normal((n, model.config.decoder.dim))).astype(np.float32)


def _tokens(model, n, seed=0):
    rng = np.random.default_rng(seed + 100)
    return [int(t) for t in rng.integers(1000, model.config.decoder.vocab_size, n)]


def _run(rt, state, tokens, step=1):
    """Feed tokens in decode calls of ``step`` positions; return the greedy tokens."""
    out = []
    for i in range(0, len(tokens), step):
        out += rt.decode([state], [tokens[i:i + step]])[0].tokens
    return out


@pytest.mark.parametrize("before", [5, 60])  # inside the first window; past the ring's wrap (capacity 48)
def test_rewind_restores_exactly_the_state_of_never_having_run_the_rejected_positions(model, before):
    rt = model.runtime
    n = before + 12
    embeds, tokens = _embeds(model, n + 6), _tokens(model, n + 6)
    plain = rt.new_state(6)
    rt.add_embeddings(plain, embeds)
    _run(rt, plain, tokens[:before])
    right, wrong = rt.clone_state(plain), rt.clone_state(plain)
    # never drafted: one position, then teacher forcing
    rt.decode([plain], [tokens[before:before + 1]])
    expected = rt.logits(plain, tokens[before + 1:n])
    # a step of 1 + max_draft tokens, the drafts right or wrong, and all of them rewound
    for state, drafts in ((right, tokens[before + 1:before + 1 + rt.max_draft]),
                          (wrong, _tokens(model, rt.max_draft, seed=7))):
        out = rt.decode([state], [tokens[before:before + 1] + drafts])[0]
        assert len(out.tokens) == rt.max_draft + 1
        rt.rewind(state, rt.max_draft)
        assert rt.position(state) == before + 1
    after_right, after_wrong = rt.logits(right, tokens[before + 1:n]), rt.logits(wrong, tokens[before + 1:n])
    # bit for bit whatever the rejected positions held (they are masked, never attended) ...
    assert np.array_equal(after_right, after_wrong)
    # ... and what a stream that never drafted gives, up to the rounding of a 9-row pass against a 1-row one
    assert np.abs(after_right - expected).max() <= 1e-5 * np.abs(expected).max()


def test_rewind_bounds(model):
    rt = model.runtime
    s = rt.new_state(6)
    rt.add_embeddings(s, _embeds(model, 12))
    rt.decode([s], [_tokens(model, 3)])
    with pytest.raises(ValueError, match="cannot undo 4"):
        rt.rewind(s, 4)
    rt.rewind(s, 3)
    assert rt.position(s) == 0 and sum(a.shape[0] for a in s.pending) == 12  # the embeddings are back
    rt.decode([s], [_tokens(model, rt.max_draft + 2)])
    with pytest.raises(ValueError, match="at most max_draft"):
        rt.rewind(s, rt.max_draft + 2)


def _steps(rt, state, tokens, step):
    """Feed tokens in decode calls of ``step`` positions (read from the pool); all results."""
    out = []
    for i in range(0, len(tokens), step):
        d = rt.decode([state], [tokens[i:i + step]])[0]
        out += list(zip(d.tokens, d.pad_margins, d.best_other))
    return out


def test_a_freed_slot_is_reused_and_keeps_nothing_of_its_last_stream(model):
    rt = model.runtime
    embeds, tokens = _embeds(model, 50), _tokens(model, 50)
    fresh = rt.new_state(6)
    rt.add_embeddings(fresh, embeds)
    expected = _steps(rt, fresh, tokens, 3)
    used = rt.new_state(6)
    rt.add_embeddings(used, _embeds(model, 70, seed=3))
    _run(rt, used, _tokens(model, 70, seed=3), step=5)
    slot, slots = used.decoder_slot, rt.decoder_pool.slots
    rt.release(used)
    reused = rt.new_state(6)
    assert reused.decoder_slot == slot and rt.decoder_pool.slots == slots
    rt.add_embeddings(reused, embeds)
    assert _steps(rt, reused, tokens, 3) == expected  # bit for bit, margins included
    del reused
    assert rt.new_state(6).decoder_slot == slot  # dropping a state frees its slots too


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Written here, in float64: the reference for the runtime's float32 log-probabilities."""
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def test_decode_returns_greedy_token_pad_margin_best_other_and_log_probability_per_position(model):
    rt = model.runtime
    embeds, tokens = _embeds(model, 30), [model.tokenizer.streaming_pad] * 15 + _tokens(model, 15)
    a, b = rt.new_state(6), rt.new_state(6)
    rt.add_embeddings(a, embeds)
    rt.add_embeddings(b, embeds)
    logits = rt.logits(a, tokens)
    # streams feeding different counts in one call: 4, then 1 and 3 at once, ...
    feeds = [tokens[:4], tokens[4:5], tokens[5:8], tokens[8:30]]
    got = [d for f in feeds for d in [rt.decode([b], [f])[0]]]
    tokens_out = [t for d in got for t in d.tokens]
    margins = np.array([m for d in got for m in d.pad_margins])
    others = [t for d in got for t in d.best_other]
    pad = rt.pad_id
    without_pad = logits.copy()
    without_pad[:, pad] = -np.inf
    assert tokens_out == logits.argmax(-1).tolist()
    assert others == without_pad.argmax(-1).tolist()
    np.testing.assert_allclose(margins, logits[:, pad] - without_pad.max(-1), rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    # the greedy token's log-probability of the full logits (a pad's best other: tests/test_rut.py)
    reference = _log_softmax(logits)
    rows = np.arange(len(tokens))
    logprobs = np.array([p for d in got for p in d.logprobs])
    np.testing.assert_allclose(logprobs, reference[rows, tokens_out], rtol=1e-4, atol=1e-5)
    assert logprobs.max() <= 0 and np.exp(logprobs).min() >= 1 / model.config.decoder.vocab_size
    probability = [d.probability(i, t) for d in got for i, t in enumerate(d.best_other)]
    np.testing.assert_allclose(probability, np.exp(reference[rows, others]), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="not"):
        got[0].probability(0, next(t for t in range(100, 200) if t not in (got[0].tokens[0], got[0].best_other[0])))


def test_batched_streams_feeding_different_counts_equal_one_by_one(model):
    rt = model.runtime
    streams = [(rt.new_state(6), _embeds(model, 40, seed=s), _tokens(model, 40, seed=s)) for s in range(3)]
    expected = []
    for _, e, t in streams:
        alone = rt.new_state(6)
        rt.add_embeddings(alone, e)
        expected.append(rt.logits(alone, t).argmax(-1).tolist())
    for s, e, _ in streams:
        rt.add_embeddings(s, e)
    done, got = [0, 0, 0], [[], [], []]
    counts = [[1, 3, 9, 2, 25], [7, 7, 7, 7, 12], [40]]
    for step in range(5):
        batch = [b for b in range(3) if step < len(counts[b])]
        out = rt.decode([streams[b][0] for b in batch],
                        [streams[b][2][done[b]:done[b] + counts[b][step]] for b in batch])
        for b, d in zip(batch, out):
            got[b] += d.tokens
            done[b] += counts[b][step]
    assert got == expected


def _far(model, offset):
    """Decoder logits and encoder embeddings of the same content at positions from ``offset``."""
    rt = model.runtime
    s = rt.new_state(6, position=offset)
    rt.add_embeddings(s, _embeds(model, 60))
    logits = rt.logits(s, _tokens(model, 60))
    e = rt.new_state(6, position=offset)
    rng = np.random.default_rng(5)
    rt.encode(e, rng.standard_normal((model.config.audio.n_mels, 8 * 12)).astype(np.float32))
    return logits, rt.take_embeddings(e)


def test_positions_are_exact_far_from_zero(model):
    (l0, e0), (l100, e100), (lfar, efar) = (_far(model, o) for o in (0, 100, 10**7))
    near = np.abs(l100 - l0).max(), np.abs(e100 - e0).max()
    far = np.abs(lfar - l0).max(), np.abs(efar - e0).max()
    # only rounding differs: 10^7 positions away as close as 100 away (float32 angles: ~1 rad off)
    assert far[0] <= 2 * near[0] + 1e-5 * np.abs(l0).max()
    assert far[1] <= 2 * near[1] + 1e-5 * np.abs(e0).max()


def test_streams_far_from_zero_batch_with_streams_at_zero(model):
    rt = model.runtime
    embeds, tokens = _embeds(model, 20), _tokens(model, 20)
    states = [rt.new_state(6, position=p) for p in (0, 10**7, 3)]
    for s in states:
        rt.add_embeddings(s, embeds)
    got = [[] for _ in states]
    for i in range(0, 20, 4):
        for g, d in zip(got, rt.decode(states, [tokens[i:i + 4]] * 3)):
            g += d.tokens
    assert got[0] == got[1] == got[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_kv_cache_is_close_to_the_float_cache(varied_dir, speech, backend):
    base = voxlive.load(varied_dir, backend=backend, dtype="float32", device="cpu")
    q = voxlive.load(varied_dir, backend=backend, dtype="float32", device="cpu", kv_dtype="int8")
    assert q.runtime.kv_dtype == "int8"
    ref = base.transcribe(speech)
    got = q.transcribe(speech)
    c = base.config
    assert len(ref.tokens) + 38 > 2 * c.decoder.sliding_window  # past the window
    agree = np.mean(np.array(ref.tokens) == np.array(got.tokens))
    embeds = _embeds(base, 100)
    ids = _tokens(base, 100)
    a, b = base.logits(ids, embeds), q.logits(ids, embeds)
    err = np.abs(a - b).max() / np.abs(a).max()
    # measured 88 % and 2.0e-4 on both backends; a random model's greedy tokens feed back, so one
    # near-tie that flips changes what follows (int8 weights are held to 75 % in test_quant)
    print(f"int8 KV vs float32 KV: greedy tokens {agree:.1%} equal, teacher-forced logits max error {err:.2e} of the logit scale")
    assert agree >= 0.75
    assert 0 < err < 2e-3


def test_bad_options_are_refused(varied_dir):
    with pytest.raises(ValueError, match="kv_dtype must be"):
        voxlive.load(varied_dir, device="cpu", kv_dtype="int4")
    with pytest.raises(ValueError, match="max_draft must be"):
        voxlive.load(varied_dir, device="cpu", max_draft=-1)


def test_drafted_tokens_right_or_wrong_give_the_offline_tokens(model, speech, monkeypatch):
    expected = model.transcribe(speech).tokens
    fed = []
    real = model.runtime.decode

    def spy(states, feeds, **options):
        if "outputs" not in options:  # a decode step, not prompt positions
            fed.extend(len(f) for f in feeds)
        return real(states, feeds, **options)

    monkeypatch.setattr(model.runtime, "decode", spy)
    results = []
    for drafting in ("right", "wrong"):
        s = model.stream()
        propose = type(s)._step_feed

        def step_feed(self=s, drafting=drafting):
            n = len(self.tokens)
            drafts = expected[n:n + 4] if drafting == "right" else [t + 1 for t in expected[n:n + 4]]
            self.propose(drafts)
            return propose(self)

        s._step_feed = step_feed
        for start in range(0, len(speech), 8000):
            s.push(speech[start:start + 8000])
            decode_available([s])
        results.append(s.finish().tokens)
    assert results == [expected, expected]
    assert max(fed) == 5  # the last token and 4 drafts in one step


def _resident(t) -> int:
    """Bytes of a CPU tensor's memory that are resident (present bits of /proc/self/pagemap)."""
    page = 4096
    first, last = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(8 * first)
        entries = np.frombuffer(f.read(8 * (last - first + 1)), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/pagemap")
def test_untouched_pool_pages_stay_out_of_rss():
    import torch

    from voxlive.backends.torch.pool import KVPool

    layers, heads, window, d, slots = 2, 8, 8192, 128, 8
    pool = KVPool(layers, heads, window, d, extra=8, dtype=torch.bfloat16, device=torch.device("cpu"), slots=slots)
    size = sum(a.numel() * a.element_size() for a in pool.arrays())
    assert size > 500e6
    slot = pool.acquire()
    rng = torch.Generator().manual_seed(0)

    def feed(n):
        step = pool.begin([slot], [n])
        for layer in range(layers):
            q, k, v = (torch.randn(n, heads, d, generator=rng).to(torch.bfloat16) for _ in range(3))
            pool.attend(layer, step, q, k, v)
        pool.commit(step.plan)

    def resident():
        return sum(_resident(a) for a in pool.arrays())

    feed(1)
    # one position written: its block of 256 indices in each layer (the first read zeroes it)
    block = 2 * layers * heads * 256 * d * 2
    assert resident() <= block + 2 * layers * heads * 4096  # (+ a page at the edge of each head)
    for _ in range(window // 256):
        feed(256)
    # a full window: one slot's share of the pool, not the pool
    assert size // slots * 0.95 < resident() <= size // slots + 2 * layers * heads * 4096
