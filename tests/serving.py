"""Run the real app under uvicorn on a free loopback port, in a background thread (test helper)."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager

import uvicorn
import websockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, **config):
    """Yield "127.0.0.1:PORT" while uvicorn serves ``app``; shut it down afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def refused(url: str, **connect) -> tuple[dict, int]:
    """The one message a server sends before closing a connection it refuses, and the close code."""
    async with websockets.connect(url, **connect) as ws:
        first = json.loads(await ws.recv())
        try:
            await ws.recv()
        except websockets.ConnectionClosed as closed:
            return first, closed.rcvd.code
        raise AssertionError(f"a second message after {first}: the connection was not closed")
