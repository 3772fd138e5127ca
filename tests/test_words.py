"""Word assembly from generated tokens, the timestamp formula, and the output formats."""

from __future__ import annotations

import json

import pytest

from voxlive.tokens import Tokenizer
from voxlive.transcript import Transcript, Word
from voxlive.words import WordAssembler

LEFT, DELAY, STEP = 32, 6, 0.08


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return Tokenizer(tiny_dir / "tekken.json")


def _assembler(tok):
    return WordAssembler(tok, left_pad=LEFT, delay=DELAY, seconds_per_token=STEP)


def test_special_ids_are_looked_up_by_name(tok):
    assert (tok.bos, tok.eos, tok.streaming_pad, tok.streaming_word) == (1, 2, 32, 33)
    assert tok.prompt(32, 6) == [1] + [32] * 38


def test_words_and_times_from_token_positions(tok):
    a = _assembler(tok)
    hello, world = tok.encode("hello"), tok.encode(" world")
    assert hello and world
    out = []
    pos = 38  # first output position: audio frame 0 at delay 6
    stream = [(t, None) for t in [tok.streaming_pad] * 3] + [(t, "hello") for t in hello] \
        + [(tok.streaming_pad, None)] * 4 + [(t, "world") for t in world] + [(tok.streaming_pad, None)] * 2
    positions = {}
    for token, word in stream:
        if word:
            positions.setdefault(word, []).append(pos)
        out += a.push(token, pos, limit=100.0)
        pos += 1
    # "hello" is complete once " world" starts; "world" only at the end
    assert [w.text for w in out] == ["hello"]
    out += a.flush(limit=100.0)
    assert [w.text for w in out] == ["hello", "world"]
    for w in out:
        first, last = positions[w.text][0], positions[w.text][-1]
        assert w.start == pytest.approx((first - LEFT - DELAY) * STEP)
        assert w.end == pytest.approx((last + 1 - LEFT - DELAY) * STEP)
    assert out[0].start == pytest.approx(3 * STEP)  # three pads after the first output position


def test_boundaries_streaming_word_eos_and_inner_spaces(tok):
    a = _assembler(tok)
    words = []
    pos = 40
    for t in tok.encode("alpha"):
        words += a.push(t, pos, 100.0)
        pos += 1
    words += a.push(tok.streaming_word, pos, 100.0)
    for t in tok.encode("beta gamma"):
        pos += 1
        words += a.push(t, pos, 100.0)
    words += a.push(tok.eos, pos + 1, 100.0)
    words += a.flush(100.0)
    assert [w.text for w in words] == ["alpha", "beta", "gamma"]


def test_multibyte_characters_split_across_tokens(tok):
    # Byte-level tokens: a character can span two tokens; the word must still decode right.
    a = _assembler(tok)
    ids = tok.encode("café 日本")
    pieces = [tok.token_bytes(t) for t in ids]
    assert b"\xe6\x9c" in pieces  # the first two bytes of "本" alone: not valid UTF-8 by itself
    words = []
    for i, t in enumerate(ids):
        words += a.push(t, 50 + i, 100.0)
    words += a.flush(100.0)
    assert [w.text for w in words] == ["café", "日本"]
    assert tok.decode(ids) == "café 日本"


def test_times_are_clipped_to_received_audio(tok):
    a = _assembler(tok)
    for i, t in enumerate(tok.encode("late")):
        a.push(t, 100 + i, limit=2.0)
    (w,) = a.flush(limit=2.0)
    assert 0 <= w.start <= w.end <= 2.0
    b = _assembler(tok)
    b.push(tok.encode("x")[0], 10, limit=5.0)  # a position inside the left pad
    (w,) = b.flush(5.0)
    assert w.start == 0.0


def test_output_formats():
    words = [Word("Hello", 0.08, 0.4), Word("world.", 0.48, 0.96), Word("Next", 3.0, 3.2), Word("one", 3.24, 3.5)]
    t = Transcript(text=" Hello world. Next one", words=words, tokens=[1, 2], duration=4.0, delay_ms=480)
    assert t.format("text") == "Hello world. Next one\n"
    data = json.loads(t.format("json"))
    assert data["text"] == t.text and data["words"][1] == {"text": "world.", "start": 0.48, "end": 0.96}
    assert data["duration"] == 4.0 and data["delay_ms"] == 480
    srt = t.format("srt")
    assert srt == ("1\n00:00:00,080 --> 00:00:00,960\nHello world.\n\n"
                   "2\n00:00:03,000 --> 00:00:03,500\nNext one\n\n")
    vtt = t.format("vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:00.080 --> 00:00:00.960\nHello world.\n")
    assert "00:00:03.000 --> 00:00:03.500\nNext one" in vtt
    with pytest.raises(ValueError, match="format must be one of"):
        t.format("docx")


def test_long_cues_are_split_and_hours_formatted():
    words = [Word(f"w{i}", 3600 + i * 0.3, 3600 + i * 0.3 + 0.2) for i in range(40)]
    srt = Transcript(text="", words=words).format("srt")
    blocks = [b for b in srt.split("\n\n") if b.strip()]
    assert len(blocks) > 1
    assert all(len(b.splitlines()[2]) <= 42 for b in blocks)
    assert blocks[0].splitlines()[1].startswith("01:00:00,000 --> ")
