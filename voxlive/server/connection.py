"""What every WebSocket protocol shares: authentication, admission, JSON sends, timeouts, cleanup.

Liveness is the application's business, not the WebSocket layer's: while the server stops
reading a client for backpressure, that client's keepalive pong waits behind its own queued
audio, so a pong deadline would drop exactly the clients that backpressure is slowing down. The
server therefore answers pings but never drops a connection for a late pong (``serve`` runs
uvicorn without a ping timeout); instead a connection is closed when it sends nothing for
``idle_timeout`` seconds while the server waits to read (1001), or when one message to it cannot
be written for ``send_timeout`` seconds because it stopped reading (1008).
"""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.utils import ClientDisconnected

from ..audio import decode_pcm16
from .engine import EngineBusy, Session, SessionOver
from .settings import authorized, state_of

log = logging.getLogger("voxlive.server")

CLOSE_GOING_AWAY = 1001  # idle for too long
CLOSE_POLICY = 1008  # bad key, bad parameters, not reading what the server sends
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
        self.stuck = False  # a send timed out: the socket's buffer is full

    async def serve(self) -> None:
        self.main = asyncio.current_task()
        replica = self.state.replica
        await self.ws.accept(headers=None if replica is None else [(b"x-voxlive-replica", replica.encode())])
        try:
            if not authorized(self.ws, self.state.api_key):
                await self.close_with_error("invalid or missing API key", "unauthorized", CLOSE_POLICY)
            try:
                self.delay_ms = self.state.delay_from(self.ws.query_params.get("delay_ms"))
            except ValueError as err:
                await self.close_with_error(str(err), "invalid_parameter", CLOSE_POLICY)
            await self.run()
        except (Closed, WebSocketDisconnect, SessionOver, ClientDisconnected):
            pass
        except asyncio.CancelledError:
            if not self.stuck:
                raise
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
        except (WebSocketDisconnect, RuntimeError, Closed, ClientDisconnected):
            pass  # the client went away while we were sending

    async def receive(self) -> dict:
        """The next ASGI message. A connection that sends nothing for ``idle_timeout`` seconds while
        none of its sessions is being finished for it is closed."""
        receiving = asyncio.ensure_future(self.ws.receive())
        try:
            while True:
                done, _ = await asyncio.wait({receiving}, timeout=self.state.idle_timeout)
                if done:
                    return receiving.result()
                if not any(s.ending and not s.finished for s in self.sessions):
                    await self.close_with_error(f"nothing received for {self.state.idle_timeout:g} s",
                                                "idle_timeout", CLOSE_GOING_AWAY)
        finally:
            receiving.cancel()

    async def send(self, message: dict) -> None:
        text = json.dumps(message, ensure_ascii=False)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from the client's own JSON, echoed in an error
            text = json.dumps(message)  # escaped as \udXXX: valid JSON, valid UTF-8
        await self.send_text(text)

    async def send_text(self, text: str) -> None:
        """Send one message; a client that has not read for ``send_timeout`` seconds loses its slot."""
        try:
            await asyncio.wait_for(self.ws.send_text(text), self.state.send_timeout)
        except asyncio.TimeoutError:
            for session in self.sessions:
                session.close()  # the slot is free now, whatever the socket does
            self.stuck = True
            log.info("closing a connection that has not read for %g s", self.state.send_timeout)
            if asyncio.current_task() is not self.main:
                self.main.cancel()  # the receive loop ends too
            raise Closed("client not reading") from None

    async def close_with_error(self, message: str, code: str, close_code: int):
        await self.error(message, code)
        await self.ws.close(close_code, message[:120])
        raise Closed(message)

    def forget(self, session: Session) -> None:
        """A finished session is no longer this connection's to close (its state can be freed)."""
        if session in self.sessions:
            self.sessions.remove(session)

    async def shutdown(self) -> None:
        """The connection is over: sessions nobody will read are dropped, senders stopped."""
        for session in self.sessions:
            if not session.finished:
                session.close()
        for task in self.senders:
            task.cancel()
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            try:
                if self.stuck:  # the close frame queues behind what the client has not read
                    await asyncio.wait_for(self.ws.close(CLOSE_POLICY, "not reading"), 1.0)
                else:
                    await self.ws.close()
            except (RuntimeError, WebSocketDisconnect, ClientDisconnected, asyncio.TimeoutError):
                pass  # already closed by the peer
        log.debug("connection closed")
