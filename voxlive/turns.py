"""Turns: when a speaker starts and stops, and one final text per turn, the same for every dialect.

Two kinds of evidence meet here, both on the clock of the input audio:

- the VAD's speech probability per 32 ms frame (``voxlive.vad``): a frame at or above
  ``start_threshold`` is speech; after speech, the first frame below ``end_threshold`` starts a
  silence, and a silence that lasts ``min_silence_ms`` (no frame back at ``start_threshold``)
  ends the turn (reason ``threshold``). Frames between the two thresholds keep the current state,
  so a fading word neither ends nor restarts a turn. ``end_timeout_ms`` ends a turn whose frames
  hover between the thresholds that long after the last speech frame (reason ``timeout``).
- the model's tokens: token ``j`` of a stream speaks about the audio frame ``[0.08 j, 0.08 j +
  0.08)`` (see ``voxlive.words``). The model's own sign that the speaker stopped is a run of
  ``[STREAMING_PAD]`` after its last word: once the VAD's probability has fallen below
  ``eager_end_threshold`` and every token the model has produced for the quiet audio is a pad,
  the turn has an *eager end* (the speaker has probably finished: a voice agent may start
  preparing its answer). Speech before the turn ends *resumes* it; the turn's end confirms.

A turn's final text is the model's output for the audio up to the turn's end: the tokens
``[previous boundary, ceil(end / 0.08))`` where ``end`` is the moment the silence reached
``min_silence_ms``; they are in once the stream has decoded that audio plus its delay, which happens
by itself while audio (silence) keeps coming. The text between two turns belongs to the next turn,
so the finals of a session, in order, are exactly the stream's tokens: nothing is lost or repeated.

A forced final (a client's flush, commit or Finalize) cuts the text where the audio received so far
ends: the engine forks the stream, pads and decodes the fork (as ``finish()`` does) and hands back
its tokens; they close the current segment, and the main stream goes on untouched. The fork's tokens
past the cut speak about padding, the main stream's about the audio that came after the cut: the
main stream's tokens from the cut's index on start the next segment, those before it (already
covered by the fork) are dropped. So each final equals offline ``transcribe`` of the audio up to its
end over its range of tokens, and the deltas add up to the finals.

Events come out in audio order. A turn's end waits for its text, and whatever happened after it
(the next turn's start) waits behind it, so a client never sees a turn start before the previous
one ended.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from dataclasses import dataclass, field

from .vad import FRAME_SECONDS


@dataclass(frozen=True)
class TurnSettings:
    """Per-session knobs (each dialect maps its own onto these)."""

    start_threshold: float = 0.5
    eager_end_threshold: float = 0.5
    end_threshold: float = 0.35  # Silero's own hysteresis: threshold - 0.15
    min_silence_ms: int = 500
    end_timeout_ms: int | None = None
    min_speech_ms: int = 64  # speech this long before a turn starts (two frames): a click is no turn
    utterance_end_ms: int | None = None  # a longer silence after a turn's end: UtteranceEnded

    def check(self) -> None:
        for name in ("start_threshold", "eager_end_threshold", "end_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if not self.start_threshold >= self.eager_end_threshold >= self.end_threshold:
            raise ValueError("thresholds must satisfy start_threshold >= eager_end_threshold >= end_threshold")
        if self.min_silence_ms < 0:
            raise ValueError(f"min_silence_ms must be 0 or more, got {self.min_silence_ms}")
        if self.end_timeout_ms is not None and self.end_timeout_ms < self.min_silence_ms:
            raise ValueError("end_timeout_ms must be at least min_silence_ms")


# -- events (protocol-neutral; times in seconds of the input audio) ---------------------------------

@dataclass
class TurnStarted:
    time: float  # the first speech frame's start


@dataclass
class EagerEnd:
    time: float  # where the speech stopped


@dataclass
class TurnResumed:
    time: float


@dataclass
class UtteranceEnded:
    time: float  # where the speech stopped; the silence since reached utterance_end_ms


@dataclass
class Delta:
    tokens: list[int]  # next tokens of the text, in order
    probabilities: list[float]  # the model's probability of each
    first: int  # token index of tokens[0] (as a Segment's ``first``)


@dataclass
class Segment:
    """A final: the text since the previous one (its tokens are the deltas sent since)."""

    tokens: list[int]
    probabilities: list[float]  # the model's probability of each token (for word confidences)
    first: int  # token index of tokens[0] (for word times: token j starts at 0.08 j)
    start: float
    end: float
    forced: bool  # cut by the client (flush, commit, Finalize)
    ends_turn: bool = False  # closed by a turn's end (else by a cut or the end of the stream)


@dataclass
class TurnEnded:
    time: float  # where the speech stopped (the silence started)
    decided: float  # where the silence reached min_silence_ms (or the timeout)
    reason: str  # "threshold" | "timeout" | "end" (the audio ended inside the turn)


@dataclass
class _End:
    """A turn's end, waiting for the tokens up to ``boundary`` (a main-stream index)."""

    boundary: int
    event: TurnEnded


