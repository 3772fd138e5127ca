"""Transcripts and their output formats: plain text, JSON with word times, SRT and WebVTT."""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field

FORMATS = ("text", "json", "srt", "vtt")


@dataclass(frozen=True)
class Word:
    """A word and where it is in the input audio.

    ``probability``: the mean of the model's probabilities of the word's tokens, in (0, 1]
    (``voxlive.words``); None for a word that no model transcribed (e.g. given for subtitles). It is
    a measurement, not part of the word's identity: words compare equal on text and times, and their
    probabilities compare within float tolerance (batches and drafts round the logits differently).
    """

    text: str
    start: float  # seconds from the start of the input audio
    end: float
    probability: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        return {"text": self.text, "start": round(self.start, 3), "end": round(self.end, 3)}


@dataclass
class Transcript:
    text: str
    words: list[Word] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # every generated id, specials included
    duration: float = 0.0  # seconds of input audio
    delay_ms: int = 0
    ruts: list = field(default_factory=list)  # voxlive.rut.Rut: the blank ruts the pad penalty broke

    def to_dict(self) -> dict:
        out = {
            "text": self.text,
            "duration": round(self.duration, 3),
            "delay_ms": self.delay_ms,
            "words": [w.to_dict() for w in self.words],
        }
        if self.ruts:
            out["blank_ruts"] = [r.to_dict() for r in self.ruts]
        return out

    def format(self, fmt: str) -> str:
        if fmt == "text":
            return self.text.strip() + "\n"
        if fmt == "json":
            return json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n"
        if fmt in ("srt", "vtt"):
            return subtitles(self.words, vtt=fmt == "vtt")
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


class TextDeltas:
    """A stream's text in pieces (as the tokens' bytes arrive) that add up to exactly its
    ``Transcript.text``: whitespace is sent with the text that follows it, so none leads the first
    piece or trails the last."""

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._space = ""  # whitespace decoded and not sent yet
        self._started = False

    def push(self, data: bytes, *, final: bool = False) -> str:
        text = self._space + self._utf8.decode(data, final=final)
        if not self._started:
            text = text.lstrip()
        delta = text.rstrip()
        self._space = text[len(delta):]
        self._started = self._started or bool(delta)
        return delta


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def cues(words: list[Word], *, max_chars: int = 42, max_seconds: float = 5.0, max_gap: float = 1.0):
    """Group words into subtitle cues: a new cue on a long pause, a full line, or a sentence end."""
    group: list[Word] = []
    for w in words:
        if group:
            text_len = sum(len(g.text) + 1 for g in group) + len(w.text)
            if (w.start - group[-1].end > max_gap or text_len > max_chars
                    or w.end - group[0].start > max_seconds or group[-1].text[-1:] in ".?!"):
                yield group
                group = []
        group.append(w)
    if group:
        yield group


def subtitles(words: list[Word], *, vtt: bool) -> str:
    sep = "." if vtt else ","
    out = ["WEBVTT", ""] if vtt else []
    for i, group in enumerate(cues(words), start=1):
        if not vtt:
            out.append(str(i))
        out.append(f"{_timestamp(group[0].start, sep)} --> {_timestamp(group[-1].end, sep)}")
        out.append(" ".join(w.text for w in group))
        out.append("")
    return "\n".join(out) + ("\n" if out else "")
