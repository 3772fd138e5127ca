"""The web page at ``/`` in a real (headless) Chromium against the real server and a tiny model.

Chromium's fake microphone plays a WAV of espeak-ng speech into the page's AudioWorklet, which
streams PCM over ``WS /asr``; the file upload goes through ``/v1/audio/transcriptions`` and the
downloads through ``/v1/subtitles``. The server runs with an API key, which the page gets only from
its own URL (``/?token=``), so every request passing proves the page forwards it.

Screenshots of the page are saved to ``$VOXLIVE_ARTIFACTS_DIR/page.png`` (after an upload, word
times shown) and ``page-live.png`` (while the microphone streams); the default folder is
``artifacts/`` at the repository root. Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from voxlive.audio import load_audio

API_KEY = "page-test-key"
SPEECH = "The quick brown fox jumps over the lazy dog. Streaming speech to text in the browser."
WAIT_MS = 60_000  # generous: a shared 2-core machine runs the browser, the server and the model
REPO = Path(__file__).resolve().parent.parent


def _chromium() -> str:
    for candidate in (os.environ.get("VOXLIVE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("no Chromium found (set VOXLIVE_CHROMIUM to its path)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """espeak-ng speech, converted to 48 kHz 16-bit mono (what Chromium's fake capture plays best)."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    folder = tmp_path_factory.mktemp("page")
    raw, path = folder / "raw.wav", folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(raw), SPEECH], check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-b", "16", "-c", "1", str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def server(varied_dir, wav):
    """The real app under uvicorn on a free loopback port, with an API key; yields (base URL, expected words)."""
    import uvicorn

    import voxlive
    from voxlive.server import Engine, create_app

    model = voxlive.load(varied_dir, dtype="float32", device="cpu")
    # What the upload must show: the server decodes the same file the same way. Computed before the
    # engine thread starts, so that nothing else uses the model meanwhile.
    expected = [w.text for w in model.transcribe(load_audio(wav)).words]
    app = create_app(Engine(model, max_sessions=4), model_id="tiny", api_key=API_KEY)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start within 30 s"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", expected
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(wav):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    executable = _chromium()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
        ])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    base, _ = server
    context = browser.new_context(accept_downloads=True, viewport={"width": 1000, "height": 820})
    page = context.new_page()
    console_errors = []
    page.on("pageerror", lambda err: console_errors.append(str(err)))
    page.goto(f"{base}/?token={API_KEY}")
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()
    assert not console_errors, f"JavaScript errors on the page: {console_errors}"


def _wait_status(page, prefix: str) -> str:
    """Wait until #status starts with ``prefix``, or an error shows (then fail at once, with it)."""
    page.wait_for_function(
        """prefix => document.querySelector('#status').textContent.startsWith(prefix)
                     || document.querySelector('#error').classList.contains('shown')""", arg=prefix)
    status = page.inner_text("#status")
    assert status.startswith(prefix), f"status {status!r}, error {page.inner_text('#error')!r}"
    return status


def _words(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#transcript .w",
        "els => els.map(e => ({text: e.textContent, start: +e.dataset.start, end: +e.dataset.end, title: e.title}))")


