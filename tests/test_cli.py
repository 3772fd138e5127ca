"""The ``voxlive`` command, run as a real subprocess on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import soundfile as sf

import voxlive


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "voxlive.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_transcribe_formats_match_the_api(varied_dir, varied_model, speech, tmp_path):
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    expected = varied_model.transcribe(speech, delay_ms=240)
    r = run("transcribe", wav, "--model", varied_dir, "--dtype", "float32", "--format", "json", "--delay-ms", 240)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["text"] == expected.text and data["delay_ms"] == 240
    assert [w["text"] for w in data["words"]] == [w.text for w in expected.words]
    r = run("transcribe", wav, "--model", varied_dir, "--dtype", "float32", "--format", "text", "--delay-ms", 240)
    assert r.stdout == expected.format("text")


def test_output_dir_and_a_bad_file_among_good_ones(varied_dir, speech, tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, speech, 16000)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"this is not audio at all" * 100)
    out = tmp_path / "out"
    r = run("transcribe", good, bad, "--model", varied_dir, "--format", "srt", "--output-dir", out)
    assert r.returncode == 1
    assert "bad.wav" in r.stderr and "cannot decode" in r.stderr
    srt = (out / "good.srt").read_text()
    assert srt.startswith("1\n00:00:0")  # this random model does emit words on speech
    assert not (out / "bad.srt").exists()
    vtt = run("transcribe", good, "--model", varied_dir, "--format", "vtt", "--output-dir", out)
    assert vtt.returncode == 0 and (out / "good.vtt").read_text().startswith("WEBVTT")


def test_progress_bar_on_long_files(varied_dir, tmp_path):
    wav = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    sf.write(wav, (0.05 * rng.standard_normal(16000 * 35)).astype(np.float32), 16000)
    r = run("transcribe", wav, "--model", varied_dir)
    assert r.returncode == 0, r.stderr
    assert "long.wav" in r.stderr and "35.0/35.0" in r.stderr
    r = run("transcribe", wav, "--model", varied_dir, "--quiet")
    assert r.stderr == ""


def test_clear_errors(varied_dir, tmp_path):
    r = run("transcribe", tmp_path / "missing.wav", "--model", varied_dir)
    assert r.returncode == 2 and "missing.wav: no such file" in r.stderr
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    r = run("transcribe", wav, "--model", varied_dir, "--delay-ms", 500)
    assert r.returncode == 2 and "delay_ms must be a multiple of 80" in r.stderr
    r = run("transcribe", wav, "--model", tmp_path / "nowhere")
    assert r.returncode == 2 and "no such directory" in r.stderr
    for line in r.stderr.splitlines():
        assert "Traceback" not in line


def test_listen_without_an_input_device_says_so(varied_dir):
    try:
        import sounddevice

        has_input = any(d["max_input_channels"] > 0 for d in sounddevice.query_devices())
    except (ImportError, OSError):
        has_input = False
    if has_input:
        import pytest

        pytest.skip("this machine has a real microphone")
    r = run("listen", "--model", varied_dir, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("voxlive: ") and ("input device" in r.stderr or "PortAudio" in r.stderr)
    assert "Traceback" not in r.stderr


def test_version_and_public_api():
    assert voxlive.__version__
    for name in ("load", "log_mel", "Transcript", "Word"):
        assert hasattr(voxlive, name)


def test_bench_reports_both_engines(varied_dir):
    r = run("bench", "--model", varied_dir, "--seconds", 2, "--dtype", "float32", "--reference")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("[voxlive] cpu float32", "ms per audio second", "ms per step", "GEMV floor", "memory floor",
                   "stream start", "[transformers] cpu float32", "ms per token", "real-time factor", "peak RSS",
                   "speed-up vs transformers"):
        assert needle in out, needle
    assert run("bench").returncode == 2  # neither --model nor --random-weights


def test_bench_quantized_modes(varied_dir):
    r = run("bench", "--model", varied_dir, "--seconds", 1, "--quantize", "none", "int4")
    assert r.returncode == 0, r.stderr
    headers = [line for line in r.stdout.splitlines() if line.startswith("[voxlive]")]
    assert len(headers) == 2 and "weights" not in headers[0] and "int4 weights" in headers[1]
    assert r.stdout.count("memory floor") == 2


def test_bench_streams_reports_each_count(varied_dir):
    r = run("bench", "--model", varied_dir, "--seconds", 1, "--dtype", "float32", "--streams", 1, 3,
            "--quantize", "int8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[voxlive] torch backend, int8 weights")
    rows = [line.split() for line in r.stdout.splitlines()[3:]]
    assert [row[0] for row in rows] == ["1", "3"]
    assert all(float(row[4]) > 0 for row in rows)  # aggregate RTF
    assert rows[0][5] == "1.00x"  # one stream against itself
    assert run("bench", "--model", varied_dir, "--streams", 0).returncode == 2


def test_serve_runs_the_server_until_interrupted(varied_dir, varied_model, speech, tmp_path):
    import signal
    import time

    import httpx
    from serving import free_port

    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "voxlive.cli", "serve", "--model", str(varied_dir), "--dtype",
                             "float32", "--port", str(port), "--api-key", "k", "--delay-ms", "240"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        with open(wav, "rb") as f:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/audio/transcriptions", files={"file": f},
                           headers={"Authorization": "Bearer k"}, timeout=120)
        assert r.json()["text"] == varied_model.transcribe(speech, delay_ms=240).text.strip()  # --delay-ms is the default
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert run("serve", "--model", varied_dir, "--max-sessions", 0).returncode == 2


def test_transcribe_without_drafts_gives_the_same_text(varied_dir, varied_model, speech, tmp_path):
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    r = run("transcribe", wav, "--model", varied_dir, "--dtype", "float32", "--no-drafts")
    assert r.returncode == 0, r.stderr
    assert r.stdout == varied_model.transcribe(speech).format("text")


def test_bench_drafts_reports_pass_costs_and_oracle_accuracies(varied_dir):
    r = run("bench", "--model", varied_dir, "--seconds", 1, "--dtype", "float32", "--drafts")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    costs = [line.split() for line in lines[3:19]]
    assert [row[0] for row in costs] == [str(k) for k in range(1, 17)] and costs[0][2] == "1.00"
    oracle = [line.split() for line in lines[-6:]]
    assert [row[0] for row in oracle] == ["0.00", "0.25", "0.50", "0.75", "0.90", "1.00"]
    assert oracle[-1][3] == "1.00" and oracle[0][3] == "0.00"  # share of drafts accepted, fixed length
