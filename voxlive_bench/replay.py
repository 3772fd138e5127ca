"""How many decoder passes, of how many rows, real speech takes: a token stream shaped like real
speech, replayed through the real session layer.

Random weights make greedy output degenerate, so they cannot show how the drafters fare on speech.
Instead, ``speech_tokens`` builds the tokens a transcription of read English emits: the words of a
fixed passage, each word's ``[STREAMING_WORD]`` and Tekken tokens (leading space and punctuation
included) at the start of its time, ``[STREAMING_PAD]`` for the rest of it and for the pauses; a
word lasts a fixed time per syllable (vowel groups), calibrated so that pads are ``pad_fraction``
of all positions (60-70 % on real speech, as transcribe.cpp measured with the real weights), plus
a pause after commas and sentences. ``Replayer.rows`` runs a real ``Stream`` of a small model on
audio of that length, through the user's path (``Model.transcribe`` at a chunk size), and replaces
each fed position's greedy token with the script's token there: the drafting (``voxlive.drafts``),
the acceptance, the rewinds and which positions are ready when are the session's own; only the
tokens are scripted. It returns the rows of every decoder pass, which the measured cost of a pass
of k rows (``voxlive_bench.drafts``) turns into decode time.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import replace
from typing import Sequence

import numpy as np

from voxlive.audio import SAMPLE_RATE
from voxlive.config import MS_PER_TOKEN

# An original passage of everyday read English (222 words).
PASSAGE = """\
Good morning, everyone, and thank you for joining the call. Before we start, a quick reminder that
the office will be closed on Friday, so please plan your deliveries for Thursday afternoon. The
first item today is the new storage system. We moved about half of the archive last week, and the
rest should follow by the end of the month. If you notice a missing folder, write to the help desk
and include the old path, the date you last opened it, and what it contained. Second, the budget.
Travel costs came in lower than we expected, mostly because the spring conference moved online.
We would like to spend part of that money on training, and we are asking each team to suggest one
course that would help them this year. Send your ideas by the twentieth. Third, the kitchen on the
second floor is being repaired. The water has been turned off until Wednesday, and the coffee
machine was taken downstairs for now. Finally, some good news: our team won the regional award
for customer service. Maria will tell you more about it in a minute, but I want to thank all of
you for the long evenings in November. That is everything from me. Are there any questions before
we move on? If not, Maria, the floor is yours.
"""

PAUSES = {",": 0.25, ";": 0.25, ":": 0.25, ".": 0.6, "?": 0.6, "!": 0.6}  # seconds of silence after


def _syllables(word: str) -> int:
    return max(1, len(re.findall(r"[aeiouy]+", word.lower())))


def _positions(words: list[str], tokens: list[list[int]], seconds_per_syllable: float) -> list[int]:
    """Positions each word takes, its pause included (at least its own tokens): the word's end is
    rounded to a position, not its length, so rounding errors do not add up."""
    out, end, spoken = [], 0.0, 0
    for word, toks in zip(words, tokens):
        end += (_syllables(word) * seconds_per_syllable + PAUSES.get(word[-1], 0.0)) * 1000 / MS_PER_TOKEN
        n = max(len(toks), round(end) - spoken)
        out.append(n)
        spoken += n
    return out


def speech_tokens(tokenizer, *, pad_fraction: float = 0.65, text: str = PASSAGE) -> list[int]:
    """The tokens a transcription of ``text`` read aloud emits, one per 80 ms position: per word a
    ``[STREAMING_WORD]`` and its text tokens, then pads; pads make up ``pad_fraction`` of all
    positions (to within a position or so)."""
    words = text.split()
    tokens = [[tokenizer.streaming_word] + tokenizer.encode(" " + w) for w in words]
    n_said = sum(len(t) for t in tokens)

    def pads(seconds_per_syllable: float) -> float:
        return 1 - n_said / sum(_positions(words, tokens, seconds_per_syllable))

    lo, hi = 0.0, 2.0  # seconds per syllable: more time per word, more pads
    for _ in range(40):
        lo, hi = ((lo + hi) / 2, hi) if pads((lo + hi) / 2) < pad_fraction else (lo, (lo + hi) / 2)
    best = min((lo, hi), key=lambda s: abs(pads(s) - pad_fraction))
    out = []
    for toks, n in zip(tokens, _positions(words, tokens, best)):
        out += toks + [tokenizer.streaming_pad] * (n - len(toks))
    return out


def real_tokenizer(directory):
    """The Tekken tokenizer of the real vocabulary (as the full-size checkpoint has it), written to
    ``directory``."""
    import json
    from pathlib import Path

    from voxlive.testing import make_tekken
    from voxlive.tokens import Tokenizer

    path = Path(directory) / "tekken.json"
    path.write_text(json.dumps(make_tekken(131072)))
    return Tokenizer(path)


def relabel(tokens: Sequence[int], *, first: int, vocab_size: int) -> list[int]:
    """The same stream over a smaller vocabulary: each distinct text token (``first`` and up) gets its
    own id from ``first``, special tokens stay. The drafters only ever compare tokens, so their
    passes are the same."""
    ids: dict[int, int] = {}
    out = []
    for t in tokens:
        if t >= first and t not in ids:
            ids[t] = first + len(ids)
        out.append(ids.get(t, t))
    if ids and max(ids.values()) >= vocab_size:
        raise ValueError(f"{len(ids)} distinct tokens do not fit in ids {first}..{vocab_size - 1}")
    return out


class _Scripted:
    """Wraps a runtime (the streams call it through this): every result of a decode call is the
    script's token for that position instead of the model's; the rows of each decode step are kept.
    The first result a state ever gets (its last prompt position's) is the script's token 0."""

    def __init__(self, runtime):
        self._rt, self.pad = runtime, runtime.pad_id
        self.start([])

    def start(self, script: Sequence[int]) -> None:
        self.script = list(script)
        self.rows: list[int] = []
        self._first: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # state -> its token 0's position

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def decode(self, states, feeds, *, outputs=None):
        positions = [self._rt.position(s) for s in states]
        results = self._rt.decode(states, feeds, outputs=outputs)
        if outputs is None:  # a decode step (prompt positions come with output counts)
            self.rows.append(sum(len(f) for f in feeds))
        scripted = []
        for state, p, feed, d in zip(states, positions, feeds, results):
            if not d.tokens:
                scripted.append(d)
                continue
            first = p + len(feed) - len(d.tokens)  # the position of the first result
            zero = self._first.setdefault(state, first)
            want = [self._token(first + i - zero) for i in range(len(d.tokens))]
            # the script's token wins by a clear margin: no blank-rut choice can override it
            scripted.append(replace(d, tokens=want, pad_margins=[10.0] * len(want), logprobs=[0.0] * len(want)))
        return scripted

    def _token(self, i: int) -> int:
        return self.script[i] if i < len(self.script) else self.pad  # past the script: silence


class Replayer:
    """Replays scripts through streams of a Model on ``model``'s weights whose runtime scripts them."""

    def __init__(self, model, *, row_cost: float | None = None):
        from voxlive.model import Model

        self._scripted = _Scripted(model.runtime)
        if row_cost is not None:  # the drafts' length as on the runtime whose passes are costed
            self._scripted.row_cost = row_cost
        self.model = Model(self._scripted, model.tokenizer, model.source)

    def rows(self, script: Sequence[int], *, chunk_seconds: float, delay_ms: int | None = None,
             drafts: bool = True) -> list[int]:
        """The rows of every decoder pass a stream fed in ``chunk_seconds`` chunks takes to emit
        ``script`` (audio of its length; past it, the right pad emits pads). The stream's tokens are
        checked against the script."""
        self._scripted.start(script)
        pcm = np.zeros(len(script) * MS_PER_TOKEN * SAMPLE_RATE // 1000, dtype=np.float32)
        tokens = self.model.transcribe(pcm, delay_ms=delay_ms, chunk_seconds=chunk_seconds, drafts=drafts,
                                       rut=None).tokens
        if tokens[:len(script)] != list(script):
            raise AssertionError("the replayed stream did not emit its script")
        return self._scripted.rows
