"""The compiled decoder forward gives the eager one's tokens (tiny model, float32).

Compiling takes tens of seconds on a small CPU, so this is one test: batched streams of several
delays and lengths (a batch of 3, then single streams), through more positions than the tiny
decoder's 40-position window holds.
"""

from __future__ import annotations

import voxlive
from voxlive.session import decode_available


def test_compiled_decode_equals_eager(varied_dir, speech):
    eager = voxlive.load(varied_dir, dtype="float32", device="cpu", quantize="int8")
    compiled = voxlive.load(varied_dir, dtype="float32", device="cpu", quantize="int8", compile=True)
    audios = [speech, speech[::-1].copy(), 0.5 * speech[: len(speech) // 2]]
    delays = [480, 240, 480]
    expected = [eager.transcribe(a, delay_ms=d).tokens for a, d in zip(audios, delays)]
    assert len(expected[0]) + 38 > eager.config.decoder.sliding_window
    streams = [compiled.stream(delay_ms=d) for d in delays]
    step = 6000
    for start in range(0, max(map(len, audios)), step):
        for s, a in zip(streams, audios):
            if start < len(a):
                s.push(a[start:start + step])
        decode_available(streams)
    for s, exp in zip(streams, expected):
        assert s.finish().tokens == exp
