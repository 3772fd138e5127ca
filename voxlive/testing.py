"""Random-weight checkpoints in the real native layout, for tests and benchmarks.

The real weights cannot be downloaded everywhere, but the compute of a model does not depend on
its values: a full-size random checkpoint costs exactly what the real one costs, and a tiny one
exercises every line of the loading and inference code. The writer streams tensors to disk one
at a time, so the 8.9 GB full-size file never sits in memory whole.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path

import numpy as np
import torch

from .checkpoint import expected_native_tensors
from .config import parse_config

# Names of the special tokens at their ids in the Voxtral Realtime tokenizer. Other slots below
# 1000 are fillers; the code looks every id up by name, as it must with the real file.
SPECIAL_TOKENS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 10: "[IMG]", 11: "<pad>",
    12: "[IMG_BREAK]", 13: "[IMG_END]", 24: "[AUDIO]", 25: "[BEGIN_AUDIO]",
    32: "[STREAMING_PAD]", 33: "[STREAMING_WORD]",
}
NUM_SPECIAL = 1000

FULL = {
    "dim": 3072, "n_layers": 26, "head_dim": 128, "hidden_dim": 9216, "n_heads": 32, "n_kv_heads": 8,
    "vocab_size": 131072, "sliding_window": 8192,
    "encoder": {"dim": 1280, "n_layers": 32, "head_dim": 64, "hidden_dim": 5120, "n_heads": 32,
                "sliding_window": 750},
}
# Small enough for a test to run in seconds, with windows small enough that a few seconds of audio
# overflow both the encoder's and the decoder's sliding windows.
TINY = {
    "dim": 96, "n_layers": 2, "head_dim": 24, "hidden_dim": 192, "n_heads": 4, "n_kv_heads": 2,
    "vocab_size": 2048, "sliding_window": 40,
    "encoder": {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 160, "n_heads": 4,
                "sliding_window": 24},
}
SIZES = {"full": FULL, "tiny": TINY}


def make_params(size: str = "tiny", **overrides) -> dict:
    """params.json for a size preset; ``overrides`` replace decoder keys, ``encoder`` a dict of encoder keys."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    s = {**SIZES[size], **{k: v for k, v in overrides.items() if k != "encoder"}}
    enc = {**SIZES[size]["encoder"], **overrides.get("encoder", {})}
    return {
        "dim": s["dim"], "n_layers": s["n_layers"], "head_dim": s["head_dim"], "hidden_dim": s["hidden_dim"],
        "n_heads": s["n_heads"], "n_kv_heads": s["n_kv_heads"], "use_biases": False, "causal": True,
        "rope_theta": 1e6, "norm_eps": 1e-5, "vocab_size": s["vocab_size"], "model_parallel": 1,
        "tied_embeddings": True, "sliding_window": s["sliding_window"], "model_max_length": 131072,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        "sampling_rate": 16000, "frame_rate": 12.5, "num_mel_bins": 128, "hop_length": 160,
                        "window_size": 400, "chunk_length_s": None, "global_log_mel_max": 1.5,
                        "transcription_format": "streaming",
                    },
                    "dim": enc["dim"], "n_layers": enc["n_layers"], "head_dim": enc["head_dim"],
                    "hidden_dim": enc["hidden_dim"], "n_heads": enc["n_heads"], "vocab_size": s["vocab_size"],
                    "n_kv_heads": enc["n_heads"], "use_biases": True, "use_cache": False, "rope_theta": 1e6,
                    "causal": True, "norm_eps": 1e-5, "pos_embed": "rope", "max_source_positions": None,
                    "ffn_type": "swiglu", "norm_type": "rms_norm", "sliding_window": enc["sliding_window"],
                },
                "downsample_args": {"downsample_factor": 4},
            },
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": 32,
    }


AUDIO_SECTION = {
    "sampling_rate": 16000,
    "frame_rate": 12.5,
    "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
    "transcription_delay_ms": 480,
    "streaming_look_ahead_ms": 2.5,
    "streaming_look_back_ms": 52.5,
    "streaming_n_left_pad_tokens": 32,
    "transcription_format": "streaming",
}


# The demo vocabulary: the 256 single bytes, then whole lower-case words with their leading space.
_WORD = re.compile(rb" [a-z]{4,9}")


