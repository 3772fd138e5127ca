"""The web page at ``/`` in a real (headless) Chromium against the real server and a tiny model.

Chromium's fake microphone plays a WAV of espeak-ng speech into the page's AudioWorklet, which
streams PCM over ``WS /asr``; the file upload goes through ``/v1/audio/transcriptions`` and the
downloads through ``/v1/subtitles``. The server runs with an API key, which the page gets only from
its own URL (``/?token=``) or its key field, so every request passing proves the page forwards it.

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
    expected_240 = [w.text for w in model.transcribe(load_audio(wav), delay_ms=240).words]
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
    yield f"http://127.0.0.1:{port}", expected, expected_240
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


def _open(browser, url):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1000, "height": 820})
    page = context.new_page()
    page.console_errors = []
    page.failed_loads = []  # what the page itself asked for and did not get (a favicon, a script)
    page.on("pageerror", lambda err: page.console_errors.append(str(err)))
    page.on("response", lambda r: r.status == 404 and page.failed_loads.append(r.url))
    page.goto(url)
    page.set_default_timeout(WAIT_MS)
    return context, page


@pytest.fixture
def page(browser, server):
    base = server[0]
    context, page = _open(browser, f"{base}/?token={API_KEY}")
    yield page
    context.close()
    assert not page.console_errors, f"JavaScript errors on the page: {page.console_errors}"
    assert not page.failed_loads, f"404 on {page.failed_loads}"


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


def test_page_is_served_without_the_key_but_nothing_else_is(server):
    import httpx

    base = server[0]
    response = httpx.get(f"{base}/")  # the page holds no data: anyone may load it, and it asks for the key
    assert response.status_code == 200
    for element in ("start", "stop", "transcript", "lag", "status", "file", "upload", "download-txt", "download-srt",
                    "key", "delay"):
        assert f'id="{element}"' in response.text
    # One self-contained file: nothing loaded from elsewhere.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", response.text)
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    icon = httpx.get(f"{base}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.text.startswith("<svg")


def test_key_field_unlocks_the_page(browser, server):
    base = server[0]
    context, page = _open(browser, f"{base}/")
    try:
        page.wait_for_selector("#key-card", state="visible")
        assert page.inner_text("#key-note") == "This server needs its API key."
        assert page.inner_text("#status") == "waiting for the API key"
        assert page.is_disabled("#start")
        page.fill("#key", "wrong-key")
        page.click("#key-use")
        page.wait_for_function("document.querySelector('#key-note').textContent === 'The server refused this key.'")
        assert page.is_visible("#key-card") and page.is_disabled("#start")
        page.fill("#key", API_KEY)
        page.click("#key-use")
        page.wait_for_selector("#key-card", state="hidden")
        assert page.inner_text("#status") == "ready" and page.is_enabled("#start")
        page.reload()  # the tab keeps the key
        page.wait_for_function("document.querySelector('#status').textContent === 'ready'")
        assert not page.is_visible("#key-card")
    finally:
        context.close()
    assert not page.console_errors and not page.failed_loads


def test_key_is_taken_out_of_the_address_bar(page):
    page.wait_for_function("document.querySelector('#status').textContent === 'ready'")
    assert "token" not in page.url and not page.is_visible("#key-card")


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
    expected = server[1]
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


def test_delay_selector_sets_the_delay(page, server, wav):
    expected, expected_240 = server[1], server[2]
    assert expected_240 != expected  # the delay changes what this model says
    assert page.eval_on_selector("#delay", "s => s.value") == ""  # the server's default
    page.select_option("#delay", "240")
    page.set_input_files("#file", str(wav))
    page.click("#upload")
    _wait_status(page, "transcribed")
    assert [w["text"] for w in _words(page)] == expected_240


def test_failed_microphone_start_keeps_the_transcript(page, server, wav):
    expected = server[1]
    page.set_input_files("#file", str(wav))
    page.click("#upload")
    _wait_status(page, "transcribed")
    assert [w["text"] for w in _words(page)] == expected
    page.evaluate("""() => { navigator.mediaDevices.getUserMedia =
        () => Promise.reject(new DOMException('Permission denied', 'NotAllowedError')); }""")
    page.click("#start")
    page.wait_for_function("document.querySelector('#error').classList.contains('shown')")
    assert "Could not start: Permission denied" in page.inner_text("#error")
    page.wait_for_function("document.querySelector('#status').textContent === 'stopped with an error'")
    assert [w["text"] for w in _words(page)] == expected  # the file's transcript is still there
    assert page.is_enabled("#download-srt") and page.is_enabled("#start")


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
