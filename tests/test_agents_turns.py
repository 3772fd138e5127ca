"""The pieces under every turn-aware dialect: the Silero VAD stream, raw-audio decoding, and the
turn state machine (VAD frames + the model's tokens + forced finals -> ordered events)."""

from __future__ import annotations

import numpy as np
import pytest
from dialogue import as_float, build

from voxlive.pcm import ALAW, MULAW, PcmDecoder
from voxlive.turns import Delta, Segment, TurnEnded, TurnResumed, Turns, TurnSettings

pytest.importorskip("onnxruntime")
silero_vad = pytest.importorskip("silero_vad")

PAD, WORD = 1, 2  # special tokens of the synthetic vocabulary; 100 and up are text


def is_text(token: int) -> bool:
    return token >= 100


def test_vad_stream_equals_silero_own_wrapper_in_any_chunking(tmp_path):
    import torch
    from silero_vad.utils_vad import OnnxWrapper

    from voxlive.vad import SileroVad, model_path

    pcm16, _ = build(tmp_path)
    audio = as_float(pcm16)[:16000 * 4]
    reference = OnnxWrapper(str(model_path()))
    expected = np.array([float(reference(torch.from_numpy(audio[i:i + 512]), 16000))
                         for i in range(0, len(audio) - 511, 512)])
    stream = SileroVad().stream()
    got = np.concatenate([stream.push(audio[i:i + 777]) for i in range(0, len(audio), 777)])
    assert len(got) == len(expected) and np.array_equal(got, expected.astype(np.float32))
    assert got.max() > 0.9 and got[:10].max() < 0.2  # speech is found, the leading silence is not


def test_g711_tables_equal_ffmpeg_decoders():
    import av

    for codec, table in (("pcm_mulaw", MULAW), ("pcm_alaw", ALAW)):
        ctx = av.CodecContext.create(codec, "r")
        ctx.sample_rate, ctx.layout = 8000, "mono"
        frames = ctx.decode(av.Packet(bytes(range(256))))
        ffmpeg = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32768.0
        assert np.array_equal(table, ffmpeg), codec


def test_pcm_decoder_chunked_equals_whole_and_refuses_bad_input():
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal(24000 * 2) * 3000).astype("<i2").tobytes()
    whole = PcmDecoder("pcm_s16le", 24000).decode(raw, last=True)
    d = PcmDecoder("pcm_s16le", 24000)
    parts = np.concatenate([d.decode(raw[i:i + 962]) for i in range(0, len(raw), 962)] + [d.decode(b"", last=True)])
    assert len(whole) == 32000 and np.array_equal(whole, parts)
    stereo = PcmDecoder("pcm_s16le", 16000, channels=2).decode(np.array([100, 300], "<i2").tobytes())
    assert np.allclose(stereo, [200 / 32768])
    with pytest.raises(ValueError, match="whole number"):
        PcmDecoder("pcm_s16le", 16000).decode(b"\x00\x01\x02")
    for rate in (7999, 48001, 16000.0):
        with pytest.raises(ValueError, match="sample_rate"):
            PcmDecoder("pcm_s16le", rate)
    with pytest.raises(ValueError, match="unsupported encoding"):
        PcmDecoder("opus", 16000)


def turns(**settings) -> Turns:
    return Turns(TurnSettings(**settings), is_text=is_text)


def push(t: Turns, tokens: list[int], probability: float = 0.5) -> list:
    """Main-stream tokens, each of the model's ``probability``."""
    return t.push_tokens(tokens, [probability] * len(tokens))


def cut(t: Turns, samples: int, tokens: list[int], forked_at: int, probability: float = 0.25) -> list:
    """A fork's tokens, each of ``probability`` (by default not the main stream's)."""
    return t.push_cut(samples, tokens, [probability] * len(tokens), forked_at)


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events if not isinstance(e, Delta)]


def test_eager_end_needs_the_model_pad_run_and_speech_resumes_the_turn():
    t = turns(min_silence_ms=500)
    assert kinds(t.push_probabilities([0.9] * 20)) == ["TurnStarted"]  # 0.64 s of speech
    out = t.push_probabilities([0.05] * 5)  # 0.16 s quiet from 0.64 s
    assert kinds(out) == []
    # the model's tokens up to 0.64 s are text, then text again in the quiet: no eager end
    assert kinds(push(t, [100] * 8 + [101])) == []
    t2 = turns(min_silence_ms=500)
    t2.push_probabilities([0.9] * 20 + [0.05] * 5)
    out = push(t2, [100] * 8 + [PAD, PAD])  # pads for the audio since the quiet began
    eager = [e for e in out if not isinstance(e, Delta)]
    assert kinds(out) == ["EagerEnd"] and eager[0].time == pytest.approx(0.64)
    out = t2.push_probabilities([0.9] * 3)
    assert kinds(out) == ["TurnResumed"] and isinstance(out[0], TurnResumed) and out[0].time == pytest.approx(0.8)
    out = t2.push_probabilities([0.05] * 16)  # 0.512 s of silence: the turn ends
    assert kinds(out) == []  # ... once the tokens up to its end are in
    out = push(t2, [100] * 20)
    assert kinds(out) == ["Segment", "TurnEnded"]
    segment, ended = [e for e in out if not isinstance(e, Delta)]
    assert ended.reason == "threshold" and ended.time == pytest.approx(0.896)
    assert segment.tokens == ([100] * 8 + [PAD, PAD] + [100] * 20)[:len(segment.tokens)]


