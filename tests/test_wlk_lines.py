"""WhisperLiveKit updates built incrementally equal the full recomputation, in both modes.

A long synthetic session (words of random length, sentence ends, pauses long and short) is fed
in random batches; after every update the full-mode message must equal the state recomputed from
all words so far with ``transcript.cues`` (the grouping the subtitles use), and the diff stream,
applied as a client applies it, must reproduce that same state.
"""

from __future__ import annotations

import json

import numpy as np

from voxlive.server.wlk import LINE_CHARS, LINE_GAP, LINE_SECONDS, Updates
from voxlive.transcript import Word, cues


def hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{(s // 60) % 60:02d}:{s % 60:02d}"


def recomputed(words: list[Word], partial: str, lag: float) -> dict:
    lines = [{"speaker": 1, "text": " ".join(w.text for w in g), "start": hms(g[0].start), "end": hms(g[-1].end),
              "words": [{"text": w.text, "start": round(w.start, 3), "end": round(w.end, 3)} for w in g]}
             for g in cues(words, max_chars=LINE_CHARS, max_seconds=LINE_SECONDS, max_gap=LINE_GAP)]
    return {"status": "active_transcription" if lines or partial else "no_audio_detected", "lines": lines,
            "buffer_transcription": partial, "buffer_diarization": "", "buffer_translation": "",
            "remaining_time_transcription": lag, "remaining_time_diarization": 0.0}


def synthetic_session(n_words: int, seed: int = 0):
    """Batches of new words with the partial and lag after each, as the engine's updates bring them."""
    rng = np.random.default_rng(seed)
    t, words = 0.0, []
    for i in range(n_words):
        t += float(rng.choice([0.0, 0.08, 0.3, 1.6, 4.0], p=[0.5, 0.3, 0.1, 0.07, 0.03]))
        length = int(rng.integers(1, 14))
        text = "".join(chr(97 + int(c)) for c in rng.integers(0, 26, length)) + str(rng.choice(["", ".", "?", ","], p=[0.9, 0.03, 0.03, 0.04]))
        end = t + 0.08 * int(rng.integers(1, 5))
        words.append(Word(text, round(t, 3), round(end, 3)))
        t = end
    batches, i = [], 0
    while i < n_words:
        n = int(rng.choice([0, 0, 1, 1, 2, 5, 17]))
        batches.append((words[i:i + n], "" if rng.random() < 0.3 else "ab\u00e9c"[: int(rng.integers(0, 5))],
                        round(float(rng.random()) * 3, 2)))
        i += n
    return batches


def apply(state: dict, message: dict) -> dict:
    """What a client does with one message of the diff stream."""
    if message["type"] == "snapshot":
        return {k: v for k, v in message.items() if k not in ("type", "seq")}
    lines = state["lines"][message.get("lines_pruned", 0):]
    new = message.get("new_lines", [])
    lines = lines[:message["n_lines"] - len(new)] + new
    assert len(lines) == message["n_lines"]
    rest = {k: v for k, v in message.items() if k not in ("type", "seq", "n_lines", "new_lines", "lines_pruned")}
    return {"status": rest.pop("status"), "lines": lines, **rest}


def test_incremental_full_and_diff_updates_equal_the_recomputation_after_every_update():
    full, diff = Updates("full"), Updates("diff")
    seen, state, seqs = [], None, []
    batches = synthetic_session(1200)
    for words, partial, lag in batches:
        seen += words
        expected = recomputed(seen, partial, lag)
        for u in (full, diff):
            u.partial, u.lag = partial, lag
        assert json.loads(full.message(words)) == expected
        message = json.loads(diff.message(words))
        seqs.append(message["seq"])
        state = apply(state, message)
        assert state == expected
        if message["type"] == "diff":  # constant size: the open line and the lines after it only
            assert len(message.get("new_lines", [])) <= len(words) + 1
            assert (not words) == ("new_lines" not in message)
    assert seqs == list(range(1, len(batches) + 1))
    assert len(expected["lines"]) > 100 and any(len(b[0]) > 10 for b in batches)
    assert diff.lines.closed == [] and len(diff.lines.open) < 100  # diff mode keeps the open line only


def test_an_error_rides_on_the_next_message_in_either_mode():
    full, diff = Updates("full"), Updates("diff")
    words = [Word("hello", 0.0, 0.4), Word("there.", 0.5, 0.9), Word("next", 1.0, 1.2)]
    diff.message(words[:1])
    full.message(words[:1])
    for u in (full, diff):
        message = json.loads(u.message(words[1:], error="boom"))
        assert message["error"] == "boom"
    assert [line["text"] for line in message["new_lines"]] == ["hello there.", "next"]
    assert json.loads(full.message())["lines"][0]["text"] == "hello there."
