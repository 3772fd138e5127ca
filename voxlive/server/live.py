"""What the turn-aware dialects (Mistral, OpenAI Realtime, Deepgram) share: raw audio in any
supported encoding -> 16 kHz -> VAD and the engine; tokens, cuts and VAD frames -> ``Turns``
events -> the dialect's messages.

The engine session opens with the first audio (or flush), so a dialect's session update may still
set the delay before that. Events reach the dialect in order: both the receive loop (VAD events)
and the sender (token events) pass through one lock, so a turn's start never overtakes the end of
the turn before it on the wire.
"""

from __future__ import annotations

import asyncio
import codecs

from ..pcm import PcmDecoder
from ..turns import Delta, Segment, Turns, TurnSettings
from ..vad import VadUnavailable
from starlette.websockets import WebSocketDisconnect

from .connection import Closed, Connection, log
from .engine import Cut, Session

CLOSE_INTERNAL = 1011


class LiveConnection(Connection):
    """A session with turn detection (``settings`` None: the client decides where turns end)."""

    def __init__(self, ws):
        super().__init__(ws)
        self.decoder = PcmDecoder()
        self.settings: TurnSettings | None = None
        self.turns: Turns | None = None
        self.vad_stream = None
        self.samples = 0  # 16 kHz samples handed to the engine
        self.completion_tokens = 0
        self.positions = 0  # decoder positions run (prompt included), told with the final transcript
        self.text = ""  # every delta sent so far
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._events = asyncio.Lock()

    @property
    def started(self) -> bool:
        return self.session is not None

    async def start(self) -> Session:
        if self.session is None:
            tok = self.model.tokenizer
            self.turns = Turns(self.settings or TurnSettings(), is_text=tok.is_text,
                               samples_per_token=self.model.config.audio.samples_per_token)
            if self.settings is not None:
                try:
                    self.vad_stream = self.state.shared_vad().stream()
                except VadUnavailable as err:
                    await self.close_with_error(str(err), "processing_error", CLOSE_INTERNAL)
            self.session = await self.open()
            self.spawn(self.deliver(self.session))
        return self.session

    async def feed(self, raw: bytes) -> None:
        """A message of raw audio in the session's format (ValueError if it is not)."""
        pcm = self.decoder.decode(raw)
        await self.feed_pcm(pcm)

    async def feed_pcm(self, pcm) -> None:
        session = await self.start()
        if self.vad_stream is not None and len(pcm):
            probs = self.vad_stream.push(pcm)
            async with self._events:
                await self.emit_all(self.turns.push_probabilities(probs))
        self.samples += len(pcm)
        await session.append(pcm)

    async def cut(self) -> None:
        """Force a final for the audio received so far; the session goes on."""
        session = await self.start()
        self.turns.request_cut(session.cut())

    async def end_audio(self) -> None:
        session = await self.start()
        tail = self.decoder.decode(b"", last=True)
        if len(tail):
            await self.feed_pcm(tail)
        self.turns.end_of_audio(self.samples)
        session.end()

    async def deliver(self, session: Session) -> None:
        try:
            await self._deliver(session)
        except (WebSocketDisconnect, Closed):
            raise
        except Exception as err:  # noqa: BLE001 - a broken session must tell its client, not hang it
            log.exception("session failed")
            await self.error(f"internal error: {err}", "processing_error")
            await self.ws.close(CLOSE_INTERNAL, "internal error")

    async def _deliver(self, session: Session) -> None:
        while True:
            update = await session.next_update()
            if update.error:
                await self.error(update.error, "processing_error")
                return
            self.completion_tokens += len(update.tokens)
            async with self._events:
                for item in update.in_order(self.turns.main_seen):
                    if isinstance(item, Cut):
                        await self.emit_all(self.turns.push_cut(item.samples, item.tokens, item.probabilities,
                                                                item.forked_at))
                    else:
                        await self.emit_all(self.turns.push_tokens(*item))
                if update.transcript is not None:
                    self.positions = update.positions
                    await self.emit_all(self.turns.finish())
                    await self.done(update.transcript)
                    return

    async def emit_all(self, events: list) -> None:
        for event in events:
            if isinstance(event, Delta):
                await self.on_tokens(event)
                text = self.delta_text(event.tokens)
                if not text:
                    continue
                self.text += text
                await self.on_delta(text)
            else:
                if isinstance(event, Segment):  # a segment's text ends with its last delta
                    tail = self._utf8.decode(b"", final=True)
                    if tail:
                        self.text += tail
                        await self.on_delta(tail)
                await self.on_event(event)

    def delta_text(self, tokens: list[int]) -> str:
        tok = self.model.tokenizer
        return self._utf8.decode(b"".join(tok.token_bytes(t) for t in tokens))

    def segment_text(self, tokens: list[int]) -> str:
        return self.model.tokenizer.decode(tokens)

    def usage(self) -> dict:
        prompt = max(0, self.positions - self.completion_tokens)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}

    # -- the dialect --------------------------------------------------------------------------------

    async def on_tokens(self, delta: Delta) -> None:
        """Every delta's tokens, text or not, before its text goes to ``on_delta`` (a dialect that
        needs the tokens themselves overrides it)."""

    async def on_delta(self, text: str) -> None:
        raise NotImplementedError

    async def on_event(self, event) -> None:
        raise NotImplementedError

    async def done(self, transcript) -> None:
        raise NotImplementedError
