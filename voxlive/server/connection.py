"""What every WebSocket protocol shares: authentication, admission, JSON sends, cleanup."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from ..audio import decode_pcm16
from .engine import EngineBusy, Session, SessionOver
from .settings import authorized, state_of

log = logging.getLogger("voxlive.server")

CLOSE_POLICY = 1008  # bad key, bad parameters
CLOSE_TRY_AGAIN = 1013  # server busy


def pcm16_to_float(data: bytes | None) -> np.ndarray:
    """A PCM s16le message -> float32; a clear ValueError for an empty or odd-sized one."""
    if not data:
        raise ValueError("empty audio")
    return decode_pcm16(data)


class Closed(Exception):
    """The server closed the connection (after telling the client why)."""


class Connection:
    """One client connection. Subclasses implement ``run`` (the protocol) and ``error``."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.state = state_of(ws.app)
        self.engine = self.state.engine
        self.model = self.engine.model
        self.session: Session | None = None
        self.sessions: list[Session] = []
        self.senders: set[asyncio.Task] = set()

    async def serve(self) -> None:
        await self.ws.accept()
        try:
            if not authorized(self.ws, self.state.api_key):
                await self.close_with_error("invalid or missing API key", "unauthorized", CLOSE_POLICY)
            try:
                self.delay_ms = self.state.delay_from(self.ws.query_params.get("delay_ms"))
            except ValueError as err:
                await self.close_with_error(str(err), "invalid_parameter", CLOSE_POLICY)
            await self.run()
        except (Closed, WebSocketDisconnect, SessionOver):
            pass
        finally:
            await self.shutdown()

    async def run(self) -> None:
        raise NotImplementedError

    async def error(self, message: str, code: str) -> None:
        raise NotImplementedError

    async def open(self) -> Session:
        try:
            session = self.engine.open(delay_ms=self.delay_ms)
        except EngineBusy as err:
            await self.close_with_error(str(err), "server_busy", CLOSE_TRY_AGAIN)
        self.sessions.append(session)
        return session

    def spawn(self, coroutine) -> None:
        """Run a sender beside the receive loop; it ends with the connection."""
        task = asyncio.create_task(self._guard(coroutine))
        self.senders.add(task)
        task.add_done_callback(self.senders.discard)

    @staticmethod
    async def _guard(coroutine) -> None:
        try:
            await coroutine
        except (WebSocketDisconnect, RuntimeError, Closed):
            pass  # the client went away while we were sending

    async def send(self, message: dict) -> None:
        await self.ws.send_text(json.dumps(message, ensure_ascii=False))

    async def close_with_error(self, message: str, code: str, close_code: int):
        await self.error(message, code)
        await self.ws.close(close_code, message[:120])
        raise Closed(message)

    async def shutdown(self) -> None:
        """The connection is over: sessions nobody will read are dropped, senders stopped."""
        for session in self.sessions:
            if not session.finished:
                session.close()
        for task in self.senders:
            task.cancel()
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            try:
                await self.ws.close()
            except RuntimeError:
                pass  # already closed by the peer
        log.debug("connection closed")
