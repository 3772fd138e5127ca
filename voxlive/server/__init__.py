"""``voxlive serve``: many live streams on one loaded model, over standard protocols."""

from __future__ import annotations

from .app import create_app
from .engine import Engine

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one WebSocket message; 2 minutes of PCM16
# uvicorn pings every 20 s and answers the client's pings, but never drops a late pong: liveness
# is the connection's idle and send timeouts (see connection.py), which know when the server is
# deliberately not reading.
WEBSOCKET_OPTIONS = {"ws_ping_interval": 20.0, "ws_ping_timeout": None}


def serve(model, *, model_id: str | None = None, host: str = "127.0.0.1", port: int = 8000, max_sessions: int = 16, api_key: str | None = None,
          delay_ms: int | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          max_upload_mb: float = 200.0, idle_timeout: float | None = 7200.0, send_timeout: float | None = 60.0,
          log_level: str = "info") -> None:
    """Serve ``model`` until interrupted (uvicorn in this process, one engine thread)."""
    import uvicorn

    engine = Engine(model, max_sessions=max_sessions)
    app = create_app(engine, model_id=model_id or model.source, api_key=api_key, delay_ms=delay_ms,
                     max_upload_mb=max_upload_mb, idle_timeout=idle_timeout, send_timeout=send_timeout)
    uvicorn.run(app, host=host, port=port, ws_max_size=max_message_bytes, log_level=log_level, **WEBSOCKET_OPTIONS)


__all__ = ["Engine", "create_app", "serve"]
