"""``voxlive serve``: many live streams on one loaded model, over standard protocols."""

from __future__ import annotations

from .app import create_app
from .engine import Engine

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one WebSocket message; 2 minutes of PCM16


def serve(model, *, model_id: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 16, api_key: str | None = None,
          delay_ms: int | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          max_upload_mb: float = 200.0, log_level: str = "info") -> None:
    """Serve ``model`` until interrupted (uvicorn in this process, one engine thread)."""
    import uvicorn

    engine = Engine(model, max_sessions=max_sessions)
    app = create_app(engine, model_id=model_id or model.source, api_key=api_key, delay_ms=delay_ms, max_upload_mb=max_upload_mb)
    uvicorn.run(app, host=host, port=port, ws_max_size=max_message_bytes, log_level=log_level)


__all__ = ["Engine", "create_app", "serve"]
