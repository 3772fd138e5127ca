"""Tests of the transformers reference adapter (voxlive_bench.reference), independent of the voxlive engine.

They prove the adapter itself right: every native tensor lands in exactly one transformers parameter
with the right values, the q/k permutation preserves attention scores of Mistral's interleaved RoPE,
and transformers' generate agrees with the single-forward teacher-forced logits.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers.models.voxtral_realtime")

from voxlive_bench import reference as R  # noqa: E402
from voxlive.checkpoint import expected_native_tensors, open_checkpoint  # noqa: E402
from voxlive.testing import write_random_checkpoint  # noqa: E402

from transformers.models.voxtral_realtime import modeling_voxtral_realtime as hfm  # noqa: E402

NUM_DELAY = 6
SR = 16000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from intra-op threads, and on a shared, busy machine they oversubscribe
    # the cores (5x slower); restored afterwards so other test modules are unaffected.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # adapter_scale makes the audio, not the tied embedding, decide the greedy tokens.
    path = write_random_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", seed=3, dtype="float32", adapter_scale=10.0)
    return open_checkpoint(path)


@pytest.fixture(scope="module")
def model(ckpt):
    return R.load_reference(ckpt.directory)


@pytest.fixture(scope="module")
def inputs(ckpt):
    """~2 s of a chirp plus noise, offline-padded; its mel and the offline prompt."""
    rng = np.random.default_rng(7)
    t = np.arange(2 * SR) / SR
    audio = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    padded = R.offline_padded_audio(audio, NUM_DELAY, ckpt.config.audio)
    mel = R.reference_log_mel(padded, ckpt.config)
    prompt = R.offline_prompt_ids(ckpt.tokenizer_path, NUM_DELAY)
    return padded, mel, prompt


# ----------------------------------------------------------------------------------------------------
# helpers written here, independently of voxlive_bench.reference
# ----------------------------------------------------------------------------------------------------


def interleaved_to_half_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row index map: new row (h, j) takes old row h*hd + 2j (j < hd/2) or h*hd + 2(j - hd/2) + 1."""
    half = head_dim // 2
    idx = []
    for h in range(n_heads):
        for j in range(head_dim):
            idx.append(h * head_dim + (2 * j if j < half else 2 * (j - half) + 1))
    return torch.tensor(idx)


