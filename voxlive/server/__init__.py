"""``voxlive serve``: many live streams on one loaded model, over standard protocols."""

from __future__ import annotations

import socket
import sys

from .app import create_app
from .engine import Engine
from .http import HttpProtocol
from .logs import redact_keys_in_uvicorn_logs

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # one WebSocket message; 2 minutes of PCM16
# uvicorn pings every 20 s and answers the client's pings, but never drops a late pong: liveness
# is the connection's idle and send timeouts (see connection.py), which know when the server is
# deliberately not reading. The HTTP protocol accepts an upgrade whose Connection header comes in
# several fields (see http.py).
WEBSOCKET_OPTIONS = {"ws_ping_interval": 20.0, "ws_ping_timeout": None, "http": HttpProtocol}


def serve(model, *, model_id: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          sock: socket.socket | None = None, max_sessions: int = 16, api_key: str | None = None,
          delay_ms: int | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
          max_upload_mb: float = 200.0, max_upload_seconds: float | None = 4 * 3600.0,
          idle_timeout: float | None = 7200.0, send_timeout: float | None = 60.0,
          log_level: str = "info") -> None:
    """Serve ``model`` until interrupted (uvicorn in this process, one engine thread).

    ``sock``: an already bound socket (the CLI binds it before loading the model, so a busy port
    is reported at once); ``host`` and ``port`` are then its own.
    """
    import uvicorn

    if sock is not None:
        host, port = sock.getsockname()[:2]
    engine = Engine(model, max_sessions=max_sessions)
    model_id = model_id or model.source
    app = create_app(engine, model_id=model_id, api_key=api_key, delay_ms=delay_ms, max_upload_mb=max_upload_mb,
                     max_upload_seconds=max_upload_seconds, idle_timeout=idle_timeout, send_timeout=send_timeout)
    config = uvicorn.Config(app, host=host, port=port, ws_max_size=max_message_bytes, log_level=log_level,
                            **WEBSOCKET_OPTIONS)
    redact_keys_in_uvicorn_logs(api_key)  # after uvicorn.Config, which configures its logging
    for line in startup_lines(app, model, model_id, host, port, max_sessions, api_key is not None):
        print(f"voxlive: {line}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it stopped on: it is how a server ends
        pass


def startup_lines(app, model, model_id: str, host: str, port: int, max_sessions: int, keyed: bool) -> list[str]:
    """What a user needs to start: the model as it runs, the address to open, the routes."""
    everywhere = host in ("0.0.0.0", "::", "")
    shown = "127.0.0.1" if everywhere else host
    url = f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"
    where = " (listening on every interface)" if everywhere else ""
    key = "; every route but the page and /health needs the API key (the page asks for it)" if keyed else ""
    routes = []
    for route in app.routes:
        if not getattr(route, "include_in_schema", True):
            continue
        methods = sorted(getattr(route, "methods", None) or {"WS"})
        routes.append(f"{'|'.join(methods)} {route.path}")
    return [f"model {model_id} ({model.summary}), up to {max_sessions} sessions",
            f"open {url} in a browser{where}{key}",
            f"routes: {', '.join(routes)}"]


__all__ = ["WEBSOCKET_OPTIONS", "Engine", "create_app", "serve"]
