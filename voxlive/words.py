"""Generated tokens -> words with timestamps, as soon as each word is complete.

Timing. The decoder emits one token per audio token (80 ms). The token emitted at decoder position
``p`` (p counts from 0 at BOS, which lines up with the first of the ``left_pad`` silent tokens) has
heard the audio up to the end of token ``p`` and, by training, speaks about the audio ``delay``
tokens earlier. So a text token at position ``p`` is placed on the 80 ms frame

    start(p) = (p - left_pad - delay) * 0.08 s,   end(p) = start(p) + 0.08 s

of the input audio, and a word spans from start(first token) to end(last token). The resolution is
one token (80 ms). How far the model's own alignment strays from this has not been measured by
this project (no real weights here).

Every word keeps a real extent inside the audio received: a word decoded after the audio ended
(from the right pad) ends at the audio's end and starts at least one token (80 ms) before it (or
at 0 for audio shorter than that), so no word, and no subtitle cue, ends where it starts. While
audio is still arriving this never binds: a token is placed ``delay`` tokens before the audio it
has heard, so streams and offline transcription give the same times.

Word boundaries: a ``[STREAMING_WORD]`` token, whitespace at the start of (or inside) a text
token's bytes, ``</s>``, and the end of the stream. A word is reported when the next boundary
arrives, never earlier, so a reported word is final. A word also ends once it reaches
``MAX_WORD_BYTES`` at a character's end (no real word is that long; text without spaces, or a
model that never emits one, would otherwise make a "word" that grows for the whole session), so
the word in progress, decoded incrementally as its tokens arrive, costs a bounded amount per step.

Probability: a word's is the mean of the probabilities of the tokens that gave it bytes (a token
whose bytes span a boundary counts for both words; ``[STREAMING_WORD]``, pads and whitespace-only
tokens count for none), each the model's probability of the token it chose
(``Decoded.probability``). The arithmetic mean is openai-whisper's word ``probability``
(``word_timestamps``; faster-whisper's too), the figure clients already compare against, and
Deepgram documents a word's ``confidence`` only as a 0-1 value, which this is. Unlike the product
or the geometric mean it does not make a word of four tokens look less sure than a one-token word
the model is as sure of, and unlike the minimum one uncertain sub-word does not stand for the
whole word. It is stored as float32 (the tokens' own precision).

Memory: the words of a whole session are kept compactly (``WordLog``: their UTF-8 bytes, two
float64 times and a float32 probability each, ~29 bytes a word instead of a few hundred for Python
objects), so a stream that runs for hours holds its words at about the cost of its text.
"""

from __future__ import annotations

import codecs
import math
import re
from array import array

from .tokens import Tokenizer
from .transcript import Word

_SPACE = re.compile(rb"(\s+)")
MAX_WORD_BYTES = 256


class WordLog:
    """Words in order, stored compactly; ``list(log)`` gives them as ``Word`` objects."""

    def __init__(self):
        self._text = bytearray()  # every word's UTF-8 bytes, one after the other
        self._ends = array("Q")  # where each word's bytes end in _text
        self._times = array("d")  # start, end of each word
        self._probabilities = array("f")  # each word's probability (NaN: none)

    def copy(self) -> WordLog:
        new = WordLog()
        new._text, new._ends, new._times = bytearray(self._text), array("Q", self._ends), array("d", self._times)
        new._probabilities = array("f", self._probabilities)
        return new

    def append(self, word: Word) -> None:
        self._text += word.text.encode("utf-8")
        self._ends.append(len(self._text))
        self._times.extend((word.start, word.end))
        self._probabilities.append(math.nan if word.probability is None else word.probability)

    def __len__(self) -> int:
        return len(self._ends)

    def __iter__(self):
        lo = 0
        for i, hi in enumerate(self._ends):
            p = self._probabilities[i]
            yield Word(self._text[lo:hi].decode("utf-8"), self._times[2 * i], self._times[2 * i + 1],
                       None if math.isnan(p) else p)
            lo = hi


class WordAssembler:
    def __init__(self, tokenizer: Tokenizer, *, left_pad: int, delay: int, seconds_per_token: float):
        self.tok = tokenizer
        self.offset = left_pad + delay
        self.step = seconds_per_token
        self._bytes = bytearray()  # the word in progress
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._partial = ""  # its text, decoded as its bytes came (an incomplete last character left out)
        self._first = self._last = -1
        self._probability_sum = 0.0  # of the tokens that gave the word in progress bytes ...
        self._tokens = 0  # ... and how many they are
        self.words = WordLog()

    def copy(self) -> WordAssembler:
        new = WordAssembler.__new__(WordAssembler)
        new.__dict__.update(self.__dict__)
        new._bytes = bytearray(self._bytes)
        new._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        new._utf8.setstate(self._utf8.getstate())
        new.words = self.words.copy()
        return new

    @property
    def partial(self) -> str:
        """Text of the word in progress (not yet closed by a boundary)."""
        return self._partial

    def push(self, token: int, position: int, limit: float, *, probability: float) -> list[Word]:
        """Add the token emitted at ``position`` with the model's ``probability`` of it; return words
        completed by it.

        ``limit`` is the duration of audio received so far: no time is placed after it.
        """
        done: list[Word] = []
        if token in (self.tok.streaming_word, self.tok.eos):
            self._close(done, limit)
        elif self.tok.is_text(token):
            counted = False  # whether the word in progress has this token's probability yet
            for piece in _SPACE.split(self.tok.token_bytes(token)):
                if not piece:
                    continue
                if piece[:1].isspace():
                    self._close(done, limit)
                    counted = False
                    continue
                if not self._bytes:
                    self._first = position
                if not counted:
                    self._probability_sum += probability
                    self._tokens += 1
                    counted = True
                self._bytes += piece
                self._partial += self._utf8.decode(piece)
                self._last = position
                if len(self._bytes) >= MAX_WORD_BYTES and not self._utf8.getstate()[0]:
                    self._close(done, limit)  # at a character's end: neither part is cut mid-character
                    counted = False
        return done

    def flush(self, limit: float) -> list[Word]:
        done: list[Word] = []
        self._close(done, limit)
        return done

    def _close(self, done: list[Word], limit: float) -> None:
        if not self._bytes:
            return
        start, end = self._extent(limit)
        word = Word(self._bytes.decode("utf-8", errors="replace"), start, end,
                    array("f", [self._probability_sum / self._tokens])[0])
        self._probability_sum, self._tokens = 0.0, 0
        self._bytes = bytearray()
        self._utf8.reset()
        self._partial = ""
        self.words.append(word)
        done.append(word)

    def _extent(self, limit: float) -> tuple[float, float]:
        """The word's (start, end) in seconds, inside [0, limit] and at least one token long where
        the audio is; never empty (1 ms at the least, for audio shorter than a millisecond)."""
        end = min(max((self._last + 1 - self.offset) * self.step, self.step), limit)
        start = max(0.0, min((self._first - self.offset) * self.step, end - self.step))
        start, end = round(start, 3), round(end, 3)
        return start, max(end, round(start + 0.001, 3))
