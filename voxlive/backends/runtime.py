"""The runtime contract both backends implement, and everything in it that is not tensor maths.

A runtime owns the weights and two KV slot pools (encoder and decoder, ``pool.py`` of each
backend). A stream's state is its slot in each pool, its conv tails and its queue of audio
embeddings waiting for the decoder. The session layer (``voxlive.session``) drives it:

- ``encode_batch`` turns whole tokens of log-mel frames of several streams into queued audio
  embeddings, one batched encoder pass per round of at most ``encode_block_tokens`` per stream;
- ``decode`` feeds each stream one or several tokens at its next positions (each position adds the
  next queued audio embedding), in ONE batched pass, and returns per fed position the greedy token,
  the margin of ``[STREAMING_PAD]``'s logit over the best other token, that best other token, and
  the greedy token's log-probability; the pools advance by what was fed (the runtime commits, never
  the caller);
- ``rewind`` undoes the last positions of a stream's last ``decode`` exactly (drafted tokens that a
  verification rejected), ``clone_state`` forks a stream, ``release`` frees its slots (dropping the
  state does too).

``BaseRuntime`` implements the contract once; a backend subclass supplies only the tensor maths
(the ``_`` methods at the end). The attributes a runtime has: ``backend`` ("torch" | "mlx"),
``config``, ``device``, ``dtype``, ``quantize`` (None | "int8" | "int4" | "int6": the mode the
weights are in, requested or read from a quantized checkpoint), ``kv_dtype`` ("bfloat16" or the
activation dtype's name | "int8"), ``max_draft``, ``pad_id`` and ``row_cost`` (what each row of
a decoder pass beyond the first costs, relative to a one-row pass: the drafts' adaptive length
weighs acceptance against it).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..checkpoint import Checkpoint, CheckpointError
from ..config import ModelConfig
from ..drafts import ROW_COST
from .pending import take_rows

# Positions of one stream run through the decoder at most this many at a time (a long prompt or
# teacher forcing): bounded attention memory, and still large GEMMs.
DECODE_BLOCK = 256
# Drafted tokens a verification may feed after a stream's last token; the decoder pool keeps this
# many positions beyond the window, so rejected positions never overwrite live ones.
MAX_DRAFT = 8


@dataclass
class Decoded:
    """What one stream's fed positions gave, one entry per position that asked for a result.

    ``tokens``: the greedy token; ``pad_margins``: ``logit[STREAMING_PAD] - max(other logits)``
    (positive: pad wins); ``best_other``: the best token that is not ``[STREAMING_PAD]`` (what a
    penalty on the pad logit larger than the margin would emit instead); ``logprobs``: the greedy
    token's log-probability, ``logit[token] - logsumexp(logits)`` over the whole vocabulary in
    float32, of the model's own logits (no penalty applied: see ``probability``).
    """

    tokens: list[int]
    pad_margins: list[float]
    best_other: list[int]
    logprobs: list[float]

    def probability(self, i: int, token: int) -> float:
        """The model's probability of ``token`` at result ``i``: the greedy token, or the best other
        (the two a session chooses between).

        Of the model's own distribution, never of one with the blank-rut penalty applied: it says how
        much the model believes the text, and a token the penalty forced out of a rut is one the model
        itself put below a pad (so it is reported as unlikely, which it is). It depends on the logits
        alone, so drafted and stepwise decoding, and every chunking, give it alike. The best other's
        needs no second log-softmax: where it differs from the greedy token the greedy one is the pad,
        and ``logit[pad] - logit[best_other]`` is the margin.
        """
        if token == self.tokens[i]:
            return math.exp(self.logprobs[i])
        if token == self.best_other[i]:
            return math.exp(self.logprobs[i] - self.pad_margins[i])
        raise ValueError(f"result {i} has the probabilities of {self.tokens[i]} and {self.best_other[i]}, not {token}")


@dataclass(eq=False)
class StreamState:
    """Everything one stream keeps between calls; drop it and the stream's slots are free again."""

    conv: Any  # the backend's ConvState: the causal convolutions' left context
    encoder_slot: int
    decoder_slot: int
    ffn_scales: Any  # [n_layers, dim], from the stream's delay
    pending: list = field(default_factory=list)  # audio embeddings not yet decoded
    fed: list = field(default_factory=list)  # embeddings of the last decode's positions (for rewind)


