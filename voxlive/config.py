"""Model dimensions and audio settings, parsed from a checkpoint's params.json and tekken.json.

Everything the rest of the code needs to know about a checkpoint's shapes lives in these frozen
dataclasses; nothing else reads the JSON files. Inconsistent files fail here, with the file named,
rather than later as a shape error deep inside a matmul.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class EncoderConfig:
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    hidden_dim: int
    rope_theta: float
    norm_eps: float
    sliding_window: int
    n_mels: int
    global_log_mel_max: float


@dataclass(frozen=True)
class DecoderConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    sliding_window: int
    t_cond_dim: int


@dataclass(frozen=True)
class AudioConfig:
    """The streaming audio settings of tekken.json's ``audio`` section."""

    sample_rate: int
    frame_rate: float
    hop_length: int
    window_size: int
    n_mels: int
    delay_ms: int
    n_left_pad_tokens: int

    @property
    def samples_per_token(self) -> int:
        return round(self.sample_rate / self.frame_rate)

    @property
    def mel_frames_per_token(self) -> int:
        return self.samples_per_token // self.hop_length

    @property
    def ms_per_token(self) -> int:
        return round(1000 / self.frame_rate)


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig
    decoder: DecoderConfig
    audio: AudioConfig
    downsample_factor: int

    def delay_tokens(self, delay_ms: int | None) -> int:
        """Validated delay in tokens; ``None`` means the checkpoint's default."""
        if delay_ms is None:
            delay_ms = self.audio.delay_ms
        check_delay_ms(delay_ms, self.audio.ms_per_token)
        return delay_ms // self.audio.ms_per_token


MS_PER_TOKEN = 80  # every Voxtral Realtime checkpoint runs at 12.5 tokens per second


def allowed_delays_ms(ms_per_token: int = MS_PER_TOKEN) -> list[int]:
    """Delays the model card allows: multiples of one token from 80 ms to 1200 ms, and 2400 ms."""
    return list(range(ms_per_token, 1200 + ms_per_token, ms_per_token)) + [2400]


def check_delay_ms(delay_ms, ms_per_token: int = MS_PER_TOKEN) -> None:
    """Refuse a delay the model does not take (needs no checkpoint: the CLI checks before loading)."""
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or delay_ms not in allowed_delays_ms(ms_per_token):
        raise ValueError(
            f"delay_ms must be a multiple of {ms_per_token} from {ms_per_token} to 1200, or 2400; got {delay_ms!r}"
        )


def _get(d: dict, key: str, where: str):
    try:
        return d[key]
    except (KeyError, TypeError):
        raise ConfigError(f"{where}: missing key {key!r}") from None


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def parse_config(params: dict, tekken_audio: dict, *, params_name: str = "params.json",
                 tekken_name: str = "tekken.json") -> ModelConfig:
    """Build a ModelConfig from native params.json and the audio section of tekken.json."""
    p = params_name
    mm = _get(_get(params, "multimodal", p), "whisper_model_args", p)
    enc = _get(mm, "encoder_args", p)
    enc_audio = _get(enc, "audio_encoding_args", p)
    t = f"{tekken_name} (audio)"
    t_enc = _get(tekken_audio, "audio_encoding_config", t)
    try:
        encoder = EncoderConfig(
            dim=int(_get(enc, "dim", p)),
            n_layers=int(_get(enc, "n_layers", p)),
            n_heads=int(_get(enc, "n_heads", p)),
            head_dim=int(_get(enc, "head_dim", p)),
            hidden_dim=int(_get(enc, "hidden_dim", p)),
            rope_theta=float(_get(enc, "rope_theta", p)),
            norm_eps=float(_get(enc, "norm_eps", p)),
            sliding_window=int(_get(enc, "sliding_window", p)),
            n_mels=int(_get(enc_audio, "num_mel_bins", p)),
            global_log_mel_max=float(_get(enc_audio, "global_log_mel_max", p)),
        )
        decoder = DecoderConfig(
            dim=int(_get(params, "dim", p)),
            n_layers=int(_get(params, "n_layers", p)),
            n_heads=int(_get(params, "n_heads", p)),
            n_kv_heads=int(_get(params, "n_kv_heads", p)),
            head_dim=int(_get(params, "head_dim", p)),
            hidden_dim=int(_get(params, "hidden_dim", p)),
            vocab_size=int(_get(params, "vocab_size", p)),
            rope_theta=float(_get(params, "rope_theta", p)),
            norm_eps=float(_get(params, "norm_eps", p)),
            sliding_window=int(_get(params, "sliding_window", p)),
            t_cond_dim=int(params.get("ada_rms_norm_t_cond_dim", 32)),
        )
        audio = AudioConfig(
            sample_rate=int(_get(tekken_audio, "sampling_rate", t)),
            frame_rate=float(_get(tekken_audio, "frame_rate", t)),
            hop_length=int(_get(t_enc, "hop_length", t)),
            window_size=int(_get(t_enc, "window_size", t)),
            n_mels=int(_get(t_enc, "num_mel_bins", t)),
            delay_ms=int(_get(tekken_audio, "transcription_delay_ms", t)),
            n_left_pad_tokens=int(_get(tekken_audio, "streaming_n_left_pad_tokens", t)),
        )
        downsample = int(_get(_get(mm, "downsample_args", p), "downsample_factor", p))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{p} / {tekken_name}: bad value ({e})") from None
    config = ModelConfig(encoder=encoder, decoder=decoder, audio=audio, downsample_factor=downsample)
    _check(config, params, enc_audio, p, tekken_name)
    return config


