"""OpenAI Realtime transcription sessions on ``WS /v1/realtime``, as the ``openai`` SDK speaks them
(``client.realtime.connect``; shapes in ``openai/types/realtime``), beside vLLM's protocol.

Which protocol a connection speaks: ``?intent=transcription`` means OpenAI from the first message;
otherwise the first ``session.update`` carrying a ``session`` object (GA, ``session.type =
"transcription"``) or a ``transcription_session.update`` (beta) turns a connection that began as
vLLM's into this one (vLLM's ``session.update`` has ``model`` at the top level and no ``session``).

Audio: ``audio/pcm`` (PCM16 at 24 kHz, the default), ``audio/pcmu`` and ``audio/pcma`` (G.711 at
8 kHz); beta ``pcm16``, ``g711_ulaw``, ``g711_alaw``. Turn detection: ``server_vad`` (the default:
threshold, prefix_padding_ms, silence_duration_ms) runs voxlive's VAD; ``semantic_vad`` is served
as ``server_vad`` with a silence from its eagerness, and ``session.updated`` says so; ``null`` means
the client commits. Each item (a turn, or the audio up to a commit) gets ``speech_started`` /
``speech_stopped`` (with VAD), ``committed``, transcription ``delta``s and one ``completed``.
``input_audio_buffer.clear`` drops the uncommitted item's transcript (the audio stays in the
model's context, which is streaming: it cannot be taken back). Every server event has an
``event_id``; errors are ``{type: "error", error: {type, code, message, param, event_id}}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections import deque

from starlette.websockets import WebSocket

from ..pcm import PcmDecoder
from ..turns import Segment, TurnEnded, TurnSettings, TurnStarted
from .engine import SessionOver
from .live import LiveConnection

MAX_APPEND_BYTES = 15 * 1024 * 1024  # decoded audio in one append (OpenAI's own event limit)
GA_FORMATS = {"audio/pcm": ("pcm_s16le", 24000), "audio/pcmu": ("pcm_mulaw", 8000),
              "audio/pcma": ("pcm_alaw", 8000)}
BETA_FORMATS = {"pcm16": ("pcm_s16le", 24000), "g711_ulaw": ("pcm_mulaw", 8000), "g711_alaw": ("pcm_alaw", 8000)}
SEMANTIC_SILENCE_MS = {"low": 1000, "medium": 500, "auto": 500, "high": 250}
DEFAULT_VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


class OpenAIRealtimeConnection(LiveConnection):
    def __init__(self, ws: WebSocket, *, beta: bool = False):
        super().__init__(ws)
        self.beta = beta
        self.session_id = new_id("sess")
        self.format_type = "pcm16" if beta else "audio/pcm"
        self.decoder = PcmDecoder("pcm_s16le", 24000)
        self.vad_config: dict | None = dict(DEFAULT_VAD)
        self.settings = self.settings_from(self.vad_config)
        self.transcription = {"model": self.state.model_id, "language": None, "prompt": None}
        self.notes: list[str] = []
        self.item = new_id("item")
        self.previous_item: str | None = None
        self.item_audio = 0  # samples appended to the current item
        self.client_event: str | None = None  # the event_id of the event being handled
        self._clears: deque[bool] = deque()  # per cut under way, in order: a clear (drop its transcript)

    # -- session ------------------------------------------------------------------------------------

    def session_object(self) -> dict:
        if self.beta:
            return {"id": self.session_id, "object": "realtime.transcription_session",
                    "input_audio_format": self.format_type, "input_audio_transcription": self.transcription,
                    "turn_detection": self.vad_config, "input_audio_noise_reduction": None,
                    "include": None, "voxlive_notes": self.notes}
        fmt = {"type": self.format_type, **({"rate": 24000} if self.format_type == "audio/pcm" else {})}
        return {"type": "transcription", "id": self.session_id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": fmt, "transcription": self.transcription,
                                    "turn_detection": self.vad_config, "noise_reduction": None}},
                "include": None, "voxlive_notes": self.notes}

    @staticmethod
    def settings_from(vad: dict | None) -> TurnSettings | None:
        if vad is None:
            return None
        threshold = vad["threshold"]
        return TurnSettings(start_threshold=threshold, eager_end_threshold=threshold,
                            end_threshold=max(0.0, threshold - 0.15), min_silence_ms=vad["silence_duration_ms"])

    async def run(self, first: dict | None = None) -> None:
        if first is None:
            await self.send_event({"type": "session.created", "session": self.session_object()})
        else:
            await self.handle(first)
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            self.client_event = None
            if message.get("text") is None:
                await self.fail("expected JSON text messages, got a binary frame", code="invalid_event")
                continue
            try:
                event = json.loads(message["text"])
            except json.JSONDecodeError:
                await self.fail("invalid JSON", code="invalid_json")
                continue
            if not isinstance(event, dict):
                await self.fail("an event must be a JSON object", code="invalid_event")
                continue
            await self.handle(event)

    async def handle(self, event: dict) -> None:
        kind = event.get("type")
        self.client_event = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        try:
            if kind in ("session.update", "transcription_session.update"):
                await self.update(event.get("session"), beta=kind == "transcription_session.update")
            elif kind == "input_audio_buffer.append":
                await self.append(event.get("audio"))
            elif kind == "input_audio_buffer.commit":
                await self.commit()
            elif kind == "input_audio_buffer.clear":
                await self.commit(discard=True)
                await self.send_event({"type": "input_audio_buffer.cleared"})
            else:
                raise RequestError(f"Unknown or unsupported event type: {kind!r}", "type", "unknown_event")
        except RequestError as err:
            await self.fail(str(err), param=err.param, code=err.code)

    async def update(self, session, *, beta: bool) -> None:
        if not isinstance(session, dict):
            raise RequestError("session must be an object", "session")
        if self.started and ("audio" in session or "input_audio_format" in session or "turn_detection" in session):
            raise RequestError("the audio format and turn detection cannot change after audio has started",
                               "session", "session_locked")
        self.beta = beta
        if beta:
            fmt = session.get("input_audio_format", self.format_type)
            transcription = session.get("input_audio_transcription")
            vad = session.get("turn_detection", self.vad_config) if "turn_detection" in session else self.vad_config
            if fmt not in BETA_FORMATS:
                raise RequestError(f"input_audio_format must be one of {', '.join(BETA_FORMATS)}", "session.input_audio_format")
            encoding, rate = BETA_FORMATS[fmt]
        else:
            if session.get("type") != "transcription":
                raise RequestError("voxlive serves transcription sessions: session.type must be 'transcription'",
                                   "session.type")
            audio = session.get("audio") or {}
            inp = audio.get("input") or {} if isinstance(audio, dict) else {}
            if not isinstance(inp, dict):
                raise RequestError("session.audio.input must be an object", "session.audio.input")
            fmt_obj = inp.get("format") or {"type": self.format_type}
            fmt = fmt_obj.get("type") if isinstance(fmt_obj, dict) else None
            if fmt not in GA_FORMATS:
                raise RequestError(f"audio format type must be one of {', '.join(GA_FORMATS)}", "session.audio.input.format")
            if fmt == "audio/pcm" and fmt_obj.get("rate", 24000) != 24000:
                raise RequestError("audio/pcm is 24000 Hz only", "session.audio.input.format.rate")
            encoding, rate = GA_FORMATS[fmt]
            transcription = inp.get("transcription")
            vad = inp["turn_detection"] if "turn_detection" in inp else self.vad_config
        vad_config = self.vad_from(vad)
        if transcription is not None:
            if not isinstance(transcription, dict):
                raise RequestError("transcription must be an object", "session.audio.input.transcription")
            self.transcription = {"model": transcription.get("model") or self.state.model_id,
                                  "language": None, "prompt": None}
            for name in ("language", "prompt", "keywords", "languages"):
                if transcription.get(name):
                    self.note(f"transcription.{name} accepted, not applied: the open Voxtral weights have no such input")
        if session.get("include"):
            self.note("include accepted, not applied: voxlive sends no logprobs")
        noise = inp.get("noise_reduction") if not beta else session.get("input_audio_noise_reduction")
        if noise:
            self.note("noise_reduction accepted, not applied")
        self.format_type, self.decoder = fmt, PcmDecoder(encoding, rate)
        self.vad_config, self.settings = vad_config, self.settings_from(vad_config)
        kind = "transcription_session.updated" if beta else "session.updated"
        await self.send_event({"type": kind, "session": self.session_object()})

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def vad_from(self, vad) -> dict | None:
        if vad is None:
            return None
        if not isinstance(vad, dict):
            raise RequestError("turn_detection must be an object or null", "turn_detection")
        kind = vad.get("type", "server_vad")
        if kind == "semantic_vad":
            eagerness = vad.get("eagerness") or "auto"
            if eagerness not in SEMANTIC_SILENCE_MS:
                raise RequestError("eagerness must be low, medium, high or auto", "turn_detection.eagerness")
            self.note(f"semantic_vad is served as server_vad with a {SEMANTIC_SILENCE_MS[eagerness]} ms silence "
                      f"(its eagerness {eagerness!r})")
            return {**DEFAULT_VAD, "silence_duration_ms": SEMANTIC_SILENCE_MS[eagerness]}
        if kind != "server_vad":
            raise RequestError("turn_detection.type must be server_vad, semantic_vad or null", "turn_detection.type")
        config = dict(DEFAULT_VAD)
        for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            value = vad.get(name)
            if value is None:
                continue
            integer = name != "threshold"
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value < 0 \
                    or (not integer and value > 1):
                raise RequestError(f"turn_detection.{name} must be {'a non-negative integer' if integer else 'from 0 to 1'}",
                                   f"turn_detection.{name}")
            config[name] = value
        for name in ("create_response", "interrupt_response", "idle_timeout_ms"):
            if vad.get(name) is not None:
                self.note(f"turn_detection.{name} accepted, not applied: a transcription session makes no responses")
        return config

    # -- audio ------------------------------------------------------------------------------------

    async def append(self, audio) -> None:
        if not isinstance(audio, str):
            raise RequestError("audio must be a base64 string", "audio")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"audio is not valid base64: {err}", "audio", "invalid_audio") from None
        if len(data) > MAX_APPEND_BYTES:
            raise RequestError(f"audio of {len(data)} bytes is over the {MAX_APPEND_BYTES} byte limit of one append",
                               "audio", "message_too_large")
        try:
            before = self.samples
            await self.feed(data)
            self.item_audio += self.samples - before
        except ValueError as err:
            raise RequestError(f"{err}; the append was ignored", "audio", "invalid_audio") from None
        except SessionOver as err:
            raise RequestError(str(err), "audio", "session_over") from None

    async def commit(self, discard: bool = False) -> None:
        if not discard and self.item_audio < 1600:  # OpenAI's rule: at least 100 ms of new audio
            raise RequestError(f"buffer too small: {self.item_audio / 16:.0f} ms of audio since the last commit, "
                               "at least 100 ms needed", None, "input_audio_buffer_commit_empty")
        self.item_audio = 0
        self._clears.append(discard)
        await self.cut()

    # -- out --------------------------------------------------------------------------------------

    async def on_delta(self, text: str) -> None:
        await self.send_event({"type": "conversation.item.input_audio_transcription.delta",
                               "item_id": self.item, "content_index": 0, "delta": text})

    async def on_event(self, event) -> None:
        if isinstance(event, TurnStarted):
            pad = (self.vad_config or DEFAULT_VAD)["prefix_padding_ms"]
            await self.send_event({"type": "input_audio_buffer.speech_started", "item_id": self.item,
                                   "audio_start_ms": max(0, round(event.time * 1000) - pad)})
        elif isinstance(event, Segment):
            if event.forced and self._clears.popleft():
                self.item = new_id("item")  # the cleared item's transcript is dropped
                return
            if not event.forced:
                self.item_audio = 0  # the VAD committed this audio
                await self.send_event({"type": "input_audio_buffer.speech_stopped", "item_id": self.item,
                                       "audio_end_ms": round(event.end * 1000)})
            await self.send_event({"type": "input_audio_buffer.committed", "item_id": self.item,
                                   "previous_item_id": self.previous_item})
            await self.send_event({"type": "conversation.item.input_audio_transcription.completed",
                                   "item_id": self.item, "content_index": 0,
                                   "transcript": self.segment_text(event.tokens),
                                   "usage": {"type": "duration", "seconds": round(event.end - event.start, 3)}})
            self.previous_item, self.item = self.item, new_id("item")
        elif isinstance(event, TurnEnded):
            pass  # speech_stopped went out with the turn's segment, which the end closes

    async def done(self, transcript) -> None:
        pass  # the client closes a transcription session; nothing ends it from inside

    async def send_event(self, event: dict) -> None:
        await self.send({"event_id": new_id("event"), **event})

    async def fail(self, message: str, *, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> None:
        await self.send_event({"type": "error", "error": {"type": kind, "code": code, "message": message,
                                                          "param": param, "event_id": self.client_event}})

    async def error(self, message: str, code: str) -> None:
        kind = "server_error" if code in ("processing_error", "server_busy") else "invalid_request_error"
        await self.fail(message, code=code, kind=kind)


def wants_openai(event: dict) -> bool:
    """Whether a vLLM-protocol connection's event is in fact an OpenAI transcription session's."""
    kind = event.get("type")
    return kind == "transcription_session.update" or (kind == "session.update" and isinstance(event.get("session"), dict))


async def take_over(connection, event: dict) -> None:
    """Serve the rest of a connection that began as vLLM's as an OpenAI transcription session."""
    openai = OpenAIRealtimeConnection(connection.ws, beta=event.get("type") == "transcription_session.update")
    openai.delay_ms, openai.rut = connection.delay_ms, connection.rut
    try:
        await openai.run(first=event)
    finally:
        await openai.shutdown()
