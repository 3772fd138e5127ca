"""``WS /asr``: the WhisperLiveKit protocol, so its web page and clients work against voxlive.

The server first sends ``{"type": "config", "useAudioWorklet": true}``. The client sends binary
frames: PCM s16le 16 kHz mono (what WhisperLiveKit's AudioWorklet sends), or a browser
MediaRecorder's WebM/Opus (or Ogg) stream, recognised by its first bytes and decoded in-process
with PyAV. An empty frame ends the audio. Each update is a full snapshot: ``lines`` (the words so
far grouped into lines at sentence ends and pauses), ``buffer_transcription`` (the word still being
spoken), ``remaining_time_transcription`` (the lag: seconds received and not yet transcribed) and
``status``. After the last update comes ``{"type": "ready_to_stop"}``. voxlive adds ``words``
(text, start, end in seconds) to each line; clients that do not know it ignore it.
"""

from __future__ import annotations

import asyncio

from starlette.websockets import WebSocket

from ..transcript import Word, cues
from .connection import Connection, pcm16_to_float
from .engine import Session
from .stream_decoder import StreamDecoder, is_container

LINE_CHARS = 160  # a line is a sentence, or this long at most
LINE_SECONDS = 15.0
LINE_GAP = 1.5  # a pause this long starts a new line


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def snapshot(words: list[Word], partial: str, lag: float, error: str | None = None) -> dict:
    lines = [{
        "speaker": 1,
        "text": " ".join(w.text for w in group),
        "start": clock(group[0].start),
        "end": clock(group[-1].end),
        "words": [w.to_dict() for w in group],
    } for group in cues(words, max_chars=LINE_CHARS, max_seconds=LINE_SECONDS, max_gap=LINE_GAP)]
    out = {
        "status": "active_transcription" if lines or partial else "no_audio_detected",
        "lines": lines,
        "buffer_transcription": partial,
        "buffer_diarization": "",
        "buffer_translation": "",
        "remaining_time_transcription": lag,
        "remaining_time_diarization": 0.0,
    }
    if error:
        out["error"] = error
    return out


class WhisperLiveKitConnection(Connection):
    def __init__(self, ws: WebSocket):
        super().__init__(ws)
        self.words: list[Word] = []  # every word so far
        self.partial, self.lag = "", 0.0
        self.decoder: StreamDecoder | None = None

    async def run(self) -> None:
        session = await self.open()
        await self.send({"type": "config", "useAudioWorklet": True, "mode": "full"})
        sender = asyncio.create_task(self.deliver(session))
        self.senders.add(sender)
        decoded: asyncio.Future | None = None
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                await self.error("send audio as binary frames (an empty frame ends the stream)", "invalid_frame")
                continue
            if not data:
                break
            if self.decoder is None and not session.received and is_container(data):
                decoded = asyncio.get_running_loop().create_future()
                self.decoder = self.start_decoder(session, decoded)
            if self.decoder is not None:
                self.decoder.feed(data)
                if decoded.done():
                    break  # the stream cannot be decoded further: finish with what was
                continue
            try:
                pcm = pcm16_to_float(data)
            except ValueError as err:
                await self.error(f"not PCM s16le audio: {err}; frame ignored", "invalid_audio")
                continue
            await session.append(pcm)
        if self.decoder is not None:
            self.decoder.close()
            error = await decoded
            if error:
                await self.error(error, "invalid_audio")
        session.end()
        await sender
        await self.send({"type": "ready_to_stop"})
        await self.ws.close()

    def start_decoder(self, session: Session, decoded: asyncio.Future) -> StreamDecoder:
        loop = asyncio.get_running_loop()

        def on_pcm(pcm):  # on the decoder thread; blocks while the session's inbox is full
            asyncio.run_coroutine_threadsafe(session.append(pcm), loop).result()

        def on_done(error):
            loop.call_soon_threadsafe(lambda: decoded.done() or decoded.set_result(error))

        return StreamDecoder(on_pcm, on_done)

    async def deliver(self, session: Session) -> None:
        while True:
            update = await session.next_update()
            if update.error:
                await self.error(update.error, "processing_error")
                return
            self.words += update.words
            self.partial, self.lag = update.partial, update.lag
            await self.send(snapshot(self.words, self.partial, self.lag))
            if update.transcript is not None:
                return

    async def shutdown(self) -> None:
        if self.decoder is not None:
            self.decoder.close()  # its thread ends instead of waiting for bytes that will not come
        await super().shutdown()

    async def error(self, message: str, code: str) -> None:
        await self.send(snapshot(self.words, self.partial, self.lag, error=message))


async def asr_endpoint(ws: WebSocket) -> None:
    await WhisperLiveKitConnection(ws).serve()