class Runtime(Protocol):
    """The contract of a backend's runtime (both implement it through ``BaseRuntime``)."""

    backend: str
    config: ModelConfig
    quantize: str | None
    kv_dtype: str
    max_draft: int
    pad_id: int
    row_cost: float
    encode_block_tokens: int

    def new_state(self, delay_tokens: int, *, position: int = 0) -> StreamState: ...

    def clone_state(self, state: StreamState) -> StreamState: ...

    def release(self, state: StreamState) -> None: ...

    def encode(self, state: StreamState, mel: np.ndarray) -> int: ...

    def encode_batch(self, states: Sequence[StreamState], mels: Sequence[np.ndarray]) -> list[int]: ...

    def add_embeddings(self, state: StreamState, embeds: np.ndarray) -> None: ...

    def take_embeddings(self, state: StreamState) -> np.ndarray: ...

    def decode(self, states: Sequence[StreamState], feeds: Sequence[Sequence[int]], *,
               outputs: Sequence[int] | None = None) -> list[Decoded]: ...

    def rewind(self, state: StreamState, n: int) -> None: ...

    def logits(self, state: StreamState, tokens: Sequence[int]) -> np.ndarray: ...

    def position(self, state: StreamState) -> int: ...

    def synchronize(self) -> None: ...


def pick_quantize(requested: str | None, stored: str | None, modes: Sequence[str], backend: str,
                  ckpt: Checkpoint) -> str | None:
    """The quantization a runtime loads: a quantized checkpoint's own mode, else the requested one."""
    if requested is not None and requested not in modes:
        others = "; int6 is MLX only" if requested == "int6" else ""
        raise ValueError(f"quantize={requested!r} is not available on the {backend} backend (it has "
                         f"{tuple(modes)}{others})")
    if stored is not None and requested not in (None, stored):
        raise CheckpointError(f"{ckpt.directory}: a checkpoint already quantized to {stored} cannot be loaded as "
                              f"{requested}; load it as it is, or convert the float checkpoint to {requested}")
    return requested or stored


def pick_dtype(dtype: str | None, dtypes: dict, default: str):
    name = default if dtype is None else dtype
    if name not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    return dtypes[name]


def pick_kv_dtype(kv_dtype: str | None) -> str | None:
    """None: the activation dtype; "int8": int8 with a scale per head and position."""
    if kv_dtype not in (None, "int8"):
        raise ValueError(f"kv_dtype must be None (the activation dtype) or 'int8', got {kv_dtype!r}")
    return kv_dtype


