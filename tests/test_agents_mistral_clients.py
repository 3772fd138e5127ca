"""LiveKit's ``mistralai`` STT plugin and Pipecat's ``MistralSTTService`` against the real server.

Both pin the mistralai SDK below 3 while the rest of the tests use 3.x, so the pinned SDK and the
LiveKit plugin are installed (without dependencies: everything else they need is in the test
environment) into a folder of their own, and the clients run in a process that puts it first on
its path (tests/mistral_clients.py). Each client runs its own VAD and flushes at each end of speech;
the server answers each flush with a ``transcription.done`` (the clients' final transcript) that must
equal offline ``transcribe`` of the audio up to the flush over its tokens, the stretches following each
other; the rest of the stream comes with ``input_audio.end``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dialogue import RATE, agent_server, as_float

pytest.importorskip("livekit.agents")
pytest.importorskip("pipecat")

PINNED = ["mistralai[realtime]==2.10.1", "livekit-plugins-mistralai==1.8.9"]
KEY = "mistral-clients-key"
HELPER = Path(__file__).with_name("mistral_clients.py")


@pytest.fixture(scope="module")
def mistral2(tmp_path_factory):
    """A folder holding the pinned mistralai 2.x and the LiveKit plugin that needs it."""
    target = tmp_path_factory.mktemp("mistral2")
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           *PINNED], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot install {' '.join(PINNED)}: {done.stderr.strip()[-300:]}")
    return target


@pytest.fixture(scope="module")
def server(varied_dir):
    with agent_server(varied_dir, KEY) as host:
        yield host


def run_client(mistral2, server, tmp_path, pcm16, client: str, pauses: list[int]) -> list[dict]:
    audio = tmp_path / "audio.s16le"
    pcm16.tofile(audio)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mistral2), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HELPER), client, server, KEY, str(audio), *map(str, pauses)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def expected_finals(model, pcm16, cuts: list[int]) -> list[str]:
    """The text of each flush at ``cuts`` (samples), then of the rest at the end of the stream
    (none if the last flush was at the end: its text already reached the end)."""
    tok = model.tokenizer
    texts, resume = [], 0
    for n in cuts:
        texts.append(tok.decode(model.transcribe(as_float(pcm16[:n])).tokens[resume:]))
        resume = math.ceil(n / model.config.audio.samples_per_token)
    rest = model.transcribe(as_float(pcm16)).tokens[resume:] if cuts[-1] < len(pcm16) else []
    return texts + [tok.decode(rest)]


def test_livekit_mistralai_plugin_finals_per_turn(mistral2, server, dialogue, varied_model, tmp_path):
    """The plugin's VAD ends speech once per turn and flushes, and ``end_input`` flushes the rest:
    its final transcripts (one per flush, and an empty one at the end) are the offline texts up to
    each flush, which the final's segment times locate; its interim transcripts grow toward the
    next final."""
    pcm16, turns = dialogue
    pauses = [int((stop + 0.8) * RATE) // 800 * 800 for _, stop in turns]  # past each VAD's stop
    events = run_client(mistral2, server, tmp_path, pcm16, "livekit", pauses)
    kinds = [e["type"] for e in events if e["type"].endswith("_OF_SPEECH")]
    assert kinds == ["START_OF_SPEECH", "END_OF_SPEECH"] * len(turns)
    finals = [e for e in events if e["type"] == "FINAL_TRANSCRIPT"]
    assert len(finals) == len(turns) + 2
    cuts = [round(final["ends"][-1] * RATE) for final in finals[:-1]]
    for (_, stop), cut, pause in zip(turns, cuts, pauses):
        assert stop + 0.4 <= cut / RATE <= pause / RATE  # where the client's VAD ended the speech
    assert cuts[-1] == len(pcm16)
    assert [f["text"] for f in finals] == expected_finals(varied_model, pcm16, cuts)
    assert finals[-1]["text"] == ""
    upcoming = None
    for e in reversed(events):
        if e["type"] == "FINAL_TRANSCRIPT":
            upcoming = e["text"]
        elif e["type"] == "INTERIM_TRANSCRIPT":
            assert upcoming.startswith(e["text"])


def test_pipecat_mistral_service_finals_per_turn(mistral2, server, dialogue, varied_model, tmp_path):
    """Pipecat's VAD stops once per turn and the service flushes there: one TranscriptionFrame per
    turn, the offline text up to the audio that had passed before the stop."""
    pcm16, turns = dialogue
    events = run_client(mistral2, server, tmp_path, pcm16, "pipecat", [0] * len(turns))
    stops = [e["samples"] for e in events if e["type"] == "stopped"]
    assert len(stops) == len([e for e in events if e["type"] == "started"]) == len(turns)
    for (_, stop), cut in zip(turns, stops):
        assert stop + 0.4 <= cut / RATE <= stop + 1.0
    finals = [e["text"] for e in events if e["type"] == "final"]
    assert finals == expected_finals(varied_model, pcm16, stops)[:len(turns)]
