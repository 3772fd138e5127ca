"""``WS /v1/listen``: Deepgram's live transcription (v1), as the ``deepgram-sdk`` speaks it
(``listen.v1.connect``; shapes in ``deepgram/listen/v1/types``).

The query sets the session: ``encoding`` (``linear16``, ``linear32``, ``mulaw``, ``alaw``; or
``opus``/``ogg-opus``, or none at all, for a container such as WebM or Ogg), ``sample_rate``
(8000-48000, needed with a raw encoding), ``channels`` (mixed down), ``interim_results``,
``endpointing`` (ms of silence that ends an utterance: ``speech_final``; ``false`` turns it off;
Deepgram's default is 10), ``utterance_end_ms``, ``vad_events``; ``model``, ``language``,
``punctuate``, ``smart_format`` and the rest are accepted (the open weights have no such switches).
A bad key or bad parameters are refused at the handshake with HTTP 401 / 400 and a JSON body
``{err_code, err_msg}``, as Deepgram does. ``Authorization: Token KEY`` (or ``Bearer``).

Binary frames are one byte stream of audio (a frame may end mid-sample: the rest waits for the
next). Text frames: ``KeepAlive``, ``Finalize`` (a forced final, ``from_finalize: true``; the
stream goes on), ``CloseStream`` (the rest, then ``Metadata``, then the server closes). No audio
and no KeepAlive for 10 s closes the stream with ``NET-0001``. Out: ``Results`` (``is_final``
at each utterance end or Finalize, ``speech_final`` when endpointing ended it; with
``interim_results``, the utterance so far as it grows, its words too, the last one perhaps
still growing), ``SpeechStarted`` (``vad_events``),
``UtteranceEnd`` (after ``utterance_end_ms`` of silence since an utterance's speech stopped: the
VAD's clock, as endpointing; ``last_word_end`` from the model's words), ``Metadata``, and
``Error {variant, description, message}`` for bad messages, after which the stream goes on.
A word's ``confidence`` is its probability (``voxlive.words``: the mean of the model's probabilities
of its tokens); an alternative's is the mean of its words' (0 without words, as Deepgram sends it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from ..pcm import MAX_RATE, MIN_RATE, PcmDecoder
from ..turns import Delta, Segment, TurnEnded, TurnSettings, TurnStarted, UtteranceEnded
from ..words import WordAssembler
from .live import LiveConnection
from .settings import authorized
from .stream_decoder import StreamDecoder

RAW = {"linear16": "pcm_s16le", "linear32": "pcm_s32le", "mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}
CONTAINERS = ("opus", "ogg-opus", "webm")
IDLE_SECONDS = 10.0
DEFAULT_ENDPOINTING_MS = 10
VAD_EVENTS_SILENCE_MS = 500  # vad_events without endpointing: when speech counts as stopped


class BadParameter(ValueError):
    pass


def flag(query, name: str, default: bool = False) -> bool:
    raw = query.get(name)
    if raw is None:
        return default
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise BadParameter(f"{name} must be true or false, got {raw!r}")


def integer(query, name: str, low: int, high: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadParameter(f"{name} must be from {low} to {high}, got {value}")
    return value


def confidence(words: list[dict]) -> float:
    """An alternative's confidence: the mean of its words'."""
    return sum(w["confidence"] for w in words) / len(words) if words else 0.0


class DeepgramConnection(LiveConnection):
    idle_seconds = IDLE_SECONDS

    def __init__(self, ws: WebSocket):
        super().__init__(ws)
        self.request_id = str(uuid.uuid4())
        self.model_name = ws.query_params.get("model") or self.state.model_id
        self.container = False
        self.stream_decoder: StreamDecoder | None = None
        self._decoded: asyncio.Future | None = None
        self._carry = b""  # the bytes of a sample split across frames
        self.segment_text_so_far = ""
        self.open_segment = Delta([], [], 0)  # the tokens of the segment so far (interim results' words)
        self.last_word_end: float | None = None  # the end of the last word in a final

    def configure(self) -> None:
        q = self.ws.query_params
        encoding = q.get("encoding")
        rate = integer(q, "sample_rate", MIN_RATE, MAX_RATE)
        channels = integer(q, "channels", 1, 8) or 1
        if encoding is None or encoding in CONTAINERS:
            self.container = True
        elif encoding in RAW:
            if rate is None:
                raise BadParameter(f"sample_rate is required with encoding={encoding}")
            self.decoder = PcmDecoder(RAW[encoding], rate, channels)
        else:
            raise BadParameter(f"encoding {encoding!r} is not supported: one of {', '.join([*RAW, *CONTAINERS])}")
        self.interim = flag(q, "interim_results")
        self.vad_events = flag(q, "vad_events")
        raw = q.get("endpointing")
        if raw is not None and raw.lower() == "false":
            self.endpointing = None
        else:
            self.endpointing = integer(q, "endpointing", 0, 60000) if raw is not None else DEFAULT_ENDPOINTING_MS
        self.utterance_end_ms = integer(q, "utterance_end_ms", 1000, 60000)
        silence = self.endpointing if self.endpointing is not None else self.utterance_end_ms
        if silence is None and self.vad_events:
            silence = VAD_EVENTS_SILENCE_MS  # only to see where the next speech starts; no speech_final
        if silence is not None:
            self.settings = TurnSettings(min_silence_ms=silence, utterance_end_ms=self.utterance_end_ms)

    async def serve(self) -> None:
        if not authorized(self.ws, self.state.api_key):
            await self.ws.send_denial_response(JSONResponse(
                {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": self.request_id}, 401))
            return
        try:
            self.configure()
            self.delay_ms = self.state.delay_from(self.ws.query_params.get("delay_ms"))
        except ValueError as err:
            await self.ws.send_denial_response(JSONResponse(
                {"err_code": "Bad Request", "err_msg": str(err), "request_id": self.request_id}, 400))
            return
        await super().serve()

    async def run(self) -> None:
        await self.start()
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.idle_seconds)
            except asyncio.TimeoutError:
                await self.error("Deepgram did not receive audio data or a text message within the timeout "
                                 "window.", "NET-0001")
                await self.ws.close(1011, "NET-0001")
                return
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await self.audio(message["bytes"])
                if self._decoded is not None and self._decoded.done():
                    break  # the container cannot be decoded further: finish with what was
                continue
            try:
                event = json.loads(message["text"])
                kind = event.get("type") if isinstance(event, dict) else None
            except json.JSONDecodeError:
                kind = None
            if kind == "KeepAlive":
                continue
            if kind == "Finalize":
                await self.cut()
            elif kind == "CloseStream":
                break
            else:
                await self.error(f"unknown or malformed text message: {message['text'][:80]!r}; "
                                 "expected KeepAlive, Finalize or CloseStream", "INVALID_MESSAGE")
        if self.stream_decoder is not None:
            self.stream_decoder.close()
            problem = await self._decoded
            if problem:
                await self.error(problem, "DATA-0000")
        await self.end_audio()
        for task in list(self.senders):
            await task
        await self.send({"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
                         "sha256": hashlib.sha256(self.request_id.encode()).hexdigest(),
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                         "duration": round(self.samples / 16000, 3), "channels": 1,
                         "models": [self.model_name], "model_info": {}})
        await self.ws.close()

    async def audio(self, data: bytes) -> None:
        if self.container:
            if self.stream_decoder is None:
                self._decoded = asyncio.get_running_loop().create_future()
                self.stream_decoder = self.start_decoder()
            self.stream_decoder.feed(data)
            return
        data = self._carry + data
        whole = len(data) - len(data) % self.decoder.frame_bytes
        self._carry = data[whole:]
        if whole:
            await self.feed(data[:whole])

    def start_decoder(self) -> StreamDecoder:
        loop = asyncio.get_running_loop()

        def on_pcm(pcm):  # on the decoder's thread; waits while the session's inbox is full
            asyncio.run_coroutine_threadsafe(self.feed_pcm(pcm), loop).result()

        def on_done(problem):
            loop.call_soon_threadsafe(lambda: self._decoded.done() or self._decoded.set_result(problem))

        return StreamDecoder(on_pcm, on_done)

    # -- out --------------------------------------------------------------------------------------

    def words(self, tokens: list[int], probabilities: list[float], first: int, end: float) -> list[dict]:
        """The words of tokens from token index ``first`` on, in a result that ends at ``end``."""
        tok = self.model.tokenizer
        seconds_per_token = self.model.config.audio.ms_per_token / 1000
        assembler = WordAssembler(tok, left_pad=0, delay=0, seconds_per_token=seconds_per_token)
        limit = min(self.samples / 16000, end)  # the last token may reach past the segment's end
        for i, (token, probability) in enumerate(zip(tokens, probabilities)):
            assembler.push(token, first + i, limit, probability=probability)
        assembler.flush(limit)
        return [{"word": w.text, "start": w.start, "end": w.end, "confidence": w.probability,
                 "punctuated_word": w.text} for w in assembler.words]

    def results(self, text: str, words: list[dict], start: float, end: float, *, final: bool,
                speech_final: bool = False, from_finalize: bool = False) -> dict:
        return {"type": "Results", "channel_index": [0, 1], "duration": round(max(0.0, end - start), 3),
                "start": round(start, 3), "is_final": final, "speech_final": speech_final,
                "from_finalize": from_finalize,
                "channel": {"alternatives": [{"transcript": text, "confidence": confidence(words), "words": words}]},
                "metadata": {"request_id": self.request_id,
                             "model_info": {"name": self.model_name, "version": "voxlive", "arch": "voxtral"},
                             "model_uuid": self.request_id}}

    async def on_tokens(self, delta: Delta) -> None:
        if not self.interim:
            return
        if not self.open_segment.tokens:
            self.open_segment.first = delta.first
        self.open_segment.tokens += delta.tokens
        self.open_segment.probabilities += delta.probabilities

    async def on_delta(self, text: str) -> None:
        self.segment_text_so_far += text
        if self.interim:
            now = self.samples / 16000
            so_far = self.open_segment
            words = self.words(so_far.tokens, so_far.probabilities, so_far.first, now)
            await self.send(self.results(self.segment_text_so_far, words, self._segment_start(), now, final=False))

    def _segment_start(self) -> float:
        return self.turns._segment_start if self.turns is not None else 0.0

    async def on_event(self, event) -> None:
        if isinstance(event, TurnStarted):
            if self.vad_events:
                await self.send({"type": "SpeechStarted", "channel": [0, 1], "timestamp": event.time})
        elif isinstance(event, Segment):
            self.segment_text_so_far = ""
            self.open_segment = Delta([], [], 0)
            words = self.words(event.tokens, event.probabilities, event.first, event.end)
            speech_final = event.ends_turn and self.endpointing is not None
            await self.send(self.results(self.segment_text(event.tokens), words, event.start,
                                         min(event.end, self.samples / 16000), final=True,
                                         speech_final=speech_final, from_finalize=event.forced))
            if words:
                self.last_word_end = words[-1]["end"]
        elif isinstance(event, UtteranceEnded):
            last = self.last_word_end if self.last_word_end is not None else event.time
            await self.send({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": last})
        elif isinstance(event, TurnEnded):
            pass  # its Results went out with the segment it closed

    async def done(self, transcript) -> None:
        pass  # Metadata follows once the receive loop has seen the senders out

    async def error(self, message: str, code: str) -> None:
        await self.send({"type": "Error", "variant": code, "description": message, "message": message, "code": code})

    async def shutdown(self) -> None:
        if self.stream_decoder is not None:
            self.stream_decoder.close()
        await super().shutdown()


async def deepgram_endpoint(ws: WebSocket) -> None:
    await DeepgramConnection(ws).serve()