class BaseRuntime:
    """The contract written once; subclasses provide the tensor maths and the pools."""

    backend: str
    row_cost: float = ROW_COST  # a backend that measured its kernels says better

    def _setup(self, config: ModelConfig, pad_id: int, max_draft: int | None) -> None:
        max_draft = MAX_DRAFT if max_draft is None else max_draft
        if max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {max_draft}")
        self.config = config
        self.pad_id = pad_id
        self.max_draft = max_draft
        # Encode at most about half an encoder window of frames at a time: bounded attention memory
        # on long files, and still large GEMMs.
        self.encode_block_tokens = max(1, config.encoder.sliding_window // (2 * config.downsample_factor))

    # -- per-stream state -------------------------------------------------------------------------

    def new_state(self, delay_tokens: int, *, position: int = 0) -> StreamState:
        """A fresh stream whose next decoder position is ``position`` (its encoder's is
        ``position * downsample_factor``): 0 for a stream, later only to test or measure positions."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        state = StreamState(conv=self._new_conv(),
                            encoder_slot=self.encoder_pool.acquire(position * self.config.downsample_factor),
                            decoder_slot=self.decoder_pool.acquire(position),
                            ffn_scales=self._ffn_scales(delay_tokens))
        self._own(state)
        return state

    def clone_state(self, state: StreamState) -> StreamState:
        """An independent copy (fork): new slots holding copies of the stream's keys and values."""
        new = StreamState(conv=self._copy_conv(state.conv),
                          encoder_slot=self.encoder_pool.copy_slot(state.encoder_slot),
                          decoder_slot=self.decoder_pool.copy_slot(state.decoder_slot),
                          ffn_scales=state.ffn_scales,  # never written
                          pending=list(state.pending),  # queued arrays are never written in place
                          fed=list(state.fed))
        self._own(new)
        return new

    def _own(self, state: StreamState) -> None:
        # The slots go back to the pools when the state is released or dropped, whichever is first.
        state._release = weakref.finalize(state, _free, self.encoder_pool, state.encoder_slot,
                                          self.decoder_pool, state.decoder_slot)

    def release(self, state: StreamState) -> None:
        """Free the stream's slots now (the state must not be used again)."""
        state._release()

    def position(self, state: StreamState) -> int:
        """The stream's next decoder position (positions fed so far, plus its start)."""
        return self.decoder_pool.length(state.decoder_slot)

    # -- audio ------------------------------------------------------------------------------------

    def encode(self, state: StreamState, mel: np.ndarray) -> int:
        """Encode whole tokens of log-mel frames [n_mels, k * 8]; queue k audio embeddings. Returns k."""
        return self.encode_batch([state], [mel])[0]

    def encode_batch(self, states: Sequence[StreamState], mels: Sequence[np.ndarray]) -> list[int]:
        """``encode`` for several streams at once: one pass of the encoder weights for all their frames.

        Long inputs go in rounds of at most ``encode_block_tokens`` per stream; each round batches
        every stream that still has frames.
        """
        per_token = 2 * self.config.downsample_factor
        for mel in mels:
            if mel.ndim != 2 or mel.shape[0] != self.config.audio.n_mels:
                raise ValueError(f"encode takes log-mel frames [{self.config.audio.n_mels}, n], got {mel.shape}")
            if mel.shape[1] % per_token:
                raise ValueError(f"encode takes whole tokens of {per_token} mel frames, got {mel.shape[1]}")
        block = self.encode_block_tokens * per_token
        rounds = max((mel.shape[1] + block - 1) // block for mel in mels) if mels else 0
        for r in range(rounds):
            chunks = [(s, mel[:, r * block:(r + 1) * block]) for s, mel in zip(states, mels) if mel.shape[1] > r * block]
            embeds = self._encode([s for s, _ in chunks], [np.ascontiguousarray(m, dtype=np.float32) for _, m in chunks])
            for (s, _), e in zip(chunks, embeds):
                s.pending.append(e)
        return [mel.shape[1] // per_token for mel in mels]

    def add_embeddings(self, state: StreamState, embeds: np.ndarray) -> None:
        """Queue externally computed audio embeddings [n, dim] (teacher forcing, research)."""
        state.pending.append(self._from_numpy(np.asarray(embeds, dtype=np.float32)))

    def take_embeddings(self, state: StreamState) -> np.ndarray:
        """All queued audio embeddings as float32 numpy [n, dim], removing them from the queue."""
        rows = take_rows(state.pending, sum(a.shape[0] for a in state.pending))
        return self._to_numpy(self._concat(rows)) if rows else np.zeros((0, self.config.decoder.dim), np.float32)

    # -- decoder ----------------------------------------------------------------------------------

    def decode(self, states: Sequence[StreamState], feeds: Sequence[Sequence[int]], *,
               outputs: Sequence[int] | None = None) -> list[Decoded]:
        """Feed each stream its tokens at its next positions, all streams in one batched pass.

        ``feeds[b]``: the tokens of stream b's next ``len(feeds[b])`` positions (at least one; each
        position also takes the stream's next queued audio embedding). ``outputs[b]``: how many of
        the LAST fed positions return a result (default all; 0 for prompt positions that predict
        nothing). Feeds longer than ``DECODE_BLOCK`` run in several passes.
        """
        feeds = [[int(t) for t in f] for f in feeds]
        outputs = [len(f) for f in feeds] if outputs is None else [int(n) for n in outputs]
        if len(states) != len(feeds) or len(outputs) != len(feeds):
            raise ValueError(f"{len(states)} states, {len(feeds)} feeds and {len(outputs)} output counts")
        if len({id(s) for s in states}) != len(states):
            raise ValueError("a stream appears twice in one decode call")
        for s, f, n in zip(states, feeds, outputs):
            if not f:
                raise ValueError("every stream in a decode call feeds at least one token")
            if not 0 <= n <= len(f):
                raise ValueError(f"outputs must be between 0 and the tokens fed ({len(f)}), got {n}")
            if sum(a.shape[0] for a in s.pending) < len(f):
                raise RuntimeError("decoding a position whose audio has not been encoded")
        for s, f in zip(states, feeds):
            s.fed = take_rows(s.pending, len(f))
        results = [Decoded([], [], [], []) for _ in states]
        done = [0] * len(states)
        while True:
            batch = [b for b in range(len(states)) if done[b] < len(feeds[b])]
            if not batch:
                break
            parts, want = [], []
            for b in batch:
                n = min(DECODE_BLOCK, len(feeds[b]) - done[b])
                parts.append((done[b], n))
                first_out = len(feeds[b]) - outputs[b]
                want.append(max(0, done[b] + n - max(first_out, done[b])))
            embeds = [self._concat(_rows(states[b].fed, lo, n)) for b, (lo, n) in zip(batch, parts)]
            stats = self._decode([states[b] for b in batch], embeds,
                                 [feeds[b][lo:lo + n] for b, (lo, n) in zip(batch, parts)], want)
            for b, (lo, n), got in zip(batch, parts, stats):
                results[b].tokens += got.tokens
                results[b].pad_margins += got.pad_margins
                results[b].best_other += got.best_other
                results[b].logprobs += got.logprobs
                done[b] += n
        return results

    def rewind(self, state: StreamState, n: int) -> None:
        """Undo the last ``n`` positions of the stream's last ``decode``: its pool slot forgets
        them and their audio embeddings go back to the front of its queue."""
        fed = sum(a.shape[0] for a in state.fed)
        if not 0 <= n <= fed:
            raise ValueError(f"rewind: the last decode fed {fed} positions, cannot undo {n}")
        if n > self.max_draft + 1:
            raise ValueError(f"rewind: at most max_draft + 1 = {self.max_draft + 1} positions, got {n}")
        if n:
            self.decoder_pool.rewind([state.decoder_slot], n)
            back = _rows(state.fed, fed - n, n)
            state.fed = _rows(state.fed, 0, fed - n)
            state.pending[:0] = back

    def logits(self, state: StreamState, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [n, vocab] float32 for n positions."""
        tokens = [int(t) for t in tokens]
        rows = take_rows(state.pending, len(tokens))
        out = []
        for lo in range(0, len(tokens), DECODE_BLOCK):
            chunk = tokens[lo:lo + DECODE_BLOCK]
            hidden = self._hidden([state], [self._concat(_rows(rows, lo, len(chunk)))], [chunk], [len(chunk)])
            out.append(self._to_numpy(self._logits(hidden)))
        return np.concatenate(out) if out else np.zeros((0, self.config.decoder.vocab_size), np.float32)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""

    def _decode(self, states, embeds, feeds, want) -> list[Decoded]:
        hidden = self._hidden(states, embeds, feeds, want)
        if not sum(want):
            return [Decoded([], [], [], []) for _ in want]
        columns = self._greedy(self._logits(hidden))
        out, row = [], 0
        for n in want:
            out.append(Decoded(*(c[row:row + n].tolist() for c in columns)))
            row += n
        return out

    # -- the tensor maths each backend supplies ----------------------------------------------------
    # encoder_pool, decoder_pool: the backend's KVPool instances.
    # _new_conv() / _copy_conv(conv): a stream's conv tails.
    # _ffn_scales(delay_tokens): its delay-conditioned FFN scales [n_layers, dim].
    # _encode(states, mels): one batched encoder + adapter pass -> per stream its embeddings [k, dim].
    # _hidden(states, embeds, feeds, want): one batched decoder pass over the fed positions (embeds
    #   [n_b, dim] + token embeddings), advancing the pool -> final hidden states of the last want[b]
    #   positions of each stream, stacked [sum want, dim].
    # _logits(hidden) -> [m, vocab]; _greedy(logits) -> numpy (tokens, pad margins, best others,
    #   log-probabilities of the tokens: the logit minus the row's logsumexp, both in float32).
    # _from_numpy / _to_numpy / _concat: arrays in and out.


def _rows(pieces: list, lo: int, n: int) -> list:
    """Rows lo .. lo + n of a list of [k, dim] arrays, as pieces (sliced, never copied here)."""
    out, at = [], 0
    for a in pieces:
        k = a.shape[0]
        a_lo, a_hi = max(lo - at, 0), min(lo + n - at, k)
        if a_lo < a_hi:
            out.append(a if (a_lo, a_hi) == (0, k) else a[a_lo:a_hi])
        at += k
    return out


def _free(encoder_pool, encoder_slot: int, decoder_pool, decoder_slot: int) -> None:
    encoder_pool.release(encoder_slot)
    decoder_pool.release(decoder_slot)
