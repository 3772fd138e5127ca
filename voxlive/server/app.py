"""The FastAPI app: routes, authentication, the OpenAI-compatible upload, the web page."""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser

from ..audio import AudioError, load_audio
from ..rut import DEFAULT_POLICY, RutPolicy
from ..transcript import Word, cues, subtitles
from . import metrics
from .engine import Engine, EngineBusy
from .deepgram import deepgram_endpoint
from .mistral import mistral_endpoint
from .realtime import realtime_endpoint
from .settings import ServerState, authorized, state_of
from .wlk import asr_endpoint

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
UPLOAD_CHUNK_SECONDS = 1.0
MAX_SUBTITLES_BYTES = 16 * 1024 * 1024
MAX_WORD_SECONDS = 1e7  # 115 days: a time past this is no word of a recording


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def create_app(engine: Engine, *, model_id: str, api_key: str | None = None, delay_ms: int | None = None,
               max_upload_mb: float = 200.0, max_upload_seconds: float | None = 4 * 3600.0,
               idle_timeout: float | None = 7200.0, send_timeout: float | None = 60.0,
               replica: str | None = None, rut: RutPolicy | None = DEFAULT_POLICY) -> FastAPI:
    """The app around a (not yet started) engine; the app's lifespan starts and stops it.

    ``replica``: this server's name among several behind one endpoint (Ray Serve): /health and
    /metrics carry it, and so does every WebSocket handshake (``x-voxlive-replica``). ``rut``: the
    sessions' default blank-rut policy (None: off)."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="voxlive", lifespan=lifespan)
    app.state.voxlive = ServerState(engine, model_id, api_key, delay_ms, int(max_upload_mb * 1024 * 1024),
                                    max_upload_seconds=max_upload_seconds, idle_timeout=idle_timeout,
                                    send_timeout=send_timeout, replica=replica,
                                    rut=rut.check() if rut is not None else None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": None}}
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    def require_key(request: Request) -> None:
        if not authorized(request, state_of(request.app).api_key):
            raise ApiError(401, "invalid or missing API key", "authentication_error",
                           headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        """The load, and the settings sessions get unless they ask otherwise (behind a load
        balancer: what each replica was started with)."""
        load = engine.load()
        state = state_of(app)
        body = {"status": "ok", "model": model_id, "sessions": load.sessions, "max_sessions": load.max_sessions,
                "lag": load.lag, "blank_ruts": load.ruts, "idle_timeout": state.idle_timeout,
                "send_timeout": state.send_timeout, "rut": asdict(state.rut) if state.rut is not None else None}
        return body if replica is None else {**body, "replica": replica}

    @app.get("/metrics")
    async def metrics_route():
        """Prometheus text, without the key (like /health): load figures, no data."""
        return Response(metrics.render(engine.load(), replica=replica), media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        require_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "voxlive"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        """The web page, without the key: it holds no data, and asks for the key when the server has one."""
        return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(resources.files(__package__).joinpath("static/favicon.svg").read_bytes(),
                        media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        require_key(request)
        return await transcribe_upload(request, state_of(request.app))

    @app.post("/v1/subtitles")
    async def subtitles_route(request: Request):
        """Words (as the live protocols send them) -> SRT or WebVTT, for the page's download button."""
        require_key(request)
        body = await json_body(request, MAX_SUBTITLES_BYTES)
        try:
            words = [subtitle_word(w) for w in body["words"]]
            fmt = body.get("format", "srt")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ApiError(400, f"expected {{words: [{{text, start, end}}], format}}: {err}") from None
        if fmt not in ("srt", "vtt"):
            raise ApiError(400, f"format must be srt or vtt, got {fmt!r}", param="format")
        return PlainTextResponse(subtitles(words, vtt=fmt == "vtt"))

    app.add_api_websocket_route("/v1/realtime", realtime_endpoint)
    app.add_api_websocket_route("/asr", asr_endpoint)
    app.add_api_websocket_route("/v1/audio/transcriptions/realtime", mistral_endpoint)
    app.add_api_websocket_route("/v1/listen", deepgram_endpoint)
    return app


