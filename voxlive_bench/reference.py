"""The Hugging Face transformers implementation, run as an independent reference on OUR weights.

Only the test-suite and ``voxlive bench`` import this module; the engine never does. transformers is
imported lazily inside the functions, so ``import voxlive_bench.reference`` works without it installed.

What it does:

* :func:`hf_config` turns a :class:`voxlive.config.ModelConfig` into a ``VoxtralRealtimeConfig``.
* :func:`convert_weights` maps the native Mistral tensors to the parameter names transformers 5.x
  uses *directly* (``model.audio_tower...``, ``model.language_model...``,
  ``model.multi_modal_projector...``, ``lm_head.weight`` tied to the embedding), so the model loads
  with ``load_state_dict(strict=True)`` and no rename rules are involved. The q and k projections
  (and the encoder's q bias) are permuted per head from Mistral's interleaved RoPE order (pairs
  ``(2i, 2i+1)``) to transformers' rotate-half order (pairs ``(i, i + head_dim/2)``): the same
  rotation, only the order of dims within a head differs, so attention scores are unchanged.
* :func:`load_reference` builds ``VoxtralRealtimeForConditionalGeneration`` on the meta device,
  assigns the converted tensors (no random init, no second copy: the full-size model costs its
  weights once), re-ties ``lm_head`` and recomputes the non-persistent RoPE / time-embedding
  buffers (float32, as ``from_pretrained`` leaves them).
* :func:`reference_log_mel`, :func:`reference_audio_embeds`, :func:`reference_logits` and
  :func:`reference_generate` run the pieces the engine is compared against.

Facts about transformers 5.23 worth knowing when comparing (checked in tests/test_reference.py):

* Attention is "eager" by default here (float32 exact; sdpa differs in the last bits).
* Sliding windows (encoder and decoder): query ``q`` attends to keys ``k`` with
  ``q - window < k <= q``, i.e. the last ``window`` positions *including itself*.
* The time embedding (``t_cond``) is computed in the activation dtype (``inputs_embeds.dtype``): in
  float32 for a float32 model, in bf16 for a bf16 model (its ``inv_freq`` buffer stays float32 and is
  cast down at use).
* ``VoxtralRealtimeTextAdaRmsNorm`` hard-codes the t-cond bottleneck to 32, so only
  ``ada_rms_norm_t_cond_dim == 32`` is supported (checked).
* ``generate`` stops at EOS by default (``generation_config.eos_token_id == 2`` from the text config):
  see :func:`reference_generate` for how that is switched off.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from voxlive.checkpoint import Checkpoint, open_checkpoint
from voxlive.config import AudioConfig, EncoderConfig, ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from transformers.models.voxtral_realtime import VoxtralRealtimeConfig, VoxtralRealtimeForConditionalGeneration

__all__ = [
    "hf_config",
    "native_to_hf_name",
    "rotate_half_order",
    "convert_weights",
    "load_reference",
    "reference_log_mel",
    "reference_audio_embeds",
    "reference_logits",
    "reference_generate",
    "offline_padded_audio",
    "offline_prompt_ids",
]

# The t-cond bottleneck transformers hard-codes in VoxtralRealtimeTextAdaRmsNorm.
_HF_T_COND_DIM = 32


# ----------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------


def hf_config(config: ModelConfig, attn_implementation: str = "eager") -> VoxtralRealtimeConfig:
    """A ``VoxtralRealtimeConfig`` with the sizes of ``config`` (every field set explicitly)."""
    from transformers.models.voxtral_realtime import VoxtralRealtimeConfig

    e, d, a = config.encoder, config.decoder, config.audio
    if d.t_cond_dim != _HF_T_COND_DIM:
        raise ValueError(f"transformers hard-codes ada_rms_norm_t_cond_dim = 32; this checkpoint has {d.t_cond_dim}")
    text = dict(
        vocab_size=d.vocab_size,
        hidden_size=d.dim,
        intermediate_size=d.hidden_dim,
        num_hidden_layers=d.n_layers,
        num_attention_heads=d.n_heads,
        num_key_value_heads=d.n_kv_heads,
        head_dim=d.head_dim,
        hidden_act="silu",
        max_position_embeddings=131072,
        rms_norm_eps=d.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
        sliding_window=d.sliding_window,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=True,
    )
    audio = dict(
        hidden_size=e.dim,
        intermediate_size=e.hidden_dim,
        num_hidden_layers=e.n_layers,
        num_attention_heads=e.n_heads,
        head_dim=e.head_dim,
        hidden_act="silu",
        num_mel_bins=e.n_mels,
        rms_norm_eps=e.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": e.rope_theta},
        sliding_window=e.sliding_window,
    )
    return VoxtralRealtimeConfig(
        text_config=text,
        audio_config=audio,
        projector_hidden_act="gelu",
        audio_length_per_tok=a.mel_frames_per_token,
        default_num_delay_tokens=a.delay_ms // a.ms_per_token,
        downsample_factor=config.downsample_factor,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )


# ----------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------

_MM = r"mm_streams_embeddings\.embedding_module\."
_ENC = _MM + r"whisper_encoder\."
_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_FFN = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

# (native regex, transformers name template); the decoder rules are anchored so that the encoder's
# "transformer.layers.N" never matches them.
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(_MM + r"tok_embeddings\.weight$"), "model.language_model.embed_tokens.weight"),
    (re.compile(_ENC + r"conv_layers\.0\.conv\.(weight|bias)$"), "model.audio_tower.embedder.conv1.{0}"),
    (re.compile(_ENC + r"conv_layers\.1\.conv\.(weight|bias)$"), "model.audio_tower.embedder.conv2.{0}"),
    (re.compile(_ENC + r"transformer\.layers\.(\d+)\.attention\.(w[qkvo])\.(weight|bias)$"),
     "model.audio_tower.layers.{0}.self_attn.{1}.{2}"),
    (re.compile(_ENC + r"transformer\.layers\.(\d+)\.attention_norm\.weight$"),
     "model.audio_tower.layers.{0}.self_attn_layer_norm.weight"),
    (re.compile(_ENC + r"transformer\.layers\.(\d+)\.ffn_norm\.weight$"),
     "model.audio_tower.layers.{0}.final_layer_norm.weight"),
    (re.compile(_ENC + r"transformer\.layers\.(\d+)\.feed_forward\.(w[123])\.(weight|bias)$"),
     "model.audio_tower.layers.{0}.mlp.{1}.{2}"),
    (re.compile(_ENC + r"transformer\.norm\.weight$"), "model.audio_tower.norm.weight"),
    (re.compile(_MM + r"audio_language_projection\.0\.weight$"), "model.multi_modal_projector.linear_1.weight"),
    (re.compile(_MM + r"audio_language_projection\.2\.weight$"), "model.multi_modal_projector.linear_2.weight"),
    (re.compile(r"^layers\.(\d+)\.attention\.(w[qkvo])\.weight$"),
     "model.language_model.layers.{0}.self_attn.{1}.weight"),
    (re.compile(r"^layers\.(\d+)\.attention_norm\.weight$"), "model.language_model.layers.{0}.input_layernorm.weight"),
    (re.compile(r"^layers\.(\d+)\.ffn_norm\.weight$"),
     "model.language_model.layers.{0}.post_attention_layernorm.weight"),
    (re.compile(r"^layers\.(\d+)\.feed_forward\.(w[123])\.weight$"), "model.language_model.layers.{0}.mlp.{1}.weight"),
    (re.compile(r"^layers\.(\d+)\.ada_rms_norm_t_cond\.0\.weight$"),
     "model.language_model.layers.{0}.ada_rms_norm.linear1.weight"),
    (re.compile(r"^layers\.(\d+)\.ada_rms_norm_t_cond\.2\.weight$"),
     "model.language_model.layers.{0}.ada_rms_norm.linear2.weight"),
    (re.compile(r"^norm\.weight$"), "model.language_model.norm.weight"),
]

LM_HEAD = "lm_head.weight"
EMBED = "model.language_model.embed_tokens.weight"


def native_to_hf_name(name: str) -> str:
    """The transformers 5.x parameter name of native tensor ``name`` (``KeyError`` if it has none)."""
    for pattern, template in _RULES:
        m = pattern.match(name)
        if m:
            groups = [_ATTN.get(g, _FFN.get(g, g)) for g in m.groups()]
            return template.format(*groups)
    raise KeyError(f"no transformers name for native tensor {name!r}")


def _rope_heads(name: str, config: ModelConfig) -> int | None:
    """Number of heads to permute for a RoPE'd projection (q/k weights, encoder q bias), else None."""
    m = re.search(r"attention\.(wq|wk)\.(weight|bias)$", name)
    if not m:
        return None
    is_encoder = "whisper_encoder." in name
    if m.group(1) == "wq":
        return config.encoder.n_heads if is_encoder else config.decoder.n_heads
    return config.encoder.n_heads if is_encoder else config.decoder.n_kv_heads  # encoder is MHA


