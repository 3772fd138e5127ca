"""``WS /v1/audio/transcriptions/realtime?model=...``: Mistral's realtime transcription protocol, as
the ``mistralai`` SDK speaks it (``mistralai/extra/realtime``; shapes in ``mistralai/client/models``).

Server first: ``session.created {session}``. Client: ``session.update {session: {audio_format
{encoding, sample_rate}, target_streaming_delay_ms, turn_detection, language, context_bias, ...}}``
(before audio only, as Mistral's server rules) -> ``session.updated``; ``input_audio.append
{audio}``, ``input_audio.flush`` (a forced final: the text so far as a segment and a
``transcription.done``; the session goes on), ``input_audio.end`` (the rest, the last
``transcription.done``, then the server closes). Server: ``transcription.text.delta {text}``,
``transcription.segment {text, start, end}`` (one per turn or flush), ``turn.start / eager_end /
resume / end {time_s[, end_reason]}``, ``transcription.done {model, text, usage, language,
segments}``, ``error {error: {message, code}}``.

Each ``transcription.done`` covers the stretch since the one before (its text, segments and usage),
so the dones of a session add up to its transcript, as its deltas do. Mistral's server answers a
flush with a ``done`` and keeps the session open, and the voice-agent clients (LiveKit's
``mistralai`` plugin, Pipecat's ``MistralSTTService``) wait for exactly that to emit a turn's final
transcript; a flush with no new text still gets its (empty) ``done``, so no client waits forever.
The model does not identify the language it hears: no ``transcription.language`` is sent, and
``language`` is null in ``transcription.done`` (a requested ``language`` is a hint the open weights
cannot take, reported under ``not_applied``).

Audio before any ``session.update`` is taken in the session's announced default format (PCM s16le
16 kHz). ``target_streaming_delay_ms`` is rounded to the nearest delay the model allows and sent
back. ``language``, ``context_bias``, ``diarize`` and ``speaker_references`` are accepted and
listed under ``not_applied`` in ``session.updated`` (the open weights have no such inputs).
``turn.end`` with reason ``threshold`` also closes a turn the audio's end cut short.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid

from starlette.websockets import WebSocket

from ..config import allowed_delays_ms
from ..pcm import ENCODINGS, PcmDecoder
from ..turns import EagerEnd, Segment, TurnEnded, TurnResumed, TurnSettings, TurnStarted
from .engine import SessionOver
from .live import LiveConnection

MAX_AUDIO_BYTES = 262144  # the SDK's documented limit for one append's decoded audio
NOT_APPLIED = ("language", "context_bias", "diarize", "speaker_references")
TURN_DEFAULTS = {"start_threshold": 0.5, "eager_end_threshold": 0.5, "end_threshold": 0.33,
                 "min_silence_ms": 500, "end_timeout_ms": None}


class MistralConnection(LiveConnection):
    def __init__(self, ws: WebSocket):
        super().__init__(ws)
        self.model_name = ws.query_params.get("model") or self.state.model_id
        self.request_id = uuid.uuid4().hex
        self.turn_detection: dict | None = None
        self.not_applied: dict = {}
        self.segments: list[dict] = []  # since the last transcription.done
        self.done_mark = (0, 0.0, 0)  # where the last done left off: len(self.text), seconds, tokens
        self.segment_tokens = 0  # tokens of every segment closed so far

    def session_object(self) -> dict:
        delay = self.delay_ms if self.delay_ms is not None else self.model.config.audio.delay_ms
        return {
            "request_id": self.request_id, "model": self.model_name,
            "audio_format": {"encoding": self.decoder.encoding, "sample_rate": self.decoder.sample_rate},
            "target_streaming_delay_ms": delay, "language": None, "context_bias": None, "diarize": False,
            "turn_detection": self.turn_detection,
            "not_applied": self.not_applied,
        }

    async def run(self) -> None:
        await self.send({"type": "session.created", "session": self.session_object()})
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is None:
                await self.error("expected JSON text messages, got a binary frame", 400)
                continue
            try:
                event = json.loads(message["text"])
            except json.JSONDecodeError:
                await self.error("invalid JSON", 400)
                continue
            if not isinstance(event, dict):
                await self.error("a message must be a JSON object", 400)
                continue
            if await self.handle(event):
                return

    async def handle(self, event: dict) -> bool:
        """One client message; True once the session is over."""
        kind = event.get("type")
        if kind == "session.update":
            await self.update(event.get("session"))
        elif kind == "input_audio.append":
            audio = event.get("audio")
            if not isinstance(audio, str):
                await self.error("input_audio.append: audio must be a base64 string", 400)
                return False
            try:
                data = base64.b64decode(audio, validate=True)
            except (binascii.Error, ValueError) as err:
                await self.error(f"input_audio.append: invalid base64: {err}", 400)
                return False
            if len(data) > MAX_AUDIO_BYTES:
                await self.error(f"input_audio.append: {len(data)} bytes of audio, more than {MAX_AUDIO_BYTES}; "
                                 "send it in smaller pieces", 413)
                return False
            try:
                await self.feed(data)
            except ValueError as err:
                await self.error(f"input_audio.append: {err}; message ignored", 400)
            except SessionOver as err:
                await self.error(str(err), 409)
        elif kind == "input_audio.flush":
            await self.cut()
        elif kind == "input_audio.end":
            await self.end_audio()
            await self.wait_senders()
            return True
        else:
            await self.error(f"unknown message type: {kind!r}", 400)
        return False

    async def update(self, fields) -> None:
        if not isinstance(fields, dict):
            await self.error("session.update: session must be an object", 400)
            return
        if self.started:
            await self.error("Session fields cannot be changed after audio has started", 409)
            return
        decoder, delay, settings, turn_detection = self.decoder, self.delay_ms, self.settings, self.turn_detection
        try:
            fmt = fields.get("audio_format")
            if fmt is not None:
                if not isinstance(fmt, dict):
                    raise ValueError("audio_format must be an object {encoding, sample_rate}")
                encoding = fmt.get("encoding", "pcm_s16le")
                if encoding not in ENCODINGS:
                    raise ValueError(f"unsupported encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
                decoder = PcmDecoder(encoding, fmt.get("sample_rate", 16000))
            if fields.get("target_streaming_delay_ms") is not None:
                delay = self.nearest_delay(fields["target_streaming_delay_ms"])
            if "turn_detection" in fields:
                turn_detection, settings = self.turn_settings(fields["turn_detection"])
        except (ValueError, TypeError) as err:
            await self.error(f"session.update: {err}", 422)
            return
        self.decoder, self.delay_ms, self.settings, self.turn_detection = decoder, delay, settings, turn_detection
        for name in NOT_APPLIED:
            if fields.get(name) not in (None, False, [], {}):
                self.not_applied[name] = "accepted, not applied: the open Voxtral weights have no such input"
        await self.send({"type": "session.updated", "session": self.session_object()})

    def nearest_delay(self, value) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"target_streaming_delay_ms must be a number, got {value!r}")
        allowed = allowed_delays_ms(self.model.config.audio.ms_per_token)
        return min(allowed, key=lambda d: (abs(d - value), d))

    @staticmethod
    def turn_settings(raw) -> tuple[dict | None, TurnSettings | None]:
        if raw is None:
            return None, None
        if not isinstance(raw, dict):
            raise ValueError("turn_detection must be an object or null")
        unknown = set(raw) - set(TURN_DEFAULTS)
        if unknown:
            raise ValueError(f"turn_detection: unknown fields {sorted(unknown)}")
        merged = {k: (raw[k] if raw.get(k) is not None else v) for k, v in TURN_DEFAULTS.items()}
        for name in ("start_threshold", "eager_end_threshold", "end_threshold"):
            if isinstance(merged[name], bool) or not isinstance(merged[name], (int, float)):
                raise ValueError(f"turn_detection.{name} must be a number")
        for name in ("min_silence_ms", "end_timeout_ms"):
            if merged[name] is not None and (isinstance(merged[name], bool) or not isinstance(merged[name], int)):
                raise ValueError(f"turn_detection.{name} must be an integer")
        settings = TurnSettings(start_threshold=float(merged["start_threshold"]),
                                eager_end_threshold=float(merged["eager_end_threshold"]),
                                end_threshold=float(merged["end_threshold"]),
                                min_silence_ms=merged["min_silence_ms"], end_timeout_ms=merged["end_timeout_ms"])
        settings.check()
        return merged, settings

    async def wait_senders(self) -> None:
        for task in list(self.senders):
            await task

    # -- out --------------------------------------------------------------------------------------

    async def on_delta(self, text: str) -> None:
        await self.send({"type": "transcription.text.delta", "text": text})

    async def on_event(self, event) -> None:
        if isinstance(event, Segment):
            end = min(event.end, self.samples / 16000)
            self.segment_tokens += len(event.tokens)
            text = self.segment_text(event.tokens)
            if text:
                segment = {"text": text, "start": event.start, "end": end}
                self.segments.append(segment)
                await self.send({"type": "transcription.segment", **segment})
            if event.forced:
                await self.send_done(end)
            return
        if self.turn_detection is None:
            return
        if isinstance(event, TurnStarted):
            await self.send({"type": "turn.start", "time_s": event.time})
        elif isinstance(event, EagerEnd):
            await self.send({"type": "turn.eager_end", "time_s": event.time})
        elif isinstance(event, TurnResumed):
            await self.send({"type": "turn.resume", "time_s": event.time})
        elif isinstance(event, TurnEnded):
            reason = "timeout" if event.reason == "timeout" else "threshold"
            await self.send({"type": "turn.end", "time_s": event.time, "end_reason": reason})

    async def done(self, transcript) -> None:
        await self.send_done(transcript.duration, prompt_tokens=self.usage()["prompt_tokens"])

    async def send_done(self, end: float, prompt_tokens: int = 0) -> None:
        """The ``transcription.done`` of the stretch since the last one, up to ``end`` seconds; the
        session's prompt is counted once, in its last done."""
        chars, since, tokens = self.done_mark
        completion = self.segment_tokens - tokens
        await self.send({
            "type": "transcription.done", "model": self.model_name, "text": self.text[chars:],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion, "prompt_audio_seconds": round(end - since)},
            "language": None,
            "segments": [{"type": "transcription_segment", **s} for s in self.segments],
        })
        self.segments = []
        self.done_mark = (len(self.text), end, self.segment_tokens)

    async def error(self, message: str, code) -> None:
        codes = {"unauthorized": 401, "invalid_parameter": 400, "server_busy": 503, "processing_error": 500}
        await self.send({"type": "error", "error": {"message": message, "code": codes.get(code, code)}})


async def mistral_endpoint(ws: WebSocket) -> None:
    await MistralConnection(ws).serve()
