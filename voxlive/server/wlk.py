"""``WS /asr``: the WhisperLiveKit protocol, so its web page and clients work against voxlive.

The server first sends ``{"type": "config", "useAudioWorklet": true, "mode": ...}``. The client
sends binary frames: PCM s16le 16 kHz mono (what WhisperLiveKit's AudioWorklet sends), or a
browser MediaRecorder's WebM/Opus (or Ogg) stream, recognised by its first bytes and decoded
in-process with PyAV. An empty frame ends the audio. Each update is a state: ``lines`` (the words
so far grouped into lines at sentence ends and pauses), ``buffer_transcription`` (the word still
being spoken), ``remaining_time_transcription`` (the lag: seconds received and not yet
transcribed) and ``status``. After the last update comes ``{"type": "ready_to_stop"}``. voxlive
adds ``words`` (text, start, end in seconds) to each line, and ``blank_ruts`` ({start, end,
positions} per blank rut broken since the last update, see ``voxlive.rut``) to the update that
follows one; clients that do not know them ignore them. The query's ``rut*`` parameters set the
connection's rut policy (``ServerState.rut_from``).

``?mode=full`` (the default) sends the whole state every time. ``?mode=diff`` (as WhisperLiveKit
defines it) sends ``{"type": "snapshot", "seq": 1, ...state}`` first, then ``{"type": "diff",
"seq", "n_lines", "new_lines"?, "lines_pruned"?, ...the other fields}``: ``new_lines`` replace the
state's lines from index ``n_lines - len(new_lines)`` on. Only the last line is ever open (a line
closes when the next word starts a new one), so a diff holds that line and the ones after it,
whatever the session's age. voxlive never prunes lines, so ``lines_pruned`` never appears.

Lines are grouped as the words arrive and a closed line is serialised once: an update costs the
words it adds, not the session's length (in full mode, the message itself still grows).
"""

from __future__ import annotations

import asyncio
import json

from starlette.websockets import WebSocket

from ..transcript import Word
from .connection import CLOSE_POLICY, Connection, pcm16_to_float
from .engine import Session
from .stream_decoder import StreamDecoder, is_container

LINE_CHARS = 160  # a line is a sentence, or this long at most
LINE_SECONDS = 15.0
LINE_GAP = 1.5  # a pause this long starts a new line
MODES = ("full", "diff")


def clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def line(words: list[Word]) -> dict:
    return {"speaker": 1, "text": " ".join(w.text for w in words), "start": clock(words[0].start),
            "end": clock(words[-1].end), "words": [w.to_dict() for w in words]}


class Lines:
    """A session's words grouped into lines as they arrive, by the rule of ``transcript.cues``.

    ``keep_closed``: keep each closed line's JSON (full mode resends them); in diff mode a closed
    line is sent once and forgotten, so only the open line is held.
    """

    def __init__(self, *, keep_closed: bool):
        self.keep_closed = keep_closed
        self.closed: list[str] = []  # JSON of each closed line (full mode)
        self.n_closed = 0
        self.open: list[Word] = []
        self._chars = -1  # len(" ".join(the open line's words))

    def __len__(self) -> int:
        return self.n_closed + bool(self.open)

    def add(self, words: list[Word]) -> list[dict]:
        """Take new words; return the lines from the first one they changed to the last.

        That is the line open before (it grew or closed), the lines closed since, the open one.
        """
        if not words:
            return []
        changed = []
        for w in words:
            if self.open and self._breaks_before(w):
                changed.append(self._close())
            self.open.append(w)
            self._chars += len(w.text) + 1
        return changed + [line(self.open)]

    def _breaks_before(self, w: Word) -> bool:
        first, last = self.open[0], self.open[-1]
        return (w.start - last.end > LINE_GAP or self._chars + 1 + len(w.text) > LINE_CHARS
                or w.end - first.start > LINE_SECONDS or last.text[-1:] in ".?!")

    def _close(self) -> dict:
        done = line(self.open)
        if self.keep_closed:
            self.closed.append(json.dumps(done, ensure_ascii=False))
        self.n_closed += 1
        self.open, self._chars = [], -1
        return done

    def json(self) -> str:
        """Every line as a JSON array (full mode)."""
        lines = self.closed + ([json.dumps(line(self.open), ensure_ascii=False)] if self.open else [])
        return "[" + ", ".join(lines) + "]"


class Updates:
    """The messages of one ``/asr`` connection, in full or diff mode."""

    def __init__(self, mode: str):
        self.mode = mode
        self.lines = Lines(keep_closed=mode == "full")
        self.partial, self.lag = "", 0.0
        self.seq = 0

    def message(self, words: list[Word] = (), error: str | None = None, ruts=()) -> str:
        """The next message after ``words`` (the new ones) and the current partial and lag;
        ``ruts``: the blank ruts broken since the last message (``voxlive.rut.Rut``)."""
        changed = self.lines.add(list(words))
        self.seq += 1
        fields = {
            "status": "active_transcription" if len(self.lines) or self.partial else "no_audio_detected",
            "lines": [],
            "buffer_transcription": self.partial,
            "buffer_diarization": "",
            "buffer_translation": "",
            "remaining_time_transcription": self.lag,
            "remaining_time_diarization": 0.0,
        }
        if error:
            fields["error"] = error
        if ruts:
            fields["blank_ruts"] = [r.to_dict() for r in ruts]
        if self.mode == "diff" and self.seq > 1:
            del fields["lines"]
            head = {"type": "diff", "seq": self.seq, "n_lines": len(self.lines)}
            if changed:
                head["new_lines"] = changed
            return json.dumps(head | fields, ensure_ascii=False)
        if self.mode == "diff":
            fields = {"type": "snapshot", "seq": 1} | fields
        text = json.dumps(fields, ensure_ascii=False)
        at = text.index('"lines": [') + len('"lines": ')  # every field before it is this module's own text
        return text[:at] + self.lines.json() + text[at + 2:]


class WhisperLiveKitConnection(Connection):
    def __init__(self, ws: WebSocket):
        super().__init__(ws)
        self.updates: Updates | None = None
        self.decoder: StreamDecoder | None = None

    async def run(self) -> None:
        mode = self.ws.query_params.get("mode", "full")
        self.updates = Updates(mode if mode in MODES else "full")
        if mode not in MODES:
            await self.close_with_error(f"mode must be one of {', '.join(MODES)}, got {mode!r}", "invalid_parameter",
                                        CLOSE_POLICY)
        session = await self.open()
        await self.send({"type": "config", "useAudioWorklet": True, "mode": mode})
        sender = asyncio.create_task(self.deliver(session))
        self.senders.add(sender)
        decoded: asyncio.Future | None = None
        while True:
            message = await self.receive()
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
                await asyncio.to_thread(self.decoder.feed, data)  # waits while the decoder is behind
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
            self.updates.partial, self.updates.lag = update.partial, update.lag
            await self.send_text(self.updates.message(update.words, ruts=update.ruts))
            if update.transcript is not None:
                return

    async def shutdown(self) -> None:
        if self.decoder is not None:
            self.decoder.abort()  # its thread ends instead of waiting for bytes that will not come
        await super().shutdown()

    async def error(self, message: str, code: str) -> None:
        updates = self.updates or Updates("full")
        await self.send_text(updates.message(error=message))


async def asr_endpoint(ws: WebSocket) -> None:
    await WhisperLiveKitConnection(ws).serve()