def make_tekken(vocab_size: int, *, words_only: bool = False) -> dict:
    """tekken.json from the Tekken vocabulary mistral-common ships, with Voxtral's specials and audio.

    ``words_only``: after the 256 single bytes, only whole words (" valid", " around"...), so that
    whatever a random model emits reads as words rather than fragments.
    """
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    with open(src, encoding="utf-8") as f:
        base = json.load(f)
    n_vocab = vocab_size - NUM_SPECIAL
    if not 256 <= n_vocab <= len(base["vocab"]):
        raise ValueError(f"vocab_size must be in [{NUM_SPECIAL + 256}, {NUM_SPECIAL + len(base['vocab'])}]")
    if words_only:
        words = [e for e in base["vocab"][256:] if _WORD.fullmatch(base64.b64decode(e["token_bytes"]))]
        base["vocab"] = [{**e, "rank": i} for i, e in enumerate(base["vocab"][:256] + words[:n_vocab - 256])]
    specials = [
        {"rank": i, "token_str": SPECIAL_TOKENS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(max(SPECIAL_TOKENS) + 1)
    ]
    return {
        "config": {**base["config"], "num_vocab_tokens": n_vocab, "default_vocab_size": vocab_size,
                   "default_num_special_tokens": NUM_SPECIAL, "version": "v13"},
        "vocab": base["vocab"][:n_vocab],
        "special_tokens": specials,
        "audio": AUDIO_SECTION,
    }


def _init(name: str, shape: tuple[int, ...], g: torch.Generator, adapter_scale: float,
          words_only: bool) -> torch.Tensor:
    """Values that keep activations O(1) through every layer, so the numbers stay meaningful."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if name.endswith("tok_embeddings.weight"):
        w = torch.randn(shape, generator=g)
        if words_only:  # single bytes get a zero logit (the embedding is tied), so words win
            w[NUM_SPECIAL:NUM_SPECIAL + 256] = 0
        return w
    fan_in = int(np.prod(shape[1:]))
    w = torch.randn(shape, generator=g) / fan_in**0.5
    if name.endswith("audio_language_projection.2.weight"):
        w *= adapter_scale
    return w


_SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_random_checkpoint(path, size: str = "tiny", seed: int = 0, *, dtype: str = "bfloat16",
                            adapter_scale: float = 1.0, words_only: bool = False, **overrides) -> Path:
    """Write params.json, tekken.json and consolidated.safetensors with random weights to ``path``.

    ``adapter_scale`` multiplies the adapter's output layer. With plain random weights the tied
    embedding dominates greedy decoding, which then repeats one token whatever the audio; a large
    scale lets the audio decide the tokens, so streaming-vs-offline tests compare something real.
    ``words_only``: a vocabulary of whole words (see :func:`make_tekken`).
    ``overrides`` change params.json sizes (see :func:`make_params`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = make_params(size, **overrides)
    tekken = make_tekken(params["vocab_size"], words_only=words_only)
    config = parse_config(params, tekken["audio"])
    torch_dtype = getattr(torch, dtype)
    shapes = expected_native_tensors(config)

    header, offset = {}, 0
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": _SAFE_DTYPES[torch_dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "voxlive_random_seed": str(seed)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    g = torch.Generator().manual_seed(seed)
    tmp = path / "consolidated.safetensors.partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in shapes.items():
            t = _init(name, shape, g, adapter_scale, words_only).to(torch_dtype)
            raw = t.view(torch.int16) if torch_dtype != torch.float32 else t
            f.write(raw.numpy().tobytes())
    tmp.replace(path / "consolidated.safetensors")
    with open(path / "params.json", "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    with open(path / "tekken.json", "w", encoding="utf-8") as f:
        json.dump(tekken, f)
    return path



DEMO_SEED = 1
DEMO_ADAPTER_SCALE = 1000.0  # the audio, not the fed-back token, decides what the demo model says


def write_demo_checkpoint(path) -> Path:
    """A tiny random checkpoint (~4 MB) whose output follows the audio: it says random words on
    speech and nothing on silence. For trying the CLI, the server and the page without the
    8.9 GB model (``voxlive demo-checkpoint DIR``); what it says means nothing."""
    return write_random_checkpoint(path, "tiny", seed=DEMO_SEED, dtype="float32", adapter_scale=DEMO_ADAPTER_SCALE,
                                   words_only=True)


class ForcedPad:
    """A runtime forced into a blank rut, for tests: at the decoder positions in ``positions`` (a
    range), ``[STREAMING_PAD]``'s logit gets the bias that makes its margin over the best other
    token exactly ``margin`` (vLLM #47614 measured +3.5 to +6.6 in real ruts, +8.5 or more over
    true silence). It wraps a real runtime and edits only what ``decode`` returns, as that bias on
    one logit would: the best other token stays, the greedy token becomes the pad (a positive
    margin) or the best other, and the greedy token's log-probability is that of the biased logits."""

    def __init__(self, runtime, positions: range, margin: float):
        self.inner, self.positions, self.margin = runtime, positions, float(margin)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, states, feeds, *, outputs=None):
        starts = [self.inner.position(s) for s in states]
        out = self.inner.decode(states, feeds, outputs=outputs)
        for start, feed, d in zip(starts, feeds, out):
            first = start + len(feed) - len(d.tokens)  # results are for the last fed positions
            for i in range(len(d.tokens)):
                if first + i in self.positions:
                    d.logprobs[i] = self._biased_logprob(d, i)
                    d.pad_margins[i] = self.margin
                    d.tokens[i] = self.inner.pad_id if self.margin > 0 else d.best_other[i]
        return out

    def _biased_logprob(self, d, i: int) -> float:
        """The new greedy token's log-probability once the pad's logit moves by ``margin - pad_margins[i]``."""
        other = d.logprobs[i] - (d.pad_margins[i] if d.tokens[i] == self.inner.pad_id else 0.0)
        pad = other + d.pad_margins[i]
        bias = self.margin - d.pad_margins[i]
        # log of the new normaliser over the old: the pad's share of it scaled by e^bias
        rest = np.log1p(-np.exp(pad)) if pad < 0 else -np.inf  # log of the other tokens' share
        grown = float(np.logaddexp(rest, pad + bias))
        return (pad + bias if self.margin > 0 else other) - grown


def forced_pad(model, positions: range, margin: float):
    """A Model on the same weights whose runtime is ``ForcedPad(model.runtime, positions, margin)``."""
    from .model import Model

    return Model(ForcedPad(model.runtime, positions, margin), model.tokenizer, model.source, drafts=model.drafts)
