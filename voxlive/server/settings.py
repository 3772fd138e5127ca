"""The server's configuration as the request handlers see it, and the API-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .engine import Engine


@dataclass
class ServerState:
    engine: Engine
    model_id: str  # the name /v1/models lists
    api_key: str | None = None
    delay_ms: int | None = None  # the default for sessions that do not ask for one
    max_upload_bytes: int = 200 * 1024 * 1024
    max_upload_seconds: float | None = 4 * 3600.0  # uploads longer than this are refused (None: no limit)
    idle_timeout: float | None = 7200.0  # seconds without a client message (None: never)
    send_timeout: float | None = 60.0  # seconds one message may wait for a client that does not read
    replica: str | None = None  # this server's name among replicas (Ray Serve), told in handshakes
    vad: object = None  # the shared SileroVad, loaded by the first session that detects turns

    def delay_from(self, raw: str | None) -> int | None:
        """A client's ``delay_ms`` (query or form field), validated; the server default if absent."""
        if raw is None or raw == "":
            return self.delay_ms
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"delay_ms must be an integer, got {raw!r}") from None
        self.engine.model.config.delay_tokens(value)
        return value


def state_of(app) -> ServerState:
    return app.state.voxlive


def authorized(conn, api_key: str | None) -> bool:
    """``Authorization: Bearer KEY`` (or ``Token KEY``, Deepgram's form), or ``?token=KEY`` (browsers
    cannot set WebSocket headers)."""
    if api_key is None:
        return True
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    given = value.strip() if scheme.lower() in ("bearer", "token") else conn.query_params.get("token", "")
    return hmac.compare_digest(given.encode(), api_key.encode())
