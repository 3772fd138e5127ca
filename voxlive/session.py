"""Streaming transcription, backend-neutral: padding, prompt, delay, safe frontier, words.

The stream is the left pad (``n_left_pad_tokens`` x 1280 zero samples), then the audio as it
arrives, then at ``finish()`` the right pad (up to a whole token, plus ``delay + 1 + 10`` tokens of
zeros), exactly as the offline reference pads a file. Mel frames are computed on the one
160-sample grid of that padded signal; a token's 8 frames go to the encoder once all their samples
(40 past the token's end) are in; decoder position ``p`` runs only once audio token ``p`` is
encoded. Offline ``transcribe`` is this same algorithm fed in large chunks.

EOS: the token is fed back and decoding continues (as vLLM does), so no audio is dropped after it.

A decode step feeds each ready stream its last token and, when something proposed drafts
(``Stream.propose``, or the stream's ``drafting``: ``voxlive.drafts``) and their audio is encoded,
the drafted tokens of the following positions:
the runtime returns the greedy token of every fed position, the stream accepts the drafts up to
the first that differs from what the model chose and rewinds the rest, so tokens never depend on
the drafts. The token chosen at a position is the greedy one, except in a blank rut (``voxlive.rut``,
``use_rut``): past a long run of pads, ``[STREAMING_PAD]`` loses to the best other token where its
logit margin is below the run's penalty (applied from the margins the runtime returns, without
re-running anything). Drafts compose with it: a drafted position is kept only if it equals that
choice, and the run (hence the penalty) of each position counts the positions accepted before it.
Each accepted token keeps the model's probability of it (``Decoded.probability``: of the model's own
logits, the penalty not applied; from the pass that verified it, which is the stepwise one's to
float rounding), and each word the mean of its tokens' (``voxlive.words``).
Prompt positions are multi-token feeds too, batched across streams (``prefill_prompts``).
"""

from __future__ import annotations

import copy
from array import array
from typing import TYPE_CHECKING

import numpy as np

from .config import ModelConfig
from .drafts import Drafting
from .mel import MelStream
from .rut import Rut, RutGuard, RutPolicy, SpeechTrack
from .tokens import Tokenizer
from .transcript import Transcript, Word
from .words import WordAssembler

if TYPE_CHECKING:  # the backends are imported when a model is loaded, not with the session
    from .backends.runtime import Decoded

RIGHT_PAD_BUFFER_TOKENS = 10  # mistral-common's OFFLINE_STREAMING_BUFFER_TOKENS


