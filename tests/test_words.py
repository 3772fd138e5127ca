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
        out += a.push(token, pos, limit=100.0, probability=1.0)
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
        words += a.push(t, pos, 100.0, probability=1.0)
        pos += 1
    words += a.push(tok.streaming_word, pos, 100.0, probability=1.0)
    for t in tok.encode("beta gamma"):
        pos += 1
        words += a.push(t, pos, 100.0, probability=1.0)
    words += a.push(tok.eos, pos + 1, 100.0, probability=1.0)
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
        words += a.push(t, 50 + i, 100.0, probability=1.0)
    words += a.flush(100.0)
    assert [w.text for w in words] == ["café", "日本"]
    assert tok.decode(ids) == "café 日本"


def test_times_are_clipped_to_received_audio(tok):
    a = _assembler(tok)
    for i, t in enumerate(tok.encode("late")):
        a.push(t, 100 + i, limit=2.0, probability=1.0)
    (w,) = a.flush(limit=2.0)
    assert 0 <= w.start <= w.end <= 2.0
    b = _assembler(tok)
    b.push(tok.encode("x")[0], 10, limit=5.0, probability=1.0)  # a position inside the left pad
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


def _word_at(tok, positions, limit):
    a = _assembler(tok)
    ids = tok.encode("late")
    for i, p in enumerate(positions):
        a.push(ids[0] if i == 0 else tok.streaming_pad, p, limit=limit, probability=1.0)
    (w,) = a.flush(limit=limit)
    return w


def test_words_after_the_audio_keep_one_token_inside_it(tok):
    # Decoded from the right pad, far after the 2 s of audio: the word ends with the audio and is one
    # token long, never a zero-length word at the end.
    first = LEFT + DELAY + 40  # placed at 3.2 s
    w = _word_at(tok, [first], limit=2.0)
    assert (w.start, w.end) == (pytest.approx(2.0 - STEP), 2.0)
    # Straddling the end: it keeps its start and ends with the audio.
    straddle = LEFT + DELAY + 24  # placed at 1.92 s, ending at 2.0 s
    w = _word_at(tok, [straddle, straddle + 1], limit=2.0)
    assert (w.start, w.end) == (pytest.approx(1.92), 2.0)
    # Audio shorter than one token: the word is all of it; shorter than a millisecond: still not empty.
    w = _word_at(tok, [first], limit=0.05)
    assert (w.start, w.end) == (0.0, 0.05)
    w = _word_at(tok, [first], limit=0.0)
    assert w.end > w.start == 0.0


def test_no_zero_length_word_or_cue_when_words_come_after_the_audio(speech, tmp_path):
    # The demo checkpoint says words until well after this short cut of speech ends.
    import voxlive
    from voxlive.testing import write_demo_checkpoint

    model = voxlive.load(write_demo_checkpoint(tmp_path / "demo"), dtype="float32", device="cpu")
    t = model.transcribe(speech[:20000])
    assert t.words and t.words[-1].end == pytest.approx(t.duration, abs=1e-3)  # words did come after the audio
    for w in t.words:
        assert 0 <= w.start < w.end <= round(t.duration, 3) + 1e-9, w
    for fmt in ("srt", "vtt"):
        cues = [line.split(" --> ") for line in t.format(fmt).splitlines() if " --> " in line]
        assert cues
        assert all(start < end for start, end in cues), cues
    assert all(w["start"] < w["end"] for w in json.loads(t.format("json"))["words"])


def test_text_has_no_leading_space(varied_model, speech):
    t = varied_model.transcribe(speech)
    raw = varied_model.tokenizer.decode(t.tokens)
    assert raw.startswith(" ")  # the first word's token carries its space
    assert t.text == raw.strip() and t.format("text") == t.text + "\n"


def test_text_deltas_add_up_to_the_text(tok):
    from voxlive.transcript import TextDeltas

    text = "  Hello wörld,\n  again  "
    data = text.encode()
    for cut in range(1, 6):  # pieces of every size, splitting "ö" between two pieces too
        d = TextDeltas()
        pieces = [d.push(data[i:i + cut]) for i in range(0, len(data), cut)] + [d.push(b"", final=True)]
        assert "".join(pieces) == text.strip()
        assert not pieces[0].startswith(" ")


def test_a_word_without_a_boundary_ends_at_max_word_bytes_on_a_character_boundary(tok):
    from voxlive.words import MAX_WORD_BYTES

    byte = {tok.token_bytes(t): t for t in range(tok.num_special, tok.num_special + 256)}
    assert len(byte) == 256  # Tekken's first pieces: the single bytes
    a = _assembler(tok)
    eacute = [byte[b"\xc3"], byte[b"\xa9"]]  # "é", split across two tokens
    words, partials = [], []
    for i, t in enumerate(eacute * 200 + [byte[b"x"]]):  # 401 bytes, no boundary
        words += a.push(t, 38 + i, limit=1e9, probability=1.0)
        partials.append(a.partial)
    assert [w.text for w in words] == ["é" * (MAX_WORD_BYTES // 2)]
    assert words[0].start == 0.0 and words[0].end == round(MAX_WORD_BYTES * STEP, 3)
    assert partials[0] == "" and partials[1] == "é"  # half a character is not shown
    rest = "é" * (200 - MAX_WORD_BYTES // 2) + "x"
    assert a.partial == rest
    assert [w.text for w in a.flush(1e9)] == [rest] and a.partial == ""
    assert max(len(p.encode()) for p in partials) < MAX_WORD_BYTES


def test_a_words_probability_is_the_mean_of_its_text_tokens(tok):
    """Pads, [STREAMING_WORD] and whitespace-only tokens count for no word; a token counts once
    however many pieces of the word it holds; the mean is over the word's tokens, not its bytes."""
    a = _assembler(tok)
    he, ll, o, w, orr, ld = tok.encode(" hello world")
    byte = {tok.token_bytes(t): t for t in range(tok.num_special, tok.num_special + 256)}
    pad, space = tok.streaming_pad, byte[b" "]
    stream = [(pad, 0.99), (he, 0.9), (pad, 0.01), (ll, 0.6), (o, 0.3), (tok.streaming_word, 0.02),
              (w, 0.5), (orr, 0.25), (space, 0.05), (ld, 1.0), (byte[b"\xc3"], 0.2), (byte[b"\xa9"], 0.4)]
    words = []
    for i, (t, p) in enumerate(stream):
        words += a.push(t, 40 + i, 100.0, probability=p)
    words += a.flush(100.0)
    assert [x.text for x in words] == ["hello", "wor", "ldé"]
    expected = [(0.9 + 0.6 + 0.3) / 3, (0.5 + 0.25) / 2, (1.0 + 0.2 + 0.4) / 3]
    assert [x.probability for x in words] == pytest.approx(expected, rel=1e-6)
    assert list(a.words) == words and [x.probability for x in a.words] == [x.probability for x in words]


def test_the_word_log_gives_back_every_word_as_stored(tok):
    from voxlive.words import WordLog

    log = WordLog()
    words = [Word("héllo", 0.0, 0.08, 0.5), Word("wörld", 0.16, 1 / 3, 0.125), Word("日本", 2.0, 2.24)]
    for w in words:
        log.append(w)
    assert list(log) == words and len(log) == 3
    assert [w.probability for w in log] == [0.5, 0.125, None]  # float32 holds these exactly; None stays None
    copy = log.copy()
    log.append(Word("more", 3.0, 3.08))
    assert list(copy) == words
