"""The engine against the transformers implementation on the same random weights, in float32.

The audio is longer than both tiny sliding windows (encoder 24 frames, decoder 40 positions), so
the windows' exact extent is checked too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import voxlive
from voxlive_bench.reference import (
    load_reference,
    offline_padded_audio,
    offline_prompt_ids,
    reference_audio_embeds,
    reference_generate,
    reference_log_mel,
    reference_logits,
)


@pytest.fixture(scope="module")
def reference(varied_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads only add overhead
    yield load_reference(varied_dir, dtype=torch.float32)
    torch.set_num_threads(threads)


def _padded(model, speech, delay_ms):
    return offline_padded_audio(speech, model.config.delay_tokens(delay_ms), model.config.audio)


def test_mel_matches_reference(varied_model, speech):
    padded = _padded(varied_model, speech, 480)
    ours, ref = voxlive.log_mel(padded), reference_log_mel(padded)
    assert ours.shape == ref.shape == (128, len(padded) // 160)
    assert np.abs(ours - ref).max() < 1e-4


def test_audio_embeddings_match_reference(varied_model, reference, speech):
    mel = voxlive.log_mel(_padded(varied_model, speech, 480))
    assert mel.shape[1] // 2 > 4 * varied_model.config.encoder.sliding_window  # well past the window
    ours = varied_model.embed_audio(mel)
    ref = reference_audio_embeds(reference, mel)
    assert ours.shape == ref.shape == (mel.shape[1] // 8, varied_model.config.decoder.dim)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("delay_ms", [480, 160, 2400])
def test_teacher_forced_logits_and_greedy_tokens_match_reference(varied_model, reference, speech, delay_ms):
    delay = varied_model.config.delay_tokens(delay_ms)
    mel = voxlive.log_mel(_padded(varied_model, speech, delay_ms))
    prompt = offline_prompt_ids(varied_model.source + "/tekken.json", delay)
    assert prompt == varied_model.tokenizer.prompt(32, delay)

    ref_tokens = reference_generate(reference, mel, prompt, delay)
    ours = varied_model.transcribe(speech, delay_ms=delay_ms)
    # transformers stops one position before the end; voxlive also runs the last audio position
    assert ours.tokens[:-1] == ref_tokens
    assert len(set(ref_tokens)) >= 3

    ids = prompt + ref_tokens
    assert len(ids) > varied_model.config.decoder.sliding_window
    ref_logits = reference_logits(reference, ids, mel, delay)
    our_logits = varied_model.logits(ids, varied_model.embed_audio(mel), delay_ms=delay_ms)
    scale = np.abs(ref_logits).max()
    assert our_logits.shape == ref_logits.shape == (len(ids), varied_model.config.decoder.vocab_size)
    assert np.abs(our_logits - ref_logits).max() <= 1e-4 * scale


def test_token_probabilities_are_the_references_softmax_at_each_token(varied_model, reference, speech):
    delay_ms = 480
    delay = varied_model.config.delay_tokens(delay_ms)
    mel = voxlive.log_mel(_padded(varied_model, speech, delay_ms))
    prompt = offline_prompt_ids(varied_model.source + "/tekken.json", delay)
    stream = varied_model.stream(delay_ms=delay_ms)
    stream.feed(speech)
    tokens = stream.finish().tokens
    ids = prompt + tokens[:-1]  # position len(prompt) - 1 + i predicts tokens[i]
    ref_logits = torch.from_numpy(reference_logits(reference, ids, mel, delay)[len(prompt) - 1:])
    ref = torch.log_softmax(ref_logits.double(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)].numpy()
    ours = np.log(np.asarray(stream.probabilities, dtype=np.float64))
    assert len(ours) == len(tokens) and ref.min() < np.log(0.9)  # not all certain: the values say something
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_delay_changes_the_logits(varied_model, speech):
    # The delay conditions every FFN: a model that ignored it would pass the tests above only by luck.
    mel = voxlive.log_mel(_padded(varied_model, speech, 480))
    emb = varied_model.embed_audio(mel)
    ids = varied_model.tokenizer.prompt(32, 6)
    a = varied_model.logits(ids, emb, delay_ms=480)
    b = varied_model.logits(ids, emb, delay_ms=560)
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
