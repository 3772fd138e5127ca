"""Blank ruts: a stream stuck on ``[STREAMING_PAD]`` over speech, and the penalty that gets it out.

A rut (vLLM #47614) is the model emitting ``[STREAMING_PAD]`` at every position for minutes over
real speech, while everything looks healthy; the audio of the hole is lost. What tells a rut from
silence is the pad's logit margin over the best other token: #47614 measured +3.5 to +6.6 in ruts
and +8.5 or more over true silence. The remedy, as vLLM PR #47615 calibrated it on real audio: once
a run of pads exceeds ``after`` positions, the pad's logit loses ``min(cap, slope * (run - after))``
(defaults 200, 0.5, 7.0: a rut breaks within 14 positions of the threshold, and a penalty capped
below +8.5 cannot turn true silence into text). Where the voice activity detector says the audio is
speech the threshold is tighter: ``speech_after`` pad positions over speech frames of the current
run (default 50, 4 s: a word's text comes at most the longest delay, 2.4 s = 30 positions, after
it is spoken, so 4 s of speech without any text is no pause), whichever threshold is passed first.

A penalised step is still one greedy step: the runtime returns per position the greedy token, the
pad's margin and the best other token, and the penalty only decides between those two (nothing is
re-decoded, nothing skipped; a drafted position is accepted only if it equals the penalised
choice). Each run the penalty breaks is a ``Rut`` event, counted and reported to clients.

What this does to real speech cannot be measured here: that needs the real weights and audio that
ruts. The calibration is vLLM's, not this project's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .vad import FRAME


@dataclass(frozen=True)
class RutPolicy:
    """When and how hard the pad logit is penalised (a session's setting; None: no penalty)."""

    after: int = 200  # pad positions in a run before the penalty starts
    speech_after: int | None = 50  # pad positions over VAD speech before it starts (None: no VAD)
    slope: float = 0.5  # logit penalty added per position past the threshold
    cap: float = 7.0  # the most the pad logit loses (below true silence's +8.5)
    speech_threshold: float = 0.5  # a token is speech when a VAD frame over it reaches this

    def check(self) -> RutPolicy:
        if self.after < 0 or (self.speech_after is not None and self.speech_after < 0):
            raise ValueError("the rut thresholds (after, speech_after) must be 0 or more positions")
        if not (self.slope > 0 and self.cap > 0) or not np.isfinite([self.slope, self.cap]).all():
            raise ValueError(f"the rut penalty's slope and cap must be positive numbers, got {self.slope}, {self.cap}")
        if not 0.0 <= self.speech_threshold <= 1.0:
            raise ValueError(f"speech_threshold must be between 0 and 1, got {self.speech_threshold}")
        return self

    def penalty(self, run: int, speech_run: int) -> float:
        """The pad logit's penalty at a position after ``run`` pads, ``speech_run`` of them over speech."""
        over = run - self.after
        if self.speech_after is not None:
            over = max(over, speech_run - self.speech_after)
        return min(self.cap, self.slope * over) if over > 0 else 0.0


DEFAULT_POLICY = RutPolicy()


@dataclass(frozen=True)
class Rut:
    """A run of pads the penalty broke: it began at ``start`` and broke at ``end`` (seconds of the
    input audio, on the clock of the words), after ``positions`` pads."""

    start: float
    end: float
    positions: int

    def to_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "positions": self.positions}


class SpeechTrack:
    """VAD probabilities of a stream's input, per 32 ms frame, kept only from the audio token the
    next position speaks about on: ``speech(j)`` says whether input token ``j`` (80 ms) is speech."""

    def __init__(self, samples_per_token: int, threshold: float):
        self.per_token = samples_per_token
        self.threshold = threshold
        self._probs = np.zeros(0, dtype=np.float32)
        self._first = 0  # the frame index of _probs[0]

    def copy(self) -> SpeechTrack:
        new = SpeechTrack(self.per_token, self.threshold)
        new._probs, new._first = self._probs, self._first  # replaced, never written in place
        return new

    def add(self, probs) -> None:
        """The probabilities of the next frames of the input (frame i: samples [512 i, 512 i + 512))."""
        self._probs = np.concatenate((self._probs, np.asarray(probs, dtype=np.float32)))

    def speech(self, token: int) -> bool:
        """Whether a frame over input token ``token`` is speech (False where no VAD has seen it yet)."""
        if token < 0:
            return False
        lo, hi = token * self.per_token // FRAME, -(-(token + 1) * self.per_token // FRAME)
        window = self._probs[max(0, lo - self._first):max(0, hi - self._first)]
        return bool(window.size and window.max() >= self.threshold)

    def forget_before(self, token: int) -> None:
        """Drop the frames before input token ``token``: tokens are asked about in order."""
        lo = max(0, token) * self.per_token // FRAME
        if lo > self._first:
            self._probs, self._first = self._probs[lo - self._first:], lo


class RutGuard:
    """One stream's pad run, the penalty it earns, and the ruts broken so far."""

    def __init__(self, policy: RutPolicy, *, pad: int, offset: int, seconds_per_token: float,
                 speech: SpeechTrack | None):
        self.policy = policy
        self.pad = pad
        self.offset = offset  # position p speaks about input token p - offset (see voxlive.words)
        self.step = seconds_per_token
        self.speech = speech  # None: no VAD, only the plain threshold applies
        self.run = 0  # pads since the last other token
        self.speech_run = 0  # ... of them over speech
        self._start = 0  # the run's first position
        self.broken: list[Rut] = []  # every rut broken (a few bytes each, and rare)
        self.new: list[Rut] = []  # ... of them not yet taken

    def copy(self) -> RutGuard:
        new = RutGuard.__new__(RutGuard)
        new.__dict__.update(self.__dict__)
        new.speech = self.speech.copy() if self.speech is not None else None
        new.new, new.broken = list(self.new), list(self.broken)
        return new

    @property
    def count(self) -> int:
        return len(self.broken)

    def penalty(self) -> float:
        """What the pad logit loses at the next position."""
        return self.policy.penalty(self.run, self.speech_run)

    def accepted(self, token: int, position: int, *, broke: bool) -> None:
        """The token chosen at ``position``; ``broke``: the penalty chose it over a greedy pad."""
        if self.speech is not None:
            self.speech.forget_before(position - self.offset)
        if broke:
            rut = Rut(self._time(self._start), self._time(position), self.run)
            self.broken.append(rut)
            self.new.append(rut)
        if token != self.pad:
            self.run = self.speech_run = 0
            return
        if not self.run:
            self._start = position
        self.run += 1
        if self.speech is not None and self.speech.speech(position - self.offset):
            self.speech_run += 1

    def _time(self, position: int) -> float:
        return round(max(0, position - self.offset) * self.step, 3)

    def take(self) -> list[Rut]:
        ruts, self.new = self.new, []
        return ruts