def interleaved_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, H, hd]; pairs (x[2i], x[2i+1]) rotated by angle pos * theta^(-2i/hd), in float64."""
    hd = x.shape[-1]
    i = torch.arange(hd // 2, dtype=torch.float64)
    ang = pos.double()[:, None] * theta ** (-2 * i / hd)  # [T, hd/2]
    c, s = ang.cos()[:, None, :], ang.sin()[:, None, :]
    x = x.double()
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out


def native(ckpt, name: str) -> torch.Tensor:
    return torch.from_numpy(ckpt.weights.read(name))  # the tiny checkpoint is float32


# ----------------------------------------------------------------------------------------------------
# (1) conversion coverage and values
# ----------------------------------------------------------------------------------------------------


def test_conversion_covers_every_tensor_once_and_sets_every_parameter(ckpt, model):
    cfg = ckpt.config
    names = list(expected_native_tensors(cfg))
    assert set(names) == set(ckpt.weights.tensors)
    mapping = {n: R.native_to_hf_name(n) for n in names}
    assert len(set(mapping.values())) == len(names), "two native tensors map to one transformers key"

    hf_keys = set(model.state_dict())
    assert hf_keys == set(mapping.values()) | {"lm_head.weight"}
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert all_params == hf_keys

    # A plain (random-init) model accepts the converted dict with nothing missing or unexpected.
    converted = R.convert_weights(ckpt)
    assert set(converted) == hf_keys
    assert converted["lm_head.weight"] is converted["model.language_model.embed_tokens.weight"]
    fresh = hfm.VoxtralRealtimeForConditionalGeneration(R.hf_config(cfg))
    res = fresh.load_state_dict(converted, strict=False)
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == []

    # Every loaded parameter equals its native source (q/k rows re-ordered by this test's own map).
    e, d = cfg.encoder, cfg.decoder
    for n, key in mapping.items():
        want = native(ckpt, n)
        enc = "whisper_encoder." in n
        if ".attention.wq." in n:
            want = want[interleaved_to_half_rows(e.n_heads if enc else d.n_heads, e.head_dim if enc else d.head_dim)]
        elif ".attention.wk." in n:
            want = want[interleaved_to_half_rows(e.n_heads if enc else d.n_kv_heads, e.head_dim if enc else d.head_dim)]
        got = model.get_parameter(key)
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, want), f"{n} -> {key}"
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, native(ckpt, "mm_streams_embeddings.embedding_module.tok_embeddings.weight"))

    # The non-persistent buffers recomputed after meta init equal those of a normally built model.
    fresh_bufs = dict(fresh.named_buffers())
    bufs = dict(model.named_buffers())
    assert set(bufs) == set(fresh_bufs) and len(bufs) == 5
    for k, v in bufs.items():
        assert v.dtype == torch.float32 and torch.equal(v, fresh_bufs[k]), k
    assert not model.training
    assert model.config._attn_implementation == "eager"
    assert model.model.language_model.config._attn_implementation == "eager"
    assert model.model.audio_tower.config._attn_implementation == "eager"


def test_hf_config_fields(ckpt):
    cfg = ckpt.config
    c = R.hf_config(cfg)
    t, a = c.text_config, c.audio_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
            t.intermediate_size, t.vocab_size, t.sliding_window) == (
        cfg.decoder.dim, cfg.decoder.n_layers, cfg.decoder.n_heads, cfg.decoder.n_kv_heads, cfg.decoder.head_dim,
        cfg.decoder.hidden_dim, cfg.decoder.vocab_size, cfg.decoder.sliding_window)
    assert (a.hidden_size, a.num_hidden_layers, a.num_attention_heads, a.head_dim, a.intermediate_size,
            a.sliding_window, a.num_mel_bins) == (
        cfg.encoder.dim, cfg.encoder.n_layers, cfg.encoder.n_heads, cfg.encoder.head_dim, cfg.encoder.hidden_dim,
        cfg.encoder.sliding_window, cfg.encoder.n_mels)
    assert t.rope_parameters["rope_theta"] == cfg.decoder.rope_theta
    assert a.rope_parameters["rope_theta"] == cfg.encoder.rope_theta
    assert t.rms_norm_eps == cfg.decoder.norm_eps and a.rms_norm_eps == cfg.encoder.norm_eps
    assert c.default_num_delay_tokens == 6 and c.downsample_factor == 4 and c.audio_length_per_tok == 8
    assert c.tie_word_embeddings and t.tie_word_embeddings


# ----------------------------------------------------------------------------------------------------
# (2) RoPE permutation: interleaved RoPE on native weights == transformers' path on permuted weights
# ----------------------------------------------------------------------------------------------------


def _captured_qk(monkeypatch, attn, x, pos, rotary):
    """Run the transformers attention module and capture the q/k it hands to the attention kernel."""
    seen = {}
    orig = hfm.eager_attention_forward

    def capture(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        seen["q"], seen["k"] = query.detach().clone(), key.detach().clone()
        return orig(module, query, key, value, attention_mask, scaling, dropout=dropout, **kw)

    monkeypatch.setattr(hfm, "eager_attention_forward", capture)
    with torch.no_grad():
        cos_sin = rotary(x[None], pos[None])
        attn(hidden_states=x[None], position_embeddings=cos_sin, attention_mask=None)
    monkeypatch.undo()
    return seen["q"][0], seen["k"][0]  # [H, T, hd], [Hkv, T, hd]


@pytest.mark.parametrize("part", ["decoder", "encoder"])
def test_rope_permutation_preserves_attention_scores(ckpt, model, monkeypatch, part):
    cfg = ckpt.config
    g = torch.Generator().manual_seed(11)
    T = 12
    # Positions up to 144: far beyond one turn of the fastest pair, yet small enough that float32 rounding
    # of the angle itself (transformers computes pos * inv_freq in float32; at pos 4097 one ulp is 5e-4 rad)
    # stays below the 1e-5 tolerance. That rounding has nothing to do with the permutation under test.
    pos = torch.tensor([0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144])
    if part == "decoder":
        c, layer = cfg.decoder, 1
        prefix = f"layers.{layer}.attention."
        attn = model.model.language_model.layers[layer].self_attn
        rotary = model.model.language_model.rotary_emb
        n_kv, bq = c.n_kv_heads, None
    else:
        c, layer = cfg.encoder, 1
        prefix = f"mm_streams_embeddings.embedding_module.whisper_encoder.transformer.layers.{layer}.attention."
        attn = model.model.audio_tower.layers[layer].self_attn
        rotary = model.model.audio_tower.rotary_emb
        n_kv, bq = c.n_heads, native(ckpt, prefix + "wq.bias")
    x = torch.randn(T, c.dim, generator=g)

    # Reference: native (unpermuted) weights, hand-written interleaved RoPE, float64.
    wq, wk = native(ckpt, prefix + "wq.weight").double(), native(ckpt, prefix + "wk.weight").double()
    q = x.double() @ wq.T + (bq.double() if bq is not None else 0)
    k = x.double() @ wk.T
    q = interleaved_rope(q.view(T, c.n_heads, c.head_dim), pos, c.rope_theta)
    k = interleaved_rope(k.view(T, n_kv, c.head_dim), pos, c.rope_theta)
    group = c.n_heads // n_kv
    want = torch.einsum("thd,shd->hts", q, k.repeat_interleave(group, dim=1))

    hq, hk = _captured_qk(monkeypatch, attn, x, pos, rotary)
    got = torch.einsum("htd,hsd->hts", hq.double(), hk.repeat_interleave(group, dim=0).double())
    assert want.abs().max() > 1.0  # non-trivial scores
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # ...while the per-dim q values really are in a different order (the test would catch a missing permute).
    assert not torch.allclose(hq.transpose(0, 1).double(), q, atol=1e-3)


def test_rotate_half_order_matches_index_map():
    t = torch.arange(3 * 8 * 2).reshape(3 * 8, 2)
    torch.testing.assert_close(R.rotate_half_order(t, 3), t[interleaved_to_half_rows(3, 8)])
    b = torch.arange(24.0)
    torch.testing.assert_close(R.rotate_half_order(b, 2), b[interleaved_to_half_rows(2, 12)])


# ----------------------------------------------------------------------------------------------------
# (3), (4) generate and teacher-forced logits
# ----------------------------------------------------------------------------------------------------


def test_inputs_shapes(ckpt, inputs):
    padded, mel, prompt = inputs
    spt = ckpt.config.audio.samples_per_token
    assert padded.size == 32 * spt + 25 * spt + (NUM_DELAY + 1 + 10) * spt  # 2 s = 25 tokens exactly
    assert mel.shape == (128, padded.size // 160) and mel.dtype == np.float32
    assert np.all(mel[:, :100] == np.float32(-0.625))  # digital silence of the left pad
    assert prompt == [1] + [32] * (32 + NUM_DELAY)


def test_audio_embeds_shape_and_causality(ckpt, model, inputs):
    _, mel, _ = inputs
    emb = R.reference_audio_embeds(model, mel)
    assert emb.shape == (mel.shape[1] // 8, ckpt.config.decoder.dim) and emb.dtype == np.float32
    # The encoder is causal: a mel prefix gives the prefix of the embeddings (this is what lets
    # reference_logits feed only the first 4*len(tokens) conv frames).
    part = R.reference_audio_embeds(model, mel[:, : 8 * 30])
    np.testing.assert_allclose(part, emb[:30], atol=1e-5 * float(np.abs(emb).max()), rtol=0)
    with pytest.raises(ValueError):
        R.reference_audio_embeds(model, mel[:, :13])


def test_generate_yields_one_token_per_audio_token_after_the_prompt(model, inputs):
    _, mel, prompt = inputs
    n_audio = mel.shape[1] // 8
    out = R.reference_generate(model, mel, prompt, NUM_DELAY)
    assert len(out) == n_audio - len(prompt)  # the last audio position is never run
    assert all(isinstance(t, int) for t in out)
    assert len(set(out)) > 1  # the audio, not the embedding alone, decides the tokens


def test_logits_argmax_matches_generate(model, inputs):
    _, mel, prompt = inputs
    out = R.reference_generate(model, mel, prompt, NUM_DELAY)
    lg = R.reference_logits(model, prompt, mel, NUM_DELAY)
    assert lg.shape == (len(prompt), model.config.text_config.vocab_size) and lg.dtype == np.float32
    assert int(lg[-1].argmax()) == out[0]
    # Teacher forcing with the generated tokens reproduces every later greedy choice too.
    full = R.reference_logits(model, prompt + out[:-1], mel, NUM_DELAY)
    assert full[len(prompt) - 1:].argmax(-1).tolist() == out
    np.testing.assert_allclose(full[: len(prompt)], lg, atol=1e-4, rtol=0)
    with pytest.raises(ValueError):
        R.reference_logits(model, [1] * (mel.shape[1] // 8 + 1), mel, NUM_DELAY)


def test_generate_does_not_stop_at_eos_unless_asked(model, inputs):
    _, mel, prompt = inputs
    eos = model.generation_config.eos_token_id
    assert eos == 2  # transformers' default generation config stops at </s>

    def force_eos(_module, _inp, logits):
        logits = logits.clone()
        logits[..., eos] += 1e4
        return logits

    h = model.lm_head.register_forward_hook(force_eos)
    try:
        through = R.reference_generate(model, mel, prompt, NUM_DELAY)
        stopped = R.reference_generate(model, mel, prompt, NUM_DELAY, stop_at_eos=True)
    finally:
        h.remove()
    assert through == [eos] * (mel.shape[1] // 8 - len(prompt))
    assert stopped == [eos]
    assert model.generation_config.eos_token_id == eos  # restored


def test_import_does_not_need_transformers():
    code = "import sys, voxlive_bench.reference; assert 'transformers' not in sys.modules, 'imported eagerly'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_bf16_checkpoint_converts_bit_exactly(tmp_path, ckpt, inputs):
    # Same seed, bf16 on disk: every converted tensor is the float32 checkpoint's value rounded to bf16.
    path = write_random_checkpoint(tmp_path, "tiny", seed=3, dtype="bfloat16", adapter_scale=10.0)
    bf = open_checkpoint(path)
    got = R.convert_weights(bf, torch.float32)
    ref = R.convert_weights(ckpt, torch.float32)
    assert set(got) == set(ref)
    for k, v in got.items():
        assert v.dtype == torch.float32 and torch.equal(v, ref[k].bfloat16().float()), k
    # A bf16 reference model runs end to end (time embedding in bf16, RoPE/time inv_freq buffers float32).
    model = R.load_reference(bf, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.model.time_embedding.inv_freq.dtype == torch.float32
    _, mel, prompt = inputs
    assert len(R.reference_generate(model, mel, prompt, NUM_DELAY)) == mel.shape[1] // 8 - len(prompt)


def test_full_size_names_and_shapes_on_meta():
    # The real model's sizes: every native tensor maps to a transformers parameter of the same shape,
    # and every parameter is covered (no weights read: the model is built on the meta device).
    from voxlive.config import parse_config
    from voxlive.testing import AUDIO_SECTION, make_params

    cfg = parse_config(make_params("full"), AUDIO_SECTION)
    with torch.device("meta"):
        model = hfm.VoxtralRealtimeForConditionalGeneration(R.hf_config(cfg))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    native_shapes = expected_native_tensors(cfg)
    assert len(native_shapes) == 711
    mapped = {R.native_to_hf_name(n): s for n, s in native_shapes.items()}
    assert set(shapes) == set(mapped) | {"lm_head.weight"}
    for k, s in mapped.items():
        assert shapes[k] == s, k
    assert shapes["lm_head.weight"] == (131072, 3072)
    assert sum(p.numel() for p in model.parameters()) == sum(int(np.prod(s)) for s in native_shapes.values())
