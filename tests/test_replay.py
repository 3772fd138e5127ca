"""The benchmark's speech-shaped token stream, and its replay through the real session layer
(``voxlive_bench.replay``): what the computed real-time factors on speech rest on."""

from __future__ import annotations

import pytest

import voxlive
from voxlive.backends.runtime import MAX_DRAFT
from voxlive.config import MS_PER_TOKEN
from voxlive_bench.replay import PASSAGE, Replayer, real_tokenizer, relabel, speech_tokens

SHORT = " ".join(PASSAGE.split()[:60])  # three sentences: a replay of ~30 s


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return real_tokenizer(tmp_path_factory.mktemp("tekken"))


@pytest.fixture(scope="module")
def replayer(tiny_dir):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Replayer(voxlive.load(tiny_dir, dtype="float32", device="cpu"))
    torch.set_num_threads(threads)


@pytest.mark.parametrize("fraction", [0.6, 0.65, 0.7])
def test_speech_tokens_say_the_passage_at_a_speaking_rate_with_the_asked_share_of_pads(tokenizer, fraction):
    tokens = speech_tokens(tokenizer, pad_fraction=fraction)
    pads = sum(t == tokenizer.streaming_pad for t in tokens)
    assert abs(pads / len(tokens) - fraction) < 0.002
    assert tokenizer.decode(tokens) == " " + " ".join(PASSAGE.split())  # the text, every word once
    words = sum(t == tokenizer.streaming_word for t in tokens)
    assert words == len(PASSAGE.split())
    per_minute = words / (len(tokens) * MS_PER_TOKEN / 60_000)
    assert 90 < per_minute < 160  # read English, not a list of words nor a race
    assert max(_runs(tokens, tokenizer.streaming_pad)) > 10  # pauses at sentence ends


def _runs(tokens, pad):
    runs, n = [], 0
    for t in tokens:
        n = n + 1 if t == pad else 0
        runs.append(n)
    return runs


def test_a_replayed_stream_emits_its_script_and_drafts_cut_its_passes(tokenizer, replayer):
    vocab = replayer.model.config.decoder.vocab_size
    script = relabel(speech_tokens(tokenizer, text=SHORT), first=tokenizer.num_special, vocab_size=vocab)
    assert sum(t >= tokenizer.num_special for t in script) > 60  # a token or two per word, relabelled
    # one step at a time, a pass per token: the script's and the right pad's (delay + 1 + 10 = 17 at
    # 480 ms), less the delay's 6 the prompt runs and token 0, which its last position emits
    stepwise = replayer.rows(script, chunk_seconds=30.0, delay_ms=480, drafts=False)
    assert stepwise == [1] * (len(script) + 17 - 6 - 1)
    offline = replayer.rows(script, chunk_seconds=30.0, delay_ms=480)
    assert sum(offline) >= len(stepwise) and max(offline) <= MAX_DRAFT + 1
    assert len(offline) < 0.6 * len(stepwise)
    live = replayer.rows(script, chunk_seconds=0.24, delay_ms=480)
    chunks = len(script) * MS_PER_TOKEN // 240
    assert chunks <= len(live) < len(stepwise)  # a 240 ms chunk brings 3 positions: a pass at least
    assert max(live[:chunks]) <= 3  # ... and at most 3 rows (the right pad comes at once at the end)