def _check(c: ModelConfig, params: dict, enc_audio: dict, p: str, t: str) -> None:
    problems = []
    if params.get("tied_embeddings", True) is not True:
        problems.append(f"{p}: only tied embeddings are supported")
    if params.get("ada_rms_norm_t_cond", True) is not True:
        problems.append(f"{p}: ada_rms_norm_t_cond must be true")
    for name, n in (("encoder", c.encoder), ("decoder", c.decoder)):
        if n.head_dim % 2:
            problems.append(f"{p}: {name} head_dim must be even for RoPE, got {n.head_dim}")
        if min(n.dim, n.n_layers, n.n_heads, n.head_dim, n.hidden_dim, n.sliding_window) <= 0:
            problems.append(f"{p}: {name} sizes must be positive")
    d = c.decoder
    if d.n_kv_heads <= 0 or d.n_heads % d.n_kv_heads:
        problems.append(f"{p}: n_heads ({d.n_heads}) must be a multiple of n_kv_heads ({d.n_kv_heads})")
    if d.dim % 2:
        problems.append(f"{p}: decoder dim must be even for the time embedding")
    a = c.audio
    if a.n_mels != c.encoder.n_mels:
        problems.append(f"{t} num_mel_bins {a.n_mels} != {p} num_mel_bins {c.encoder.n_mels}")
    for key, mine in (("sampling_rate", a.sample_rate), ("hop_length", a.hop_length),
                      ("window_size", a.window_size), ("frame_rate", a.frame_rate)):
        if key in enc_audio and enc_audio[key] != mine:
            problems.append(f"{t} {key} {mine} != {p} {key} {enc_audio[key]}")
    # One token = mel frames per token = conv stride (2) x downsample factor.
    if a.samples_per_token != a.hop_length * 2 * c.downsample_factor:
        problems.append(
            f"{t}: {a.sample_rate}/{a.frame_rate} samples per token must equal hop_length x 2 x "
            f"downsample_factor = {a.hop_length * 2 * c.downsample_factor}"
        )
    if a.delay_ms <= 0 or a.delay_ms % a.ms_per_token:
        problems.append(f"{t}: transcription_delay_ms {a.delay_ms} must be a positive multiple of {a.ms_per_token}")
    if a.n_left_pad_tokens < 0:
        problems.append(f"{t}: streaming_n_left_pad_tokens must be >= 0")
    if problems:
        raise ConfigError("inconsistent config: " + "; ".join(problems))


def load_config(directory: Path) -> ModelConfig:
    """Read params.json and tekken.json of a native checkpoint directory."""
    directory = Path(directory)
    params = read_json(directory / "params.json")
    tekken = read_json(directory / "tekken.json")
    audio = tekken.get("audio")
    if not isinstance(audio, dict):
        raise ConfigError(f"{directory / 'tekken.json'}: no 'audio' section (not a Voxtral Realtime tokenizer)")
    return parse_config(params, audio, params_name=str(directory / "params.json"),
                        tekken_name=str(directory / "tekken.json"))