class Stream:
    """One live transcription stream. Feed float32 16 kHz mono PCM of any chunk size."""

    def __init__(self, runtime, tokenizer: Tokenizer, config: ModelConfig, *, delay_ms: int | None = None):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.config = config
        self.delay_tokens = config.delay_tokens(delay_ms)
        self.delay_ms = self.delay_tokens * config.audio.ms_per_token
        a = config.audio
        self._per_token = a.samples_per_token
        self._frames_per_token = a.mel_frames_per_token
        self._mel = MelStream(global_log_mel_max=config.encoder.global_log_mel_max, n_mels=a.n_mels)
        self._pending_mel = np.zeros((a.n_mels, 0), dtype=np.float32)
        self.state = runtime.new_state(self.delay_tokens)
        self.prompt = tokenizer.prompt(a.n_left_pad_tokens, self.delay_tokens)
        self.encoded = 0  # audio tokens encoded (left pad included)
        self.decoded = 0  # decoder positions run
        self.tokens: list[int] = []
        self.probabilities = array("f")  # the model's probability of each of ``tokens`` (Decoded.probability)
        self._text = bytearray()  # the text tokens' bytes so far: the transcript is never re-decoded
        self.samples = 0  # input samples received
        self.finished = False  # end_audio() called: no more audio
        self.rut: RutGuard | None = None  # the blank-rut penalty (None: greedy everywhere)
        self.vad = None  # a VadStream run on pushed audio for the rut's speech threshold (None: not here)
        self.last_step: Decoded | None = None  # what the last decode step returned for this stream
        self._drafts: list[int] = []  # proposed tokens for the positions after the next one
        self.drafting: Drafting | None = None  # guesses drafts when none are proposed (None: off)
        self._drafted = 0  # drafts of this step that came from ``drafting``
        self.drafts_fed = 0  # drafted tokens fed so far ...
        self.drafts_accepted = 0  # ... and confirmed by the model
        self._flushed = False
        self._words = WordAssembler(tokenizer, left_pad=a.n_left_pad_tokens, delay=self.delay_tokens,
                                    seconds_per_token=a.ms_per_token / 1000)
        self._new_words: list[Word] = []
        self._push_samples(np.zeros(a.n_left_pad_tokens * self._per_token, dtype=np.float32))
        encode_and_prefill([self])

    def fork(self) -> Stream:
        """An independent copy that goes on from this point.

        Every new stream of a given delay starts from the same state (the silent left pad encoded
        and its prompt positions run), so ``Model.stream`` computes that once and forks it.
        """
        new = copy.copy(self)
        new.state = self.runtime.clone_state(self.state)
        new._mel = copy.deepcopy(self._mel)
        new.tokens = list(self.tokens)
        new.probabilities = array("f", self.probabilities)
        new._drafts = list(self._drafts)
        new._text = bytearray(self._text)
        new.drafting = copy.deepcopy(self.drafting)
        new._words = self._words.copy()
        new.rut = self.rut.copy() if self.rut is not None else None
        new.vad = self.vad.copy() if self.vad is not None else None
        new._new_words = list(self._new_words)
        return new

    # -- audio in ---------------------------------------------------------------------------------

    @property
    def duration(self) -> float:
        return self.samples / self.config.audio.sample_rate

    def push(self, pcm) -> None:
        """Take audio; compute its mel frames. Encoding and decoding wait for ``decode_available``."""
        if self.finished:
            raise RuntimeError("stream already finished")
        pcm = np.asarray(pcm)
        if pcm.ndim != 1:
            raise ValueError(f"expected 1-D mono PCM, got shape {pcm.shape}")
        if not np.issubdtype(pcm.dtype, np.floating):
            raise ValueError(f"expected float PCM in [-1, 1], got dtype {pcm.dtype}")
        pcm = pcm.astype(np.float32, copy=False)
        if not np.isfinite(pcm).all():
            raise ValueError("PCM contains NaN or infinity")
        self.samples += pcm.shape[0]
        if self.vad is not None:
            self.add_speech(self.vad.push(pcm))
        self._push_samples(pcm)

    def _push_samples(self, pcm: np.ndarray) -> None:
        self._add_frames(self._mel.push(pcm))

    def _add_frames(self, frames: np.ndarray) -> None:
        if frames.shape[1]:
            self._pending_mel = np.concatenate((self._pending_mel, frames), axis=1)

    def _take_whole_tokens(self) -> np.ndarray:
        """The mel frames of every audio token complete and not yet encoded (removed from the queue)."""
        whole = self._pending_mel.shape[1] - self._pending_mel.shape[1] % self._frames_per_token
        mel, self._pending_mel = self._pending_mel[:, :whole], self._pending_mel[:, whole:]
        return mel

    @property
    def backlog(self) -> int:
        """Audio tokens received (whole, left pad included) and not yet decoded."""
        return self.encoded + self._pending_mel.shape[1] // self._frames_per_token - self.decoded

    # -- decoding ---------------------------------------------------------------------------------

    @property
    def can_decode(self) -> bool:
        """Whether a decode step can run now (its audio token is encoded)."""
        return self.decoded >= len(self.prompt) and self.decoded < self.encoded

    @property
    def can_prepare(self) -> bool:
        """Whether there are complete audio tokens to encode or encoded prompt positions to run."""
        whole = self._pending_mel.shape[1] >= self._frames_per_token
        return whole or self.decoded < min(self.encoded, len(self.prompt))

    @property
    def transcribed(self) -> float:
        """Seconds of input audio whose tokens have been decoded (the left pad not counted)."""
        step = self.config.audio.ms_per_token / 1000
        return max(0, self.decoded - len(self.prompt) + 1) * step

    def _prompt_feed(self) -> tuple[list[int], bool]:
        """The prompt tokens whose audio is encoded and not yet run, and whether they end the prompt.

        Those over the silent left pad run as soon as the stream is created (all but the last,
        whose last mel frame reaches 2.5 ms into the audio); the rest wait for real audio, and the
        last of all predicts the first token.
        """
        end = min(self.encoded, len(self.prompt))
        return self.prompt[self.decoded:end], end == len(self.prompt)

    def propose(self, drafts: list[int]) -> None:
        """Tokens expected after the next one (e.g. from a draft model): the next decode step also
        feeds those whose audio is encoded, and keeps each only if the model agrees."""
        self._drafts = [int(t) for t in drafts]

    def use_drafting(self, drafting: Drafting | None) -> None:
        """Draft with ``drafting`` from now on (None: only what ``propose`` gives); it first sees the
        tokens emitted so far."""
        self.drafting = drafting
        if drafting is not None:
            for token in self.tokens:
                drafting.observe(token)

    def use_rut(self, policy: RutPolicy | None, *, vad=None, speech: bool = False) -> None:
        """Break blank ruts with ``policy`` from the next position on (None: pure greedy).

        Its speech threshold needs VAD probabilities of the input: ``vad`` (a ``VadStream``) is run
        on every pushed chunk; ``speech=True`` instead expects them through ``add_speech`` (a server
        computes them beside its event loop, off the engine thread). Neither: the plain threshold only.
        Speech is on the clock of the input, so it is chosen before the first audio.
        """
        if self.samples and (vad is not None or speech):
            raise RuntimeError("the rut's speech source is set before the stream's first audio")
        self.vad = vad
        if policy is None:
            self.rut = None
            return
        policy.check()
        track = None
        if (vad is not None or speech) and policy.speech_after is not None:
            track = SpeechTrack(self._per_token, policy.speech_threshold)
        self.rut = RutGuard(policy, pad=self.tokenizer.streaming_pad, offset=self._words.offset,
                            seconds_per_token=self.config.audio.ms_per_token / 1000, speech=track)

    def add_speech(self, probs) -> None:
        """VAD speech probabilities of the next 32 ms frames of the input (``voxlive.vad``'s frames)."""
        if self.rut is not None and self.rut.speech is not None:
            self.rut.speech.add(probs)

    @property
    def pad_penalty(self) -> float:
        """What ``[STREAMING_PAD]``'s logit loses at the next position (0 outside a long pad run)."""
        return self.rut.penalty() if self.rut is not None else 0.0

    def _step_feed(self) -> list[int]:
        room = max(0, min(self.encoded - self.decoded - 1, self.runtime.max_draft))
        self._drafted = 0
        if not self._drafts and self.drafting is not None and room:
            self._drafts = self.drafting.draft(room)[:room]
            self._drafted = len(self._drafts)
        return [self.tokens[-1]] + self._drafts[:room]

    def choose(self, decoded: Decoded, i: int) -> int:
        """The token of fed position i: greedy, or the best other where a pad wins by less than the
        penalty (that of the position after those accepted so far)."""
        token = decoded.tokens[i]
        if token == self.tokenizer.streaming_pad and decoded.pad_margins[i] < self.pad_penalty:
            return decoded.best_other[i]
        return token

    def _take_step(self, feed: list[int], decoded: Decoded) -> None:
        """Accept the fed positions whose input was right; rewind the rest."""
        self.last_step = decoded
        accepted = 0
        while accepted < len(feed):
            token = self.choose(decoded, accepted)
            self._accept(token, decoded.probability(accepted, token), self.decoded + accepted,
                         broke=token != decoded.tokens[accepted])
            accepted += 1
            if accepted == len(feed) or feed[accepted] != token:
                break
        if accepted < len(feed):
            self.runtime.rewind(self.state, len(feed) - accepted)
        self.drafts_fed += len(feed) - 1
        self.drafts_accepted += accepted - 1
        if self.drafting is not None:
            self.drafting.update(self._drafted, accepted - 1 if self._drafted else 0)
        self._drafts = self._drafts[len(feed) - 1:] if accepted == len(feed) else []
        self.decoded += accepted

    def _accept(self, token: int, probability: float, position: int, *, broke: bool = False) -> None:
        if self.rut is not None:
            self.rut.accepted(token, position, broke=broke)
        self.tokens.append(token)
        self.probabilities.append(probability)
        self._text += self.tokenizer.token_bytes(token)
        if self.drafting is not None:
            self.drafting.observe(token)
        self._new_words += self._words.push(token, position, self.duration, probability=self.probabilities[-1])

    @property
    def partial_word(self) -> str:
        """The text of the word being spoken: tokens emitted since the last word boundary."""
        return self._words.partial

    @property
    def ruts(self) -> int:
        """Blank ruts the penalty has broken so far."""
        return self.rut.count if self.rut is not None else 0

    def take_ruts(self) -> list[Rut]:
        """The ruts broken since the last call (``voxlive.rut.Rut``)."""
        return self.rut.take() if self.rut is not None else []

    def take_words(self) -> list[Word]:
        words, self._new_words = self._new_words, []
        return words

    def feed(self, pcm) -> list[Word]:
        """Take audio, decode every position it makes ready, return the words completed."""
        self.push(pcm)
        decode_available([self])
        return self.take_words()

    def end_audio(self) -> None:
        """No more audio: queue the right pad. Decoding it is left to ``decode_available``/``decode_step``."""
        if not self.finished:
            pad = -self.samples % self._per_token
            pad += (self.delay_tokens + 1 + RIGHT_PAD_BUFFER_TOKENS) * self._per_token
            self._push_samples(np.zeros(pad, dtype=np.float32))
            self._add_frames(self._mel.finish())
            self.finished = True

    def finish(self) -> Transcript:
        """Right-pad, decode to the end, and return the whole stream's transcript."""
        self.end_audio()
        decode_available([self])
        return self.complete()

    def complete(self) -> Transcript:
        """Once the right pad is decoded: release the last word and return the whole transcript."""
        if not self._flushed:
            self._new_words += self._words.flush(self.duration)
            self._flushed = True
        return self.transcript()

    def transcript(self) -> Transcript:
        # The first word's token carries the space before it; the text starts at the first word.
        return Transcript(text=self._text.decode("utf-8", errors="replace").strip(), words=list(self._words.words),
                          tokens=list(self.tokens), duration=self.duration, delay_ms=self.delay_ms,
                          ruts=list(self.rut.broken) if self.rut is not None else [])


