"""``WS /v1/realtime``: vLLM's realtime transcription protocol, so its clients work unchanged.

Client events: ``session.update`` {model}, ``input_audio_buffer.append`` {audio: base64 PCM16
16 kHz mono}, ``input_audio_buffer.commit`` {final}. Server events: ``session.created``,
``transcription.delta`` {delta}, ``transcription.done`` {text, usage}, ``error`` {error, code}.

As in vLLM, ``commit`` without ``final`` starts (or continues) an utterance and ``commit`` with
``final: true`` ends it; after ``transcription.done`` the connection can start another. Audio
appended before the first commit is kept, not dropped. voxlive adds fields that clients ignore:
``lag`` (seconds of audio received and not yet transcribed) on deltas, and ``words`` (text,
start, end) on a delta as soon as they are complete (a delta may then carry words and no text),
and ``blank_ruts`` ({start, end, positions}, see ``voxlive.rut``) on the delta after a blank rut
was broken.
``?done_words=true`` also puts every word of the utterance on ``transcription.done``; it is off by
default because that message would grow with the utterance's length (1.7 MB after 4 h).
Text deltas are the generated tokens' bytes decoded incrementally, so their concatenation is
exactly the final text (whitespace goes with the word after it). A finished utterance is
forgotten: its caches are freed, however many utterances the connection goes on to run.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid

from starlette.websockets import WebSocket

from ..transcript import TextDeltas
from .connection import Connection, pcm16_to_float
from .engine import Session, SessionOver
from .openai_realtime import OpenAIRealtimeConnection, take_over, wants_openai


class RealtimeConnection(Connection):
    async def run(self) -> None:
        self.done_words = self.ws.query_params.get("done_words", "").lower() in ("1", "true", "yes")
        # event_id: OpenAI Realtime clients, which may turn out to be on this connection, expect one
        await self.send({"type": "session.created", "id": f"sess-{uuid.uuid4().hex}",
                         "created": int(time.time()), "event_id": f"event_{uuid.uuid4().hex[:20]}"})
        while True:
            message = await self.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                await self.error("expected JSON text messages, got a binary frame", "invalid_event")
                continue
            try:
                event = json.loads(message["text"])
            except (ValueError, RecursionError):  # bad JSON, a 4,300-digit integer, deep nesting
                await self.error("Invalid JSON", "invalid_json")
                continue
            if not isinstance(event, dict):
                await self.error("an event must be a JSON object", "invalid_event")
                continue
            if not self.sessions and wants_openai(event):
                await take_over(self, event)  # an OpenAI Realtime transcription session after all
                return
            await self.handle(event)

    async def handle(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "session.update":
            model = event.get("model")
            if model is not None and not isinstance(model, str):
                await self.error("session.update: model must be a string", "invalid_event")
        elif kind == "input_audio_buffer.append":
            audio = event.get("audio")
            try:
                pcm = pcm16_to_float(base64.b64decode(audio, validate=True) if isinstance(audio, str) else None)
            except (ValueError, binascii.Error) as err:
                await self.error(f"Invalid audio data: {err}", "invalid_audio")
                return
            session = await self.current()
            try:
                await session.append(pcm)
            except SessionOver as err:
                self.session = None
                await self.error(str(err), "processing_error")
        elif kind == "input_audio_buffer.commit":
            session = await self.current()
            if event.get("final"):
                session.end()
                self.session = None  # its sender delivers transcription.done; a later append starts anew
        else:
            await self.error(f"Unknown event type: {kind}", "unknown_event")

    async def current(self) -> Session:
        """The utterance in progress, opening one (and its sender) if there is none."""
        if self.session is None:
            self.session = await self.open()
            self.spawn(self.deliver(self.session))
        return self.session

    async def deliver(self, session: Session) -> None:
        deltas = TextDeltas()
        tokenizer = self.model.tokenizer
        completion_tokens = 0
        while True:
            update = await session.next_update()
            if update.error:
                self.forget(session)
                await self.error(update.error, "processing_error")
                return
            completion_tokens += len(update.tokens)
            delta = deltas.push(b"".join(tokenizer.token_bytes(t) for t in update.tokens),
                                final=update.transcript is not None)
            if delta or update.words or update.ruts:
                event = {"type": "transcription.delta", "delta": delta, "lag": update.lag}
                if update.words:
                    event["words"] = [w.to_dict() for w in update.words]
                if update.ruts:
                    event["blank_ruts"] = [r.to_dict() for r in update.ruts]
                await self.send(event)
            if update.transcript is not None:
                self.forget(session)
                t = update.transcript
                prompt_tokens = update.positions - completion_tokens
                done = {
                    "type": "transcription.done", "text": t.text,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                    "duration": round(t.duration, 3),
                }
                if self.done_words:
                    done["words"] = t.to_dict()["words"]
                await self.send(done)
                return

    async def error(self, message: str, code: str) -> None:
        await self.send({"type": "error", "error": message, "code": code})


async def realtime_endpoint(ws: WebSocket) -> None:
    if ws.query_params.get("intent") == "transcription":
        await OpenAIRealtimeConnection(ws).serve()
    else:
        await RealtimeConnection(ws).serve()