def test_end_timeout_ends_a_turn_whose_frames_hover_between_thresholds():
    t = turns(min_silence_ms=500, end_timeout_ms=1000)
    t.push_probabilities([0.9] * 10)
    out = t.push_probabilities([0.4] * 40) + push(t, [100] * 40)
    ended = [e for e in out if isinstance(e, TurnEnded)]
    assert len(ended) == 1 and ended[0].reason == "timeout" and ended[0].time == pytest.approx(0.32)


def test_no_turn_from_a_click_or_a_pause_shorter_than_min_silence():
    t = turns(min_silence_ms=500)
    assert kinds(t.push_probabilities([0.05] * 5 + [0.9] + [0.05] * 30)) == []  # one frame: a click
    out = t.push_probabilities([0.9] * 10 + [0.05] * 12 + [0.9] * 10)  # a 0.38 s pause
    assert kinds(out) == ["TurnStarted"]


def test_the_next_turn_start_waits_for_the_previous_turn_end():
    t = turns(min_silence_ms=320)
    out = t.push_probabilities([0.9] * 10 + [0.05] * 10 + [0.9] * 10)
    assert kinds(out) == ["TurnStarted"]  # the end (and the start after it) wait for the tokens
    out = push(t, [100] * 20)
    assert kinds(out) == ["Segment", "TurnEnded", "TurnStarted"]


def test_cuts_splice_forks_and_drop_the_main_tokens_they_cover():
    """Two flushes whose forks come back before any main token was published in between, then a
    third after main tokens."""
    t = turns()
    main = list(range(100, 140))  # the main stream's tokens, index i at 0.08 i s
    t.request_cut(6400)  # 0.4 s: resume at index 5
    t.request_cut(12800)  # 0.8 s: resume at index 10
    fork1 = main[:5] + [PAD] * 4  # the fork's tokens past the cut speak about padding
    fork2 = main[:10] + [PAD] * 4
    out = cut(t, 6400, fork1, 0) + cut(t, 12800, fork2, 0) + push(t, main[:20])
    segments = [e for e in out if isinstance(e, Segment)]
    assert [s.tokens for s in segments] == [fork1, fork2[5:]]
    assert [s.probabilities for s in segments] == [[0.25] * len(fork1), [0.25] * len(fork2[5:])]
    assert [(s.start, s.end) for s in segments] == [(0.0, 0.4), (0.4, 0.8)]
    assert all(s.forced for s in segments)
    delivered = [tok for e in out if isinstance(e, Delta) for tok in e.tokens]
    assert delivered == fork1 + fork2[5:] + main[10:20]
    # a third, its fork sharing the 20 main tokens: spliced after them, the main stream going on after it
    t.request_cut(25600)  # 1.6 s: resume at index 20
    fork3 = main[:20] + [PAD] * 4
    out = cut(t, 25600, fork3, 20) + push(t, main[20:30])
    assert [s.tokens for s in out if isinstance(s, Segment)] == [main[10:20] + [PAD] * 4]
    # the main stream's probabilities, then the fork's
    assert [s.probabilities for s in out if isinstance(s, Segment)] == [[0.5] * 10 + [0.25] * 4]
    assert [tok for e in out if isinstance(e, Delta) for tok in e.tokens] == [PAD] * 4 + main[20:30]


def test_a_cut_at_the_end_of_the_audio_is_its_last_final():
    """Finalize, then CloseStream (LiveKit's ``end_input`` sends both): no audio came after the cut,
    so the stream's own end pads what the fork padded; its tokens past the cut are not repeated.
    With audio after the cut, they are that audio's text and make the next final."""
    main = list(range(100, 110)) + [PAD] * 4  # 0.8 s of audio, then the padding of the end
    for after, rest in ((0, []), (1280, main[10:])):
        t = turns()
        t.request_cut(12800)
        out = cut(t, 12800, main, 0)
        t.end_of_audio(12800 + after)
        out += push(t, main) + t.finish()
        assert [s.tokens for s in out if isinstance(s, Segment)] == [main] + ([rest] if rest else [])



def test_scheduler_stops_intake_at_a_cut_and_forks_there():
    from voxlive.server.scheduler import Policy, SessionView, schedule

    policy = Policy(samples_per_token=1280, max_backlog_tokens=50, refill_below_tokens=12)
    plan = schedule([SessionView("s", started=True, inbox=9000, cut=3000)], policy)
    assert plan.ingest == {"s": 3000} and plan.fork == ["s"]
    # lagging far behind: it still forks at once when the cut is where the stream is
    plan = schedule([SessionView("s", started=True, inbox=9000, backlog=40, cut=0)], policy)
    assert "s" not in plan.ingest and plan.fork == ["s"]
    # the end waits for the pending cut, and the transcript for the forks in flight
    plan = schedule([SessionView("s", started=True, inbox=0, ending=True, cut=0)], policy)
    assert plan.fork == ["s"] and plan.end_audio == []
    plan = schedule([SessionView("s", started=True, audio_ended=True, forking=True)], policy)
    assert plan.complete == [] and plan.forks == ["s"] and bool(plan)
