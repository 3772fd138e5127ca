"""The server's configuration as the request handlers see it, and the API-key check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, replace

from ..rut import DEFAULT_POLICY, RutPolicy
from .engine import Engine

OFF = ("off", "false", "0", "no")
# A connection's query parameters for its blank-rut policy (voxlive.rut): name -> (field, type).
RUT_PARAMS = {"rut_after": ("after", int), "rut_speech_after": ("speech_after", int),
              "rut_slope": ("slope", float), "rut_cap": ("cap", float)}


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
    rut: RutPolicy | None = DEFAULT_POLICY  # the sessions' blank-rut policy (None: off) unless they ask
    vad: object = None  # the shared SileroVad, loaded by the first session that needs one

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

    def rut_from(self, params) -> RutPolicy | None:
        """A connection's blank-rut policy from its query: ``rut=off`` (or ``on``), ``rut_after``,
        ``rut_speech_after`` (a count, or ``off``: no VAD threshold), ``rut_slope``, ``rut_cap``;
        what it does not set is the server's."""
        switch = params.get("rut", "").lower()
        if switch in OFF:
            return None
        if switch not in ("", "on", "true", "1", "yes"):
            raise ValueError(f"rut must be on or off, got {params.get('rut')!r}")
        given = {name: params[name] for name in RUT_PARAMS if params.get(name, "") != ""}
        if not given and not switch:
            return self.rut
        changes = {}
        for name, raw in given.items():
            key, kind = RUT_PARAMS[name]
            if key == "speech_after" and raw.lower() in OFF:
                changes[key] = None
                continue
            try:
                changes[key] = kind(raw)
            except ValueError:
                raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
        return replace(self.rut or DEFAULT_POLICY, **changes).check()

    def shared_vad(self):
        """The server's one Silero VAD (its weights loaded on first use)."""
        if self.vad is None:
            from ..vad import SileroVad

            self.vad = SileroVad()
        return self.vad

    def rut_vad(self, rut: RutPolicy | None):
        """A VadStream for a session whose policy has a speech threshold (None otherwise)."""
        return self.shared_vad().stream() if rut is not None and rut.speech_after is not None else None


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