def _screenshot(page, tmp_path, name="page.png") -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    folder = Path(os.environ.get("VOXLIVE_ARTIFACTS_DIR", REPO / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / name, folder / name)


def test_page_needs_the_key(server):
    import httpx

    base, _ = server
    assert httpx.get(f"{base}/").status_code == 401
    assert httpx.get(f"{base}/?token=wrong").status_code == 401
    response = httpx.get(f"{base}/?token={API_KEY}")
    assert response.status_code == 200
    for element in ("start", "stop", "transcript", "lag", "status", "file", "upload", "download-txt", "download-srt"):
        assert f'id="{element}"' in response.text
    # One self-contained file: nothing loaded from elsewhere.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text)


def test_microphone_streams_live(page, tmp_path):
    page.wait_for_function("window.AudioWorkletNode !== undefined")
    assert page.inner_text("#status") == "ready"
    # Remember every word the page showed as pending (the word still being spoken).
    page.evaluate("""() => {
        window.pendingSeen = [];
        new MutationObserver(() => {
            const el = document.querySelector('#pending');
            if (el && el.textContent) window.pendingSeen.push([el.textContent, getComputedStyle(el).fontStyle]);
        }).observe(document.querySelector('#transcript'), {childList: true, subtree: true});
    }""")
    page.click("#start")
    assert _wait_status(page, "listening") == "listening"
    assert page.is_enabled("#stop") and page.is_disabled("#start") and page.is_disabled("#upload")
    # Words appear while the microphone is still on: live, not at the end.
    page.wait_for_function("""document.querySelectorAll('#transcript .w').length >= 5
                              || document.querySelector('#error').classList.contains('shown')""")
    assert not page.is_visible("#error"), page.inner_text("#error")
    assert page.inner_text("#status") == "listening"
    assert re.fullmatch(r"lag \d+\.\d s", page.inner_text("#lag"))
    _screenshot(page, tmp_path, "page-live.png")
    time.sleep(1.0)  # a little more speech
    page.click("#stop")
    _wait_status(page, "finished")

    words = _words(page)
    assert len(words) >= 5
    assert page.inner_text("#status") == f"finished · {len(words)} words"
    starts = [w["start"] for w in words]
    assert starts == sorted(starts)
    for w in words:
        assert w["text"].strip()
        assert 0 <= w["start"] <= w["end"] < 120
        assert w["title"] == f"{w['start']:.2f}–{w['end']:.2f} s"
    assert words[-1]["end"] > 0.5  # times come from the audio, not all zero
    assert re.fullmatch(r"lag \d+\.\d s", page.inner_text("#lag"))
    assert not page.is_visible("#error")
    assert page.query_selector("#pending") is None  # nothing is pending once the stream is over
    pending = page.evaluate("window.pendingSeen")
    assert pending, "no word in progress was ever shown"
    assert all(style == "italic" for _, style in pending)
    assert page.is_enabled("#start") and page.is_disabled("#stop")
    assert page.is_enabled("#download-txt")


def test_upload_and_downloads(page, server, wav, tmp_path):
    _, expected = server
    assert len(expected) >= 5, "the tiny model should say something about this speech"
    assert page.is_disabled("#upload")
    page.set_input_files("#file", str(wav))
    page.click("#upload")
    _wait_status(page, "transcribed")
    assert not page.is_visible("#error")
    words = _words(page)
    shown = [w["text"] for w in words]
    assert shown == expected, f"the page shows {shown}, the model says {expected}"
    assert all(w["title"].endswith(" s") and w["start"] <= w["end"] for w in words)
    assert f"{len(expected)} words" in page.inner_text("#status")

    with page.expect_download() as info:
        page.click("#download-srt")
    download = info.value
    assert download.suggested_filename == "speech.srt"
    srt = Path(download.path()).read_text(encoding="utf-8")
    assert srt.startswith("1\n00:00:")
    assert expected[0] in srt.split("\n")[2]
    assert re.search(r"^\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}$", srt, re.M)

    with page.expect_download() as info:
        page.click("#download-txt")
    text = Path(info.value.path()).read_text(encoding="utf-8")
    assert text.split() == " ".join(expected).split()

    page.check("#show-times")  # the screenshot shows every word's time
    _screenshot(page, tmp_path)


def test_upload_error_is_shown(page, tmp_path):
    bad = tmp_path / "not-audio.wav"
    bad.write_bytes(b"this is not audio at all" * 10)
    page.set_input_files("#file", str(bad))
    page.click("#upload")
    page.wait_for_function("document.querySelector('#status').textContent === 'upload failed'")
    assert page.is_visible("#error")
    assert "400" in page.inner_text("#error")


WORKLET_RUN = """async rate => {
    // The page's own AudioWorklet processor, fed a 440 Hz sine for one second at `rate`.
    const ctx = new OfflineAudioContext(1, rate, rate);
    const url = URL.createObjectURL(new Blob([WORKLET_SOURCE], {type: 'application/javascript'}));
    await ctx.audioWorklet.addModule(url);
    const node = new AudioWorkletNode(ctx, 'pcm-sender', {
        numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: 'explicit',
        processorOptions: {targetRate: SAMPLE_RATE, chunk: CHUNK_SAMPLES}});
    const chunks = [];
    node.port.onmessage = e => chunks.push(Array.from(new Int16Array(e.data.pcm)));
    const osc = new OscillatorNode(ctx, {frequency: 440});
    osc.connect(node);
    node.connect(ctx.destination);
    osc.start();
    await ctx.startRendering();
    const deadline = performance.now() + 10000;
    while (chunks.length < 12 && performance.now() < deadline) await new Promise(r => setTimeout(r, 20));
    return chunks;
}"""


@pytest.mark.parametrize("rate", [16000, 48000])
def test_worklet_sends_16khz_pcm(page, rate):
    """The processor posts 80 ms chunks of PCM s16 at 16 kHz, resampling when the context runs at another rate."""
    import numpy as np

    chunks = page.evaluate(WORKLET_RUN, rate)
    assert len(chunks) >= 12  # one second at 16 kHz: 12 full chunks of 1280 (the rest waits for a flush)
    assert all(len(c) == 1280 for c in chunks)
    got = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks[:12]]) / 32768
    want = np.sin(2 * np.pi * 440 * np.arange(len(got)) / 16000)
    assert np.max(np.abs(got - want)) < 0.01
