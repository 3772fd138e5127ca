"""Drafting: guesses of a stream's next tokens, verified by the decoder in one pass.

Whenever audio for several positions is encoded, a decode step can feed, after the stream's last
token, tokens guessed for the following positions; the session keeps the prefix the model confirms
plus the model's own token at the first miss, and rewinds the rest (``Stream._take_step``). The
tokens never depend on the guesses, only the number of passes does: a pass reads the decoder's
weights once for all its rows.

A stream's ``Drafting`` pairs a ``Drafter`` (what to guess) with a ``DraftLength`` (how many to
feed). A new strategy is a new class:

- ``PadRuns``: after ``[STREAMING_PAD]``, more pads (most positions are pads, in long runs);
- ``Bigrams``: the token that most often followed the last one in this stream so far, else its
  most frequent token, chained;
- ``Fallback``: the first drafter's guesses, else the second's;
- ``Oracle``: known true tokens, each corrupted with a probability (tests and benchmarks);
- ``Fixed`` and ``Adaptive`` lengths; ``Adaptive`` picks the length with the most expected tokens
  per unit of pass cost, from the acceptance seen so far after the same token and a linear cost
  model.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

# Cost of each row of a verification pass beyond the first, relative to a one-row pass. A step at
# batch 1 is memory-bound (it reads all decoder weights), so extra rows are cheap. A runtime says
# what its kernels cost (``Runtime.row_cost``); this is the figure for those that do not: the
# dearest of those ``voxlive bench --drafts`` measured (int4 on a 2-core AVX-512 CPU; README,
# "Drafts, measured"), so that a drafted pass rarely costs more than the steps it saves.
ROW_COST = 0.05


class Drafter(Protocol):
    def observe(self, token: int) -> None:
        """The stream emitted ``token`` (every token, in order)."""

    def draft(self, n: int) -> list[int]:
        """At most ``n`` guesses for the positions after the last observed token (maybe none)."""


class PadRuns:
    """After a ``[STREAMING_PAD]``, guess that the run of pads goes on."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.last: int | None = None

    def observe(self, token: int) -> None:
        self.last = token

    def draft(self, n: int) -> list[int]:
        return [self.pad_id] * n if self.last == self.pad_id else []


class Bigrams:
    """The token that most often followed the last one in this stream so far (ties: the one that got
    there first), else the stream's most frequent token, chained for several positions.

    The fallback matters on speech: a word's text tokens are mostly new, but what follows a word is
    nearly always the pad, which is also the most frequent token, so the guesses after a new token
    are its pads (a miss costs nothing but the pass's rows: the model's own token comes out of it).
    """

    def __init__(self):
        self.last: int | None = None
        self._counts: dict[int, dict[int, int]] = {}
        self._best: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._most: int | None = None

    def observe(self, token: int) -> None:
        self._seen[token] = self._seen.get(token, 0) + 1
        if self._most is None or self._seen[token] > self._seen[self._most]:
            self._most = token
        prev, self.last = self.last, token
        if prev is None:
            return
        after = self._counts.setdefault(prev, {})
        after[token] = after.get(token, 0) + 1
        best = self._best.get(prev)
        if best is None or after[token] > after[best]:
            self._best[prev] = token

    def draft(self, n: int) -> list[int]:
        out, token = [], self.last
        while len(out) < n and self._most is not None:
            token = self._best.get(token, self._most)
            out.append(token)
        return out


class Fallback:
    """The first drafter's guesses when it has any, else the second's."""

    def __init__(self, first: Drafter, second: Drafter):
        self.first, self.second = first, second

    def observe(self, token: int) -> None:
        self.first.observe(token)
        self.second.observe(token)

    def draft(self, n: int) -> list[int]:
        return self.first.draft(n) or self.second.draft(n)


class Oracle:
    """The true tokens of the stream (from an earlier run), each replaced by a wrong one with
    probability ``1 - accuracy``: drafts of controlled quality, for tests and benchmarks."""

    def __init__(self, tokens: Sequence[int], *, accuracy: float = 1.0, vocab_size: int, seed: int = 0):
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        self.tokens = [int(t) for t in tokens]
        self.accuracy = accuracy
        self.vocab_size = vocab_size
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def observe(self, token: int) -> None:
        self.seen += 1

    def draft(self, n: int) -> list[int]:
        out = self.tokens[self.seen:self.seen + n]  # guesses of what the next positions emit
        wrong = self._rng.random(len(out)) >= self.accuracy
        return [(t + 1) % self.vocab_size if w else t for t, w in zip(out, wrong)]