def encode_pending(streams: list[Stream]) -> None:
    """Encode every complete audio token of the streams, all streams in one batched encoder pass."""
    work = [(s, s._take_whole_tokens()) for s in streams]
    work = [(s, mel) for s, mel in work if mel.shape[1]]
    if work:
        counts = work[0][0].runtime.encode_batch([s.state for s, _ in work], [mel for _, mel in work])
        for (s, _), n in zip(work, counts):
            s.encoded += n


def prefill_prompts(streams: list[Stream]) -> None:
    """Run the prompt positions whose audio is encoded, all streams in one batched pass."""
    work = [(s, *s._prompt_feed()) for s in streams]
    work = [(s, feed, done) for s, feed, done in work if feed]
    if work:
        out = work[0][0].runtime.decode([s.state for s, _, _ in work], [feed for _, feed, _ in work],
                                        outputs=[int(done) for _, _, done in work])
        for (s, feed, done), decoded in zip(work, out):
            s.decoded += len(feed)
            if done:
                s.last_step = decoded
                token = s.choose(decoded, 0)
                s._accept(token, decoded.probability(0, token), s.decoded - 1, broke=token != decoded.tokens[0])


def decode_step(streams: list[Stream]) -> list[Stream]:
    """One batched decode step for every stream that is ready; returns those that advanced.

    Streams join and leave the batch between steps as their audio allows; each step reads the
    decoder's weights once for the whole batch, whatever each stream feeds (one token or drafts).
    """
    batch = [s for s in streams if s.can_decode]
    if batch:
        feeds = [s._step_feed() for s in batch]
        out = batch[0].runtime.decode([s.state for s in batch], feeds)
        for s, feed, decoded in zip(batch, feeds, out):
            s._take_step(feed, decoded)
    return batch


def encode_and_prefill(streams: list[Stream]) -> None:
    """Encode the streams' new audio (one batched pass) and run the prompt positions it allows (another)."""
    encode_pending(streams)
    prefill_prompts(streams)


def decode_available(streams: list[Stream]) -> None:
    """``encode_and_prefill``, then batched decode steps until no stream has a position whose audio is in."""
    encode_and_prefill(streams)
    while decode_step(streams):
        pass
