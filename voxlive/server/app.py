"""The FastAPI app: routes, authentication, the OpenAI-compatible upload, the web page."""

from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile

from ..audio import AudioError, load_audio
from ..transcript import Word, cues, subtitles
from .engine import Engine, EngineBusy
from .realtime import realtime_endpoint
from .settings import ServerState, authorized, state_of
from .wlk import asr_endpoint

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
UPLOAD_CHUNK_SECONDS = 1.0


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def create_app(engine: Engine, *, model_id: str, api_key: str | None = None, delay_ms: int | None = None,
               max_upload_mb: float = 200.0) -> FastAPI:
    """The app around a (not yet started) engine; the app's lifespan starts and stops it."""

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="voxlive", lifespan=lifespan)
    app.state.voxlive = ServerState(engine, model_id, api_key, delay_ms, int(max_upload_mb * 1024 * 1024))

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
        return {"status": "ok", "model": model_id, "sessions": engine.active, "max_sessions": engine.max_sessions}

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
        try:
            body = await request.json()
            words = [Word(str(w["text"]), float(w["start"]), float(w["end"])) for w in body["words"]]
            fmt = body.get("format", "srt")
        except (ValueError, KeyError, TypeError) as err:
            raise ApiError(400, f"expected {{words: [{{text, start, end}}], format}}: {err}") from None
        if fmt not in ("srt", "vtt"):
            raise ApiError(400, f"format must be srt or vtt, got {fmt!r}", param="format")
        return PlainTextResponse(subtitles(words, vtt=fmt == "vtt"))

    app.add_api_websocket_route("/v1/realtime", realtime_endpoint)
    app.add_api_websocket_route("/asr", asr_endpoint)
    return app


async def transcribe_upload(request: Request, state: ServerState) -> Response:
    """POST /v1/audio/transcriptions: the file runs as one more stream in the engine's batches."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > state.max_upload_bytes + 64 * 1024:
        raise ApiError(413, f"upload larger than {state.max_upload_bytes // (1024 * 1024)} MB", param="file")
    try:
        form = await request.form()
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
    if len(data) > state.max_upload_bytes:
        raise ApiError(413, f"upload larger than {state.max_upload_bytes // (1024 * 1024)} MB", param="file")
    try:
        pcm = await asyncio.to_thread(load_audio, data)
    except AudioError as err:
        raise ApiError(400, f"{file.filename or 'file'}: {err}", param="file") from None
    try:
        session = state.engine.open(delay_ms=delay_ms)
    except EngineBusy as err:
        raise ApiError(503, str(err), "server_busy", headers={"Retry-After": "5"}) from None

    async def feed():
        step = int(UPLOAD_CHUNK_SECONDS * state.engine.model.config.audio.sample_rate)
        for start in range(0, len(pcm), step):
            await session.append(pcm[start:start + step])
        session.end()

    feeder = asyncio.create_task(feed())
    try:
        while True:
            update = await session.next_update()
            if update.error:
                raise ApiError(500, update.error, "server_error")
            if update.transcript is not None:
                break
    finally:
        feeder.cancel()
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