class DraftLength(Protocol):
    def choose(self, room: int, after: int | None) -> int:
        """How many drafts to feed this step, at most ``room``; ``after``: the stream's last token,
        which the drafts follow."""

    def update(self, fed: int, accepted: int, after: int | None) -> None:
        """A step fed ``fed`` drafts (maybe 0) after ``after`` (None: it did not draft) and the model
        confirmed the first ``accepted``."""


class Fixed:
    """Always as many drafts as there is room for, up to ``n``."""

    def __init__(self, n: int):
        self.n = n

    def choose(self, room: int, after: int | None) -> int:
        return min(self.n, room)

    def update(self, fed: int, accepted: int, after: int | None) -> None:
        pass


class _Counts:
    """Drafts confirmed and first misses, each observation decaying by ``decay`` per update."""

    __slots__ = ("hits", "misses")

    def __init__(self):
        self.hits = self.misses = 0.0

    def add(self, fed: int, accepted: int, decay: float) -> None:
        self.hits = decay * self.hits + accepted
        self.misses = decay * self.misses + (accepted < fed)

    def rate(self, prior: float, weight: float) -> float:
        return (self.hits + weight * prior) / (self.hits + self.misses + weight)


class Adaptive:
    """The draft length k that maximizes expected tokens per pass cost.

    Each draft is taken as accepted with probability ``a`` given the ones before it were, so a pass
    of k drafts yields ``1 + a + ... + a**k`` tokens and costs ``1 + row_cost * k`` one-row passes.
    ``a`` is estimated per context, the token the drafts follow, because it differs by far between
    contexts: after a pad the run of pads mostly goes on, after ``[STREAMING_WORD]`` comes a word
    that is rarely guessed, so the same rows that pay after a pad are wasted there. A context's
    estimate is its own drafts' outcome with the stream's overall estimate as prior (weight 2
    drafts), which in turn starts from ``prior`` (weight 2 drafts); a context seen for the first
    time gets the overall estimate. Every observation decays by ``decay`` per step of its context
    (and of the whole stream, for the overall one): a context whose drafts stopped paying stops
    drafting, then drifts back towards the overall estimate and tries again.
    """

    def __init__(self, *, row_cost: float = ROW_COST, prior: float = 0.75, decay: float = 0.95, most: int = 16):
        if row_cost < 0:
            raise ValueError(f"row_cost must be >= 0, got {row_cost}")
        self.row_cost, self.prior, self.decay, self.most = row_cost, prior, decay, most
        self.overall = _Counts()
        self.contexts: dict[int, _Counts] = {}  # one per token drafted after (at most the vocabulary)

    def acceptance(self, after: int | None) -> float:
        a = self.overall.rate(self.prior, 2)
        context = self.contexts.get(after)
        return context.rate(a, 2) if context is not None else a

    def choose(self, room: int, after: int | None) -> int:
        a = self.acceptance(after)
        best, best_rate, tokens = 0, 1.0, 1.0
        for k in range(1, min(room, self.most) + 1):
            tokens += a ** k
            rate = tokens / (1 + self.row_cost * k)
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def update(self, fed: int, accepted: int, after: int | None) -> None:
        self.overall.add(fed, accepted, self.decay)
        if after is not None:
            self.contexts.setdefault(after, _Counts()).add(fed, accepted, self.decay)


class Drafting:
    """A stream's drafting: what to guess and how many guesses to feed."""

    def __init__(self, drafter: Drafter, length: DraftLength):
        self.drafter, self.length = drafter, length
        self.last: int | None = None  # the stream's last token
        self._after: int | None = None  # the last token when this step drafted (None: it did not)

    @classmethod
    def default(cls, pad_id: int, *, row_cost: float = ROW_COST) -> Drafting:
        """Pad runs, else the 1-gram lookup; the adaptive length (``row_cost``: the runtime's)."""
        return cls(Fallback(PadRuns(pad_id), Bigrams()), Adaptive(row_cost=row_cost))

    def observe(self, token: int) -> None:
        self.drafter.observe(token)
        self.last = token

    def draft(self, room: int) -> list[int]:
        self._after = self.last
        n = self.length.choose(room, self._after)
        return self.drafter.draft(n) if n else []

    def update(self, fed: int, accepted: int) -> None:
        self.length.update(fed, accepted, self._after)
        self._after = None
