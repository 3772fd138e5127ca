"""The ``voxlive`` command, run as a real subprocess on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
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


def one_line_error(r) -> str:
    """A mistake's whole report: exit status 2 and one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def unloadable(tmp_path_factory):
    """A checkpoint directory whose loading fails: a mistake reported instead proves it came first."""
    d = tmp_path_factory.mktemp("unloadable")
    (d / "params.json").write_text("{ not json")
    (d / "tekken.json").write_text("{}")
    (d / "consolidated.safetensors").write_bytes(b"")
    return d


@pytest.fixture(scope="module")
def two_wavs(tmp_path_factory):
    """x/a.wav and y/a.wav: two different files with the same name."""
    d = tmp_path_factory.mktemp("wavs")
    rng = np.random.default_rng(0)
    for sub in ("x", "y"):
        (d / sub).mkdir()
        sf.write(d / sub / "a.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    (d / "file").write_text("not a folder")
    return d


MISTAKES = {  # arguments after the command -> what the one line must say
    "device gpu on torch": (["transcribe", "{wav}", "--device", "gpu"], "'gpu' is the MLX backend's name"),
    "unknown device": (["transcribe", "{wav}", "--device", "tpu"], "runs on device 'cpu', 'cuda'"),
    "bad delay": (["transcribe", "{wav}", "--delay-ms", "100"], "delay_ms must be a multiple of 80"),
    "output dir is a file": (["transcribe", "{wav}", "--output-dir", "{dir}/file"], "is not a directory"),
    "output dir cannot be made": (["transcribe", "{wav}", "--output-dir", "{dir}/file/sub"], "cannot create it"),
    "same output twice": (["transcribe", "{dir}/x/a.wav", "{dir}/y/a.wav", "--output-dir", "{dir}/out"],
                          "would both write"),
    "several srt on stdout": (["transcribe", "{dir}/x/a.wav", "{dir}/y/a.wav", "--format", "srt"],
                              "need --output-dir"),
    "missing file": (["transcribe", "{dir}/missing.wav"], "missing.wav: no such file"),
    "int6 on torch": (["transcribe", "{wav}", "--backend", "torch", "--quantize", "int6"], "int6 is MLX only"),
    "argparse choice": (["transcribe", "{wav}", "--dtype", "bf16"], "invalid choice: 'bf16'"),
    "serve bad delay": (["serve", "--delay-ms", "100"], "delay_ms must be a multiple of 80"),
    "serve no sessions": (["serve", "--max-sessions", "0"], "--max-sessions must be at least 1"),
    "serve negative idle timeout": (["serve", "--idle-timeout", "-1"], "--idle-timeout must be at least 0"),
    "rut speech after a word": (["transcribe", "{wav}", "--rut-speech-after", "soon"],
                                "--rut-speech-after must be a count of positions or off"),
    "serve rut cap zero": (["serve", "--rut-cap", "0"], "slope and cap must be positive"),
    "listen device gpu": (["listen", "--device", "gpu"], "'gpu' is the MLX backend's name"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_ordinary_mistakes_are_one_line_before_loading(case, unloadable, two_wavs):
    args, says = MISTAKES[case]
    args = [a.format(wav=two_wavs / "x" / "a.wav", dir=two_wavs) for a in args]
    line = one_line_error(run(*args, "--model", unloadable))
    assert line.startswith("voxlive") and says in line, line
    assert "params.json" not in line  # the checkpoint was never opened
    assert not (two_wavs / "out").exists()


def test_busy_port_is_said_before_loading(unloadable):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(run("serve", "--model", unloadable, "--port", port))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "choose another --port" in line


def test_convert_without_quantize_asks_for_int8_or_int4(unloadable, tmp_path):
    line = one_line_error(run("convert", unloadable, tmp_path / "out"))
    assert "--quantize int8 or int4" in line and "int6" not in line


def test_offline_download_failure_says_how_to_give_a_local_checkpoint(tmp_path, two_wavs):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "voxlive", "transcribe", str(two_wavs / "x" / "a.wav"), "--model",
                        "voxlive-test/does-not-exist", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    line = one_line_error(r)
    assert "voxlive-test/does-not-exist: no such directory, and it could not be downloaded" in line
    for needed in ("--model DIR", "params.json", "consolidated.safetensors", "tekken.json",
                   "hf download voxlive-test/does-not-exist"):
        assert needed in line, needed


def test_several_files_json_lines_text_prefixes_and_outputs_kept_apart(varied_dir, two_wavs, tmp_path):
    x, y = two_wavs / "x" / "a.wav", two_wavs / "y" / "a.wav"
    r = run("transcribe", x, y, "--model", varied_dir, "--dtype", "float32", "--format", "json", "--quiet")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["file"] for rec in records] == [str(x), str(y)]
    assert all({"text", "words", "duration"} <= rec.keys() for rec in records)
    r = run("transcribe", x, y, "--model", varied_dir, "--dtype", "float32", "--quiet")
    assert [line.partition(": ")[0] for line in r.stdout.splitlines()] == [str(x), str(y)]
    out = tmp_path / "out"
    r = run("transcribe", x, two_wavs / "y" / ".." / "x" / "a.wav", "--model", varied_dir, "--output-dir", out,
            "--quiet")  # the same file twice is one output, not a clash
    assert r.returncode == 0, r.stderr
    assert [p.name for p in out.iterdir()] == ["a.txt"]


def test_version_and_python_m_voxlive():
    r = subprocess.run([sys.executable, "-m", "voxlive", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"voxlive {voxlive.__version__}\n"
    r = subprocess.run([sys.executable, "-m", "voxlive", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for command in ("transcribe", "listen", "serve", "bench", "convert", "demo-checkpoint"):
        assert command in r.stdout


def test_demo_checkpoint_says_words_that_follow_the_audio(tmp_path):
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    demo = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "voxlive", "demo-checkpoint", str(demo)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and f"--model {demo}" in r.stderr
    wavs = []
    for i, sentence in enumerate(["The quick brown fox jumps over the lazy dog.",
                                  "Streaming speech to text, word by word, in the terminal."]):
        subprocess.run(["espeak-ng", "-w", str(tmp_path / f"s{i}.wav"), sentence], check=True)
        wavs.append(tmp_path / f"s{i}.wav")
    sf.write(tmp_path / "silence.wav", np.zeros(3 * 16000, np.float32), 16000)
    r = run("transcribe", *wavs, tmp_path / "silence.wav", "--model", demo, "--format", "json", "--quiet")
    assert r.returncode == 0, r.stderr
    first, second, silence = [json.loads(line) for line in r.stdout.splitlines()]
    for speech in (first, second):
        assert len(speech["words"]) >= 5
        assert all(w["text"].isalpha() for w in speech["words"])  # words, not byte fragments
    assert first["text"] != second["text"]  # other speech, other words
    assert silence["text"] == "" and silence["words"] == []


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
    for needle in ("[voxlive] cpu float32", "ms per audio second", "ms per pass", "GEMV floor", "memory floor",
                   "transcribe()", "rest", "[transformers] cpu float32", "ms per token", "real-time factor", "peak RSS",
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
            "--quantize", "int8", "--no-drafts")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[voxlive] torch backend, int8 weights")
    assert "one position per step" in r.stdout.splitlines()[0]
    rows = [line.split() for line in r.stdout.splitlines()[3:]]
    assert [row[0] for row in rows] == ["1", "3"]
    # without drafts a step runs one position per stream in it
    assert float(rows[0][2]) == 1.0 and 1.0 <= float(rows[1][2]) <= 3.0
    assert all(float(row[6]) > 0 for row in rows)  # aggregate RTF
    assert rows[0][7] == "1.00x"  # one stream against itself
    assert run("bench", "--model", varied_dir, "--streams", 0).returncode == 2


def test_bench_by_minute_gives_a_row_per_audio_minute_as_it_goes(varied_dir, tmp_path):
    log = tmp_path / "minutes.log"
    r = run("bench", "--model", varied_dir, "--seconds", 150, "--dtype", "float32", "--streams", 1, "--by-minute",
            "--no-drafts", "--log", log)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()[3:]]
    assert [row[0] for row in rows] == ["1", "2"]  # whole minutes only
    assert all(float(row[2]) == 1.0 and float(row[5]) > 0 for row in rows)  # one position a step; RSS
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["1", "2"]
    assert run("bench", "--model", varied_dir, "--streams", 1, 2, "--by-minute").returncode == 2
    assert run("bench", "--model", varied_dir, "--streams", 1, "--seconds", 30, "--by-minute").returncode == 2
    assert run("bench", "--model", varied_dir, "--streams", 1, "--log", log).returncode == 2


def test_serve_says_what_it_serves_and_never_logs_the_key(varied_dir, varied_model, speech, tmp_path):
    import re
    import signal
    import threading
    import time

    import httpx
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    key = "s3cret-key-1234"
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    proc = subprocess.Popen([sys.executable, "-m", "voxlive", "serve", "--model", str(varied_dir), "--dtype",
                             "float32", "--port", "0", "--api-key", key, "--delay-ms", "240", "--idle-timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []  # everything the server prints, its logs included
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300  # a first run builds the CPU kernels
        while not any(line.startswith("voxlive: routes:") for line in output):
            assert proc.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            time.sleep(0.1)
        text = "".join(output)
        assert re.search(r"voxlive: model .* \(torch backend, cpu, float32, unquantized\), up to 16 sessions", text)
        base = re.search(r"voxlive: open (http://127\.0\.0\.1:\d+)/ in a browser", text).group(1)
        while True:  # the port is bound already; the app answers once its engine has started
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
            time.sleep(0.1)
        routes = re.search(r"voxlive: routes: (.*)", text).group(1)
        for route in ("GET /", "WS /v1/realtime", "WS /asr", "POST /v1/audio/transcriptions", "GET /health"):
            assert route in routes.split(", "), routes
        assert httpx.get(f"{base}/").status_code == 200  # the page needs no key (it holds no data)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models?token={key}").status_code == 200
        assert httpx.get(f"{base}/v1/models?token=mistyped-{key}").status_code == 401
        with connect(f"ws{base[4:]}/asr?token={key}&delay_ms=240") as ws:
            assert json.loads(ws.recv())["type"] == "config"
            assert "nothing received for 2 s" in json.loads(ws.recv(timeout=60))["error"]  # --idle-timeout 2
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=60)
            assert closed.value.rcvd.code == 1001
        with open(wav, "rb") as f:
            r = httpx.post(f"{base}/v1/audio/transcriptions", files={"file": f},
                           headers={"Authorization": f"Bearer {key}"}, timeout=120)
        assert r.json()["text"] == varied_model.transcribe(speech, delay_ms=240).text  # --delay-ms is the default
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert proc.returncode == 0
    logged = "".join(output)
    assert logged.count("token=<redacted>") == 3, logged  # the three requests with a token were logged...
    assert "WebSocket /asr?token=<redacted>&delay_ms=240" in logged
    assert key not in logged  # ...and no key, right or wrong, in any line


def test_log_redaction_keeps_the_rest_of_the_line():
    from voxlive.server.logs import RedactKeys

    short = RedactKeys("k")  # a key that is part of other words must not cut them up
    assert short.redact('"GET /v1/models?token=k HTTP/1.1" 200') == '"GET /v1/models?token=<redacted> HTTP/1.1" 200'
    assert short.redact('"WebSocket /asr?delay_ms=240&token=wrong"') == '"WebSocket /asr?delay_ms=240&token=<redacted>"'
    assert RedactKeys("s3cret").redact("key s3cret, not s3crets") == "key <redacted>, not s3crets"


def test_transcribe_without_drafts_gives_the_same_text(varied_dir, varied_model, speech, tmp_path):
    wav = tmp_path / "speech.wav"
    sf.write(wav, speech, 16000, subtype="FLOAT")
    r = run("transcribe", wav, "--model", varied_dir, "--dtype", "float32", "--no-drafts")
    assert r.returncode == 0, r.stderr
    assert r.stdout == varied_model.transcribe(speech).format("text")


def test_bench_drafts_reports_pass_costs_oracle_accuracies_and_rtf_on_speech(varied_dir):
    r = run("bench", "--model", varied_dir, "--seconds", 1, "--dtype", "float32", "--drafts")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    costs = [line.split() for line in lines[3:19]]
    assert [row[0] for row in costs] == [str(k) for k in range(1, 17)] and costs[0][2] == "1.00"
    at = next(i for i, line in enumerate(lines) if line.startswith("   p   ms/token")) + 1
    oracle = [line.split() for line in lines[at:at + 6]]
    assert [row[0] for row in oracle] == ["0.00", "0.25", "0.50", "0.75", "0.90", "1.00"]
    assert oracle[-1][3] == "1.00" and oracle[0][3] == "0.00"  # share of drafts accepted, fixed length
    table = {line[:15].strip(): line[15:].split() for line in lines if line[:15].strip() in
             ("one step a time", "file, drafts", "live 240 ms", "silence, file")}
    assert len(table) == 4
    # the speech stream's passes (the second table's rows, read last): drafts take fewer passes than
    # one step at a time, silence the fewest, and a pass one step at a time has one row
    speech = {name: (int(row[0]), float(row[1])) for name, row in table.items()}
    assert speech["one step a time"][1] == 1.0
    assert speech["silence, file"][0] < speech["file, drafts"][0] < speech["live 240 ms"][0] < speech["one step a time"][0]
    summary = lines[-1].split("|")
    assert summary[0].strip() == "unquantized" and len(summary[2].split()) == 4  # file, live, silence, p = 1


def test_serve_ray_options_are_checked_before_anything_starts(varied_dir):
    for args, says in ((["--replicas", 2], "--replicas needs --ray"),
                       (["--ray", "--replicas", 2, "--min-replicas", 1], "not both"),
                       (["--ray", "--min-replicas", 3, "--max-replicas", 2], "more than --max-replicas"),
                       (["--ray", "--target-sessions", 4], "needs --min-replicas"),
                       (["--ray", "--gpus-per-replica", -1], "at least 0"),
                       (["--ray", "--port", 0], "needs a --port")):
        r = run("serve", "--model", varied_dir, *args, timeout=120)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