def rotate_half_order(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection (weight ``[H*hd, in]`` or bias ``[H*hd]``) per head
    from interleaved RoPE order (row ``2i``, ``2i+1`` form pair ``i``) to rotate-half order (pair ``i`` at
    rows ``i`` and ``i + hd/2``): new row ``j < hd/2`` = old row ``2j``; new row ``hd/2 + j`` = old ``2j+1``."""
    rows = t.shape[0]
    if rows % n_heads or (rows // n_heads) % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    hd = rows // n_heads
    rest = t.shape[1:]
    return t.reshape(n_heads, hd // 2, 2, *rest).transpose(1, 2).reshape(t.shape).contiguous()


def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
    a = ckpt.weights.read(name)
    t = torch.from_numpy(a)
    if ckpt.weights.tensors[name].dtype == "BF16":
        t = t.view(torch.bfloat16)
    return t


def convert_weights(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, *,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Native tensors -> the state dict transformers 5.x expects (q/k rows permuted, see module doc).

    ``lm_head.weight`` is the very same tensor object as the embedding (tied). Every native tensor is
    used exactly once; a native name without a rule or two names mapping to one key raise. Each tensor
    is moved to ``device`` as it is converted (no second full copy on the host).
    """
    out: dict[str, torch.Tensor] = {}
    for name in ckpt.weights.tensors:
        key = native_to_hf_name(name)
        if key in out:
            raise ValueError(f"two native tensors map to {key!r}")
        t = _read(ckpt, name).to(device=device, dtype=dtype)
        heads = _rope_heads(name, ckpt.config)
        if heads is not None:
            t = rotate_half_order(t, heads)
        out[key] = t
    out[LM_HEAD] = out[EMBED]
    return out


def _checkpoint(source) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else open_checkpoint(source)


def load_reference(source_dir, dtype: torch.dtype = torch.float32, *, device: str | torch.device = "cpu",
                   attn_implementation: str = "eager") -> VoxtralRealtimeForConditionalGeneration:
    """``VoxtralRealtimeForConditionalGeneration`` in eval mode with the checkpoint's converted weights.

    ``source_dir`` is a native checkpoint directory (or an open :class:`Checkpoint`). The model is built on
    the meta device and the converted tensors are assigned with ``load_state_dict(strict=True,
    assign=True)``: any missing or unexpected key raises, nothing is randomly initialised.
    """
    from transformers.models.voxtral_realtime import VoxtralRealtimeForConditionalGeneration

    ckpt = _checkpoint(source_dir)
    config = hf_config(ckpt.config, attn_implementation=attn_implementation)
    state = convert_weights(ckpt, dtype, device=device)
    with torch.device("meta"):
        model = VoxtralRealtimeForConditionalGeneration(config)
    model.load_state_dict(state, strict=True, assign=True)
    # assign=True wraps the embedding twice; make lm_head the very same Parameter again.
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    _rebuild_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left uninitialised after loading: {left}")
    model.requires_grad_(False)
    return model.eval()


def _rebuild_buffers(model, device) -> None:
    """Recompute the non-persistent buffers (RoPE inv_freq, time-embedding inv_freq) that meta init left empty."""
    from transformers.models.voxtral_realtime import modeling_voxtral_realtime as m

    for module in model.modules():
        if isinstance(module, m.VoxtralRealtimeRotaryEmbedding):
            fresh = m.VoxtralRealtimeRotaryEmbedding(config=module.config)
        elif isinstance(module, m.VoxtralRealtimeTimeEmbedding):
            fresh = m.VoxtralRealtimeTimeEmbedding(module.dim, module.theta)
        else:
            continue
        for name, buf in fresh.named_buffers(recurse=False):
            setattr(module, name, buf.to(device))
        if hasattr(fresh, "attention_scaling"):
            module.attention_scaling = fresh.attention_scaling


# ----------------------------------------------------------------------------------------------------
# inputs (offline padding and prompt, VOXTRAL.md section 4)
# ----------------------------------------------------------------------------------------------------


def offline_padded_audio(audio: np.ndarray, num_delay_tokens: int, audio_config: AudioConfig | None = None) -> np.ndarray:
    """Offline padding: left pad tokens of zeros + audio + zeros to a whole token + (delay + 1 + 10) tokens."""
    n_left = audio_config.n_left_pad_tokens if audio_config else 32
    spt = audio_config.samples_per_token if audio_config else 1280
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    right = (-len(audio)) % spt + (num_delay_tokens + 1 + 10) * spt
    return np.concatenate([np.zeros(n_left * spt, np.float32), audio, np.zeros(right, np.float32)])


def offline_prompt_ids(tokenizer_path, num_delay_tokens: int, n_left_pad_tokens: int = 32) -> list[int]:
    """``[BOS] + [STREAMING_PAD] * (n_left_pad_tokens + num_delay_tokens)``, ids looked up by name."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tok = Tekkenizer.from_file(str(Path(tokenizer_path)))
    pad = tok.get_special_token("[STREAMING_PAD]")
    return [tok.bos_id] + [pad] * (n_left_pad_tokens + num_delay_tokens)


# ----------------------------------------------------------------------------------------------------
# running the reference
# ----------------------------------------------------------------------------------------------------


def reference_log_mel(audio: np.ndarray, config: ModelConfig | EncoderConfig | AudioConfig | None = None) -> np.ndarray:
    """``[n_mels, len(audio) // hop]`` float32 log-mel of an already padded float32 signal, computed by
    ``VoxtralRealtimeFeatureExtractor._torch_extract_fbank_features(center=True)`` (no 16-bit PCM trip)."""
    from transformers.models.voxtral_realtime import VoxtralRealtimeFeatureExtractor

    kw = dict(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400, win_length=400, global_log_mel_max=1.5)
    if isinstance(config, ModelConfig):
        a, e = config.audio, config.encoder
        kw.update(feature_size=a.n_mels, sampling_rate=a.sample_rate, hop_length=a.hop_length, n_fft=a.window_size,
                  win_length=a.window_size, global_log_mel_max=e.global_log_mel_max)
    elif isinstance(config, AudioConfig):
        kw.update(feature_size=config.n_mels, sampling_rate=config.sample_rate, hop_length=config.hop_length,
                  n_fft=config.window_size, win_length=config.window_size)
    elif isinstance(config, EncoderConfig):
        kw.update(feature_size=config.n_mels, global_log_mel_max=config.global_log_mel_max)
    fe = VoxtralRealtimeFeatureExtractor(**kw)
    x = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32).reshape(-1))
    with torch.no_grad():
        return fe._torch_extract_fbank_features(x, center=True).numpy().astype(np.float32)


def _features(model, mel: np.ndarray) -> torch.Tensor:
    mel = np.asarray(mel, dtype=np.float32)
    per_tok = model.config.audio_length_per_tok
    if mel.ndim != 2 or mel.shape[0] != model.config.audio_config.num_mel_bins:
        raise ValueError(f"mel must be [{model.config.audio_config.num_mel_bins}, frames], got {list(mel.shape)}")
    if mel.shape[1] % per_tok or mel.shape[1] == 0:
        raise ValueError(f"mel frames ({mel.shape[1]}) must be a positive multiple of {per_tok}")
    return torch.from_numpy(mel)[None].to(device=model.device, dtype=model.dtype)


def reference_audio_embeds(model, mel: np.ndarray) -> np.ndarray:
    """``[frames // 8, text dim]`` float32: audio tower on the whole mel at once (non-streaming, causal
    sliding-window mask, no cache) followed by the 4x downsample and the projector."""
    feats = _features(model, mel)
    with torch.no_grad():
        out = model.model.get_audio_features(input_features=feats, use_cache=False)
    return out.pooler_output[0].float().cpu().numpy()


def reference_logits(model, token_ids: list[int], mel: np.ndarray, num_delay_tokens: int) -> np.ndarray:
    """``[len(token_ids), vocab]`` float32 teacher-forced logits from ONE forward without cache: decoder input
    at position ``p`` = ``embed(token_ids[p]) + audio_embeds[p]``.

    The model's own forward adds the audio embeddings, so the encoder is fed the first ``4 * len(token_ids)``
    conv frames (the encoder is causal: these are exactly the frames positions ``0..len-1`` depend on).
    """
    feats = _features(model, mel)
    n = len(token_ids)
    n_audio = feats.shape[-1] // model.config.audio_length_per_tok
    if not 0 < n <= n_audio:
        raise ValueError(f"need 0 < len(token_ids) <= number of audio embeddings ({n_audio}), got {n}")
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        conv = model.model.audio_tower.embedder(feats)  # [1, frames/2, enc dim]
        conv = conv[:, : n * model.config.downsample_factor]
        out = model(input_ids=ids, encoder_inputs_embeds=conv, num_delay_tokens=num_delay_tokens, use_cache=False)
    return out.logits[0].float().cpu().numpy()


def reference_generate(model, mel: np.ndarray, prompt_ids: list[int], num_delay_tokens: int, *,
                       stop_at_eos: bool = False) -> list[int]:
    """Greedy offline transcription with ``model.generate``; returns only the newly generated ids.

    As the official processor + generate do it offline: ``input_ids`` = the prompt, ``input_features`` = the
    whole padded mel, ``num_delay_tokens``, no sampling, and no length argument, so transformers sets
    ``max_length`` = number of audio tokens ``N = ceil(frames / 8)``. Generation then yields exactly
    ``N - len(prompt_ids)`` tokens: the token for the last audio position (``N - 1``) is never produced,
    as generate stops once the sequence holds ``N`` ids. (An engine that also runs the last position emits one more.)

    EOS: by default transformers' generate STOPS at EOS (``generation_config.eos_token_id`` = 2, inherited
    from the text config), and pads the rest. With ``stop_at_eos=False`` (the default here) the model's
    ``generation_config.eos_token_id`` is set to ``None`` for the duration of the call (restored after),
    so an EOS token is emitted, fed back like any other token, and generation runs over the whole audio,
    as vLLM's streaming does. ``stop_at_eos=True`` keeps transformers' default (the result may be shorter).
    """
    feats = _features(model, mel)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    gc = model.generation_config
    saved = gc.eos_token_id
    try:
        if not stop_at_eos:
            gc.eos_token_id = None
        with torch.no_grad(), warnings.catch_warnings():
            # transformers sets max_length itself (= audio tokens) yet warns about a "default max_length".
            warnings.filterwarnings("ignore", message=".*default `max_length`.*")
            out = model.generate(input_ids=ids, input_features=feats, num_delay_tokens=num_delay_tokens,
                                 do_sample=False)
    finally:
        gc.eos_token_id = saved
    return out[0, ids.shape[1]:].tolist()
