"""``voxlive.load`` and the Model: the public face of a loaded checkpoint on one backend."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
from typing import Callable

import numpy as np

from .audio import SAMPLE_RATE, load_audio
from .checkpoint import CheckpointError, open_checkpoint
from .drafts import Drafting
from .rut import DEFAULT_POLICY, RutPolicy
from .session import Stream
from .tokens import Tokenizer
from .transcript import Transcript

BACKENDS = ("auto", "torch", "mlx")
QUANTIZE = (None, "int8", "int4", "int6")
SPEECH = ("vad", "fed", "none")


class Model:
    def __init__(self, runtime, tokenizer: Tokenizer, source: str, *, drafts: bool = True):
        self.runtime = runtime
        self.drafts = drafts  # streams draft tokens by default (``voxlive.drafts``)
        self.tokenizer = tokenizer
        self.config = runtime.config
        self.source = source
        self._fresh_streams: dict[int, Stream] = {}  # delay in tokens -> a new stream to fork
        self._vad = None  # the SileroVad streams share, loaded by the first that needs it

    def stream(self, *, delay_ms: int | None = None, drafts: bool | None = None,
               rut: RutPolicy | None = DEFAULT_POLICY, speech: str = "vad") -> Stream:
        """A live stream: ``feed(pcm)`` float32 16 kHz mono chunks of any size, then ``finish()``.

        Streams start as a fork of one fresh stream per delay, whose silent left pad (2.56 s) is
        encoded and decoded once per model instead of once per stream. ``drafts`` (default: the
        model's ``load`` option): where several positions' audio is in, guess their tokens and verify
        the guesses in one decoder pass (the same tokens, fewer passes). ``rut``: the blank-rut
        penalty (``voxlive.rut``; None: pure greedy decoding). ``speech``, for its speech threshold:
        "vad" runs Silero VAD on the audio the stream is fed, "fed" takes its probabilities from
        ``Stream.add_speech`` (a server computes them off its engine thread), "none" goes without.
        """
        if speech not in SPEECH:
            raise ValueError(f"speech must be one of {SPEECH}, got {speech!r}")
        delay = self.config.delay_tokens(delay_ms)
        if delay not in self._fresh_streams:
            self._fresh_streams[delay] = Stream(self.runtime, self.tokenizer, self.config, delay_ms=delay_ms)
        stream = self._fresh_streams[delay].fork()
        if self.drafts if drafts is None else drafts:
            stream.use_drafting(Drafting.default(self.tokenizer.streaming_pad, row_cost=self.runtime.row_cost))
        vad = self.vad().stream() if speech == "vad" and rut is not None and rut.speech_after is not None else None
        stream.use_rut(rut, vad=vad, speech=speech == "fed")
        return stream

    def vad(self):
        """The Silero VAD this model's streams share (loaded on first use)."""
        if self._vad is None:
            from .vad import SileroVad

            self._vad = SileroVad()
        return self._vad

    @property
    def backend(self) -> str:
        return self.runtime.backend

    @property
    def summary(self) -> str:
        """What runs: e.g. "torch backend, cpu, bfloat16, int4 weights" (the CLI's and server's status line)."""
        r = self.runtime
        weights = getattr(r, "quantize", None)
        parts = [f"{r.backend} backend", str(r.device), str(r.dtype).rpartition(".")[2],
                 f"{weights} weights" if weights else "unquantized"]
        return ", ".join(parts)

    def transcribe(self, audio, *, delay_ms: int | None = None, chunk_seconds: float = 30.0,
                   progress: Callable[[float, float], None] | None = None, drafts: bool | None = None,
                   rut: RutPolicy | None = DEFAULT_POLICY) -> Transcript:
        """Transcribe a whole file (path, encoded bytes, or float32 16 kHz mono array).

        This is the streaming algorithm fed ``chunk_seconds`` at a time (the encoder runs on each
        whole chunk at once), so its tokens are those of any live stream of the same audio.
        ``progress(done_seconds, total_seconds)`` is called after each chunk; ``drafts`` and ``rut``
        as in ``stream``.
        """
        pcm = load_audio(audio)
        stream = self.stream(delay_ms=delay_ms, drafts=drafts, rut=rut)
        step = max(1, int(chunk_seconds * SAMPLE_RATE))
        total = len(pcm) / SAMPLE_RATE
        for start in range(0, len(pcm), step):
            stream.feed(pcm[start:start + step])
            if progress:
                progress(min(start + step, len(pcm)) / SAMPLE_RATE, total)
        return stream.finish()

    # -- whisper-style low level, for research and verification -------------------------------

    def embed_audio(self, mel: np.ndarray) -> np.ndarray:
        """Encoder + adapter on log-mel frames [n_mels, frames] -> [frames // 8, dim] float32.

        The frames are taken as the start of a stream (causal convolutions left-padded with zeros,
        positions from 0); their count must be a whole number of tokens (a multiple of 8, i.e. audio
        padded to a multiple of 1280 samples).
        """
        mel = np.asarray(mel, dtype=np.float32)
        n_mels = self.config.audio.n_mels
        if mel.ndim != 2 or mel.shape[0] != n_mels:
            raise ValueError(f"mel must be [{n_mels}, frames], got shape {mel.shape}")
        state = self.runtime.new_state(self.config.delay_tokens(None))
        try:
            self.runtime.encode(state, mel)
            return self.runtime.take_embeddings(state)
        finally:
            self.runtime.release(state)

    def logits(self, token_ids, audio_embeds: np.ndarray, *, delay_ms: int | None = None) -> np.ndarray:
        """Teacher-forced logits [n, vocab] float32: position p sees audio_embeds[p] + embed(token_ids[p])."""
        token_ids = [int(t) for t in token_ids]
        audio_embeds = np.asarray(audio_embeds, dtype=np.float32)
        if audio_embeds.ndim != 2 or audio_embeds.shape[1] != self.config.decoder.dim:
            raise ValueError(f"audio_embeds must be [n, {self.config.decoder.dim}], got {audio_embeds.shape}")
        if len(token_ids) > audio_embeds.shape[0]:
            raise ValueError(f"{len(token_ids)} tokens but only {audio_embeds.shape[0]} audio embeddings")
        state = self.runtime.new_state(self.config.delay_tokens(delay_ms))
        try:
            self.runtime.add_embeddings(state, audio_embeds[:len(token_ids)])
            return self.runtime.logits(state, token_ids)
        finally:
            self.runtime.release(state)


def default_backend() -> str:
    """"auto": MLX on Apple Silicon when it is installed, else PyTorch."""
    apple_silicon = platform.system() == "Darwin" and platform.machine() == "arm64"
    return "mlx" if apple_silicon and importlib.util.find_spec("mlx") is not None else "torch"


TORCH_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
MLX_DEVICES = ("cpu", "gpu")


def check_options(*, backend: str, device: str | None, quantize: str | None, compile: bool) -> str:
    """Refuse options the backend cannot take, before any checkpoint is opened; returns the backend
    ("auto" resolved). Cheap: the CLI runs it before it loads anything."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if backend == "auto":
        backend = default_backend()
    if backend == "mlx":
        if compile:
            raise ValueError("compile=True is for the torch backend")
        if device is not None and device not in MLX_DEVICES:
            raise ValueError(f"the MLX backend runs on device 'cpu' or 'gpu', got {device!r}")
        return backend
    if quantize == "int6":
        raise ValueError("quantize='int6' is not available on the torch backend (int8 or int4; int6 is MLX only)")
    if device is None:
        return backend
    if not TORCH_DEVICE.fullmatch(device):
        hint = " ('gpu' is the MLX backend's name; with torch it is 'cuda')" if device == "gpu" else ""
        raise ValueError(f"the torch backend runs on device 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}{hint}")
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available to this torch "
                             f"({torch.__version__})")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available")
    return backend


def load(source: str | os.PathLike | None = None, *, backend: str = "auto", device: str | None = None,
         dtype: str | None = None, quantize: str | None = None, kv_dtype: str | None = None,
         max_draft: int | None = None, drafts: bool = True, compile: bool = False) -> Model:
    """Load a checkpoint (local directory or Hugging Face repo id; default the official model).

    ``quantize`` "int8" | "int4": weight-only quantization at load (or the mode of a checkpoint
    written by ``voxlive convert``). ``kv_dtype`` None | "int8": the KV caches in the activation
    dtype or in int8 (half the memory of bf16, see the README). ``max_draft``: the most drafted
    tokens a decode step may verify per stream (the decoder's KV pool holds that many positions
    beyond its window; None: 8). ``drafts``: whether streams guess and verify several tokens per
    decoder pass by default (``Model.stream``; the tokens are the same either way). ``compile``: run
    the decode step through torch.compile with
    static shapes (slow to start; pays on GPUs more than on small CPUs, see the README).
    """
    backend = check_options(backend=backend, device=device, quantize=quantize, compile=compile)
    if backend == "mlx":
        try:
            from .backends.mlx.runtime import MLXRuntime
        except ImportError as e:
            raise ImportError(f"the MLX backend needs mlx ({e}): pip install mlx (or pip install '.[mlx]' in "
                              f"voxlive's folder)") from e
        ckpt = open_checkpoint(source)
        if ckpt.quantize is not None:
            raise CheckpointError(f"{ckpt.directory}: a torch-quantized checkpoint (voxlive convert) is read by the "
                                  f"torch backend only")
        tokenizer = Tokenizer(ckpt.tokenizer_path)
        runtime = MLXRuntime(ckpt, pad_id=tokenizer.streaming_pad, device=device, dtype=dtype, quantize=quantize,
                             kv_dtype=kv_dtype, max_draft=max_draft)
        return Model(runtime, tokenizer, str(ckpt.directory), drafts=drafts)
    from .backends.torch.runtime import TorchRuntime

    ckpt = open_checkpoint(source)
    if ckpt.packed:
        raise CheckpointError(f"{ckpt.directory}: an MLX-quantized checkpoint ({ckpt.layout} layout) is read by the "
                              f"MLX backend only (backend='mlx')")
    tokenizer = Tokenizer(ckpt.tokenizer_path)
    runtime = TorchRuntime(ckpt, pad_id=tokenizer.streaming_pad, device=device, dtype=dtype, quantize=quantize,
                           kv_dtype=kv_dtype, max_draft=max_draft, compile=compile)
    return Model(runtime, tokenizer, str(ckpt.directory), drafts=drafts)