@dataclass
class _Cut:
    """A forced final, waiting for the engine's fork."""

    samples: int  # 16 kHz samples of audio received when the client asked
    tokens: list[int] | None = None  # the fork's tokens, once in


@dataclass
class _Piece:
    """Main-stream indices from ``main`` on sit at ``at`` + (index - main) on the timeline."""

    main: int
    at: int


@dataclass
class Turns:
    """One session's turn state: feed VAD probabilities, main-stream tokens and forced finals;
    take events."""

    settings: TurnSettings
    is_text: object  # token -> bool (text, not a special token)
    samples_per_token: int = 1280
    sample_rate: int = 16000
    # VAD side
    frames: int = 0
    speaking: bool = False
    _run: int = 0  # consecutive speech frames before a turn starts
    turn_start: float = 0.0
    _last_speech: float = 0.0
    _quiet: float | None = None  # first frame below eager_end_threshold since the last speech frame
    _silent: float | None = None  # first frame below end_threshold since the last speech frame
    _eager_sent: bool = False
    _ended_at: float | None = None  # where the last turn's speech stopped, while no new one started
    # token side
    main_seen: int = 0  # main-stream tokens received
    timeline: list[int] = field(default_factory=list)  # tokens as delivered (cuts spliced in)
    probabilities: array = field(default_factory=lambda: array("f"))  # of each timeline token
    _index: list[int] = field(default_factory=list)  # main-stream index of each timeline token
    _pieces: list[_Piece] = field(default_factory=lambda: [_Piece(0, 0)])
    _drop_below: int = 0  # main tokens below this index were covered by a fork
    _last_cut: int | None = None  # samples of received audio at the last forced final
    _keep_below: int | None = None  # main tokens from this index on were covered by the last fork
    _sent: int = 0  # timeline tokens delivered as deltas
    _segment_from: int = 0  # timeline index where the current segment starts
    _segment_start: float = 0.0
    _queue: deque = field(default_factory=deque)
    _out: list = field(default_factory=list)

    @property
    def token_seconds(self) -> float:
        """Audio per decoder position, from the checkpoint's audio config (0.08 s for Voxtral Realtime)."""
        return self.samples_per_token / self.sample_rate

    # -- input ------------------------------------------------------------------------------------

    def push_probabilities(self, probs) -> list:
        """The VAD's probabilities of the next frames."""
        s = self.settings
        for p in probs:
            t = self.frames * FRAME_SECONDS
            self.frames += 1
            if p >= s.start_threshold:
                self._run += 1
                if not self.speaking and self._run * FRAME_SECONDS * 1000 >= s.min_speech_ms - 1e-6:
                    self.speaking = True
                    self._ended_at = None
                    self.turn_start = t - (self._run - 1) * FRAME_SECONDS
                    self._queue.append(TurnStarted(round(self.turn_start, 3)))
                elif self.speaking and self._eager_sent:
                    self._queue.append(TurnResumed(round(t, 3)))
                    self._eager_sent = False
                if self.speaking:
                    self._last_speech = t + FRAME_SECONDS
                    self._quiet = self._silent = None
                continue
            self._run = 0
            if not self.speaking:
                ended = self._ended_at
                if ended is not None and s.utterance_end_ms is not None \
                        and (t + FRAME_SECONDS - ended) * 1000 >= s.utterance_end_ms - 1e-6:
                    self._queue.append(UtteranceEnded(round(ended, 3)))
                    self._ended_at = None
                continue
            if p < s.eager_end_threshold and self._quiet is None:
                self._quiet = t
            if p < s.end_threshold and self._silent is None:
                self._silent = t
            now = t + FRAME_SECONDS
            if self._silent is not None and (now - self._silent) * 1000 >= s.min_silence_ms - 1e-6:
                self._end(self._silent, now, "threshold")
            elif s.end_timeout_ms is not None and (now - self._last_speech) * 1000 >= s.end_timeout_ms - 1e-6:
                self._end(self._last_speech, now, "timeout")
        self._check_eager()
        return self.take()

    def _end(self, stopped: float, decided: float, reason: str) -> None:
        self.speaking = False
        self._ended_at = stopped
        self._eager_sent = False
        self._quiet = self._silent = None
        boundary = math.ceil(decided / self.token_seconds - 1e-9)
        self._queue.append(_End(boundary, TurnEnded(round(stopped, 3), round(decided, 3), reason)))

    def push_tokens(self, tokens: list[int], probabilities: list[float]) -> list:
        """New main-stream tokens, in order, and the model's probability of each."""
        for token, probability in zip(tokens, probabilities, strict=True):
            index = self.main_seen
            self.main_seen += 1
            if index >= self._drop_below and (self._keep_below is None or index < self._keep_below):
                self.timeline.append(token)
                self.probabilities.append(probability)
                self._index.append(index)
        self._check_eager()
        return self.take()

    def request_cut(self, samples: int) -> None:
        """The client forced a final at ``samples`` (16 kHz) of received audio; the fork's tokens
        come later through ``push_cut``."""
        self._queue.append(_Cut(samples))
        self._last_cut = samples

    def push_cut(self, samples: int, tokens: list[int], probabilities: list[float], forked_at: int) -> list:
        """The fork's tokens, and the model's probability of each, for the cut at ``samples``;
        ``forked_at`` main tokens have been published before it (they equal the fork's first ones).
        Main tokens between those and the fork point come with the fork (the engine holds them back
        while forks are pending)."""
        if len(probabilities) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens and {len(probabilities)} probabilities")
        cut = next(c for c in self._queue if isinstance(c, _Cut) and c.tokens is None and c.samples == samples)
        if forked_at != self.main_seen:
            raise RuntimeError(f"fork taken at {forked_at} tokens, {self.main_seen} received")
        cut.tokens = tokens
        start = max(forked_at, self._drop_below)  # before that, an earlier fork has the text
        at = self._at(start)
        if at != len(self.timeline):
            raise RuntimeError(f"fork spliced at {at}, the timeline has {len(self.timeline)} tokens")
        self.timeline += tokens[start:]
        self.probabilities.extend(probabilities[start:])
        self._index += range(start, len(tokens))
        resume = math.ceil(samples / self.samples_per_token)
        self._pieces.append(_Piece(resume, at + len(tokens) - start))
        self._drop_below = resume
        return self.take()

    def end_of_audio(self, samples: int) -> None:
        """No more audio: a turn still open ends where the audio ends (its text comes with the
        stream's last tokens). If none came after the last forced final, that final's fork padded
        the same audio as the stream's end now does: its tokens past the cut are the stream's last
        ones, already in that final, so the stream's own are not repeated."""
        if samples == self._last_cut:
            self._keep_below = math.ceil(samples / self.samples_per_token)
        if self.speaking:
            t = samples / self.sample_rate
            self._end(self._silent if self._silent is not None else t, t, "end")

    def finish(self) -> list:
        """The stream is complete: deliver the rest and close the last segment."""
        self._pump(final=True)
        return self.take()

    # -- output -----------------------------------------------------------------------------------

    def take(self) -> list:
        self._pump()
        out, self._out = self._out, []
        return out

    def _at(self, main_index: int) -> int:
        """Timeline position of a main-stream index."""
        piece = next(p for p in reversed(self._pieces) if p.main <= main_index)
        return piece.at + main_index - piece.main

    def _check_eager(self) -> None:
        if not self.speaking or self._eager_sent or self._quiet is None:
            return
        first = math.ceil(self._quiet / self.token_seconds - 1e-9)
        if self.main_seen <= first or first < self._drop_below:
            return
        heard = self.timeline[self._at(first):]
        if heard and not any(self.is_text(t) for t in heard):
            self._eager_sent = True
            self._queue.append(EagerEnd(round(self._quiet, 3)))

    def _deliver(self, upto: int) -> None:
        if upto > self._sent:
            self._out.append(Delta(self.timeline[self._sent:upto], self.probabilities[self._sent:upto].tolist(),
                                   self._index[self._sent]))
            self._sent = upto

    def _close(self, upto: int, end: float, forced: bool, ends_turn: bool = False) -> None:
        self._deliver(upto)
        first_main = self._index[self._segment_from] if self._segment_from < len(self._index) else self.main_seen
        self._out.append(Segment(self.timeline[self._segment_from:upto],
                                 self.probabilities[self._segment_from:upto].tolist(), first_main,
                                 round(self._segment_start, 3), round(end, 3), forced, ends_turn))
        self._segment_from = upto
        self._segment_start = end

    def _pump(self, final: bool = False) -> None:
        while self._queue:
            item = self._queue[0]
            if isinstance(item, _End):
                upto = min(self._at(item.boundary), len(self.timeline)) if final else self._at(item.boundary)
                if len(self.timeline) < upto:
                    self._deliver(len(self.timeline))
                    break
                self._close(max(upto, self._segment_from), item.event.decided, forced=False, ends_turn=True)
                self._out.append(item.event)
            elif isinstance(item, _Cut):
                if item.tokens is None:
                    self._deliver(len(self.timeline))  # all of it precedes the cut
                    break
                self._close(len(self.timeline), item.samples / self.sample_rate, forced=True)
            else:
                self._out.append(item)
            self._queue.popleft()
        if not self._queue:
            self._deliver(len(self.timeline))
        if final and not self._queue and (len(self.timeline) > self._segment_from):
            self._close(len(self.timeline), self.main_seen * self.token_seconds, forced=False)