async def json_body(request: Request, limit: int):
    """The request's JSON, or a 400 for what cannot be parsed (nesting too deep, integers of more
    than 4,300 digits) and a 413 past ``limit`` bytes. NaN and Infinity parse: callers check ranges."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body larger than {limit // (1024 * 1024)} MB")
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"invalid JSON: {str(err)[:200]}") from None


def subtitle_word(w: dict) -> Word:
    text = w["text"]
    if not isinstance(text, str):
        raise TypeError("a word's text must be a string")
    start, end = float(w["start"]), float(w["end"])
    if not (0 <= start <= end <= MAX_WORD_SECONDS):
        raise ValueError(f"a word's times must be 0 <= start <= end <= {MAX_WORD_SECONDS:g} s, got {start}, {end}")
    return Word(text, start, end)


async def limited_body(request: Request, limit: int):
    """The request body as it arrives, ended with a 413 as soon as it passes ``limit`` bytes (also
    when the client sends no Content-Length), so no more than that is ever received."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise ApiError(413, f"upload larger than {limit // (1024 * 1024)} MB", param="file")
        yield chunk


async def hung_up(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def transcribe_upload(request: Request, state: ServerState) -> Response:
    """POST /v1/audio/transcriptions: the file runs as one more stream in the engine's batches."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > state.max_upload_bytes + 64 * 1024:
        raise ApiError(413, f"upload larger than {state.max_upload_bytes // (1024 * 1024)} MB", param="file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "expected multipart/form-data")
    try:
        parser = MultiPartParser(request.headers, limited_body(request, state.max_upload_bytes + 64 * 1024))
        form = await parser.parse()
    except ApiError:
        raise
    except Exception as err:  # noqa: BLE001 - malformed multipart of any kind
        raise ApiError(400, f"expected multipart/form-data: {err}") from None
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ApiError(400, "missing the 'file' field", param="file")
    fmt = form.get("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", param="response_format")
    try:
        delay_ms = state.delay_from(form.get("delay_ms"))
    except ValueError as err:
        raise ApiError(400, str(err), param="delay_ms") from None
    data = await file.read(state.max_upload_bytes + 1)
    await form.close()
    if len(data) > state.max_upload_bytes:
        raise ApiError(413, f"upload larger than {state.max_upload_bytes // (1024 * 1024)} MB", param="file")
    try:
        pcm = await asyncio.to_thread(load_audio, data, max_seconds=state.max_upload_seconds)
    except AudioError as err:
        raise ApiError(400, f"{file.filename or 'file'}: {err}", param="file") from None
    try:
        session = state.engine.open(delay_ms=delay_ms, rut=state.rut, vad=state.rut_vad(state.rut))
    except EngineBusy as err:
        raise ApiError(503, str(err), "server_busy", headers={"Retry-After": "5"}) from None

    async def feed():
        step = int(UPLOAD_CHUNK_SECONDS * state.engine.model.config.audio.sample_rate)
        for start in range(0, len(pcm), step):
            await session.append(pcm[start:start + step])
        session.end()

    async def result():
        while True:
            update = await session.next_update()
            if update.error:
                raise ApiError(500, update.error, "server_error")
            if update.transcript is not None:
                return update

    feeder = asyncio.create_task(feed())
    waiting, gone = asyncio.create_task(result()), asyncio.create_task(hung_up(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            return Response(status_code=499)  # nobody will read it: the transcription is cancelled
        update = waiting.result()
    finally:
        for task in (feeder, waiting, gone):
            task.cancel()
        session.close()
    t = update.transcript
    if fmt in ("text", "srt", "vtt"):
        return PlainTextResponse(t.format(fmt))
    usage = {"type": "duration", "seconds": math.ceil(t.duration)}
    if fmt == "json":
        return JSONResponse({"text": t.text.strip(), "usage": usage})
    segments = [{
        "id": i, "seek": 0, "start": g[0].start, "end": g[-1].end, "text": " ".join(w.text for w in g),
        "tokens": [], "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 0.0, "no_speech_prob": 0.0,
    } for i, g in enumerate(cues(t.words))]
    return JSONResponse({
        "task": "transcribe", "language": form.get("language") or "", "duration": round(t.duration, 3),
        "text": t.text.strip(), "words": [{"word": w.text, "start": w.start, "end": w.end} for w in t.words],
        "segments": segments, "usage": usage,
    })
