"""The scheduler: one thread owns the model and serves every live session in batched steps.

Sessions (WebSocket streams, uploads) hand audio to the engine thread through bounded inboxes.
The thread loops: take new audio from every session, encode it in ONE batched encoder pass, run
prompt positions, then ONE batched decode step over every stream that has a position ready.

How much audio a stream takes is a trade-off between latency and encoder efficiency. A stream
that keeps up (undecoded backlog under ``refill_below_seconds``) takes whatever has arrived, so a
live word is encoded as soon as its audio is in. A stream that lags (an upload, or more streams
than the machine serves in real time) is left to drain to that mark and then topped up to
``max_backlog_seconds`` in one go: the encoder then runs on many tokens per pass (compute-bound
GEMMs) instead of reading its weights once per 80 ms token. Sessions join and leave
between steps (continuous batching), so N streams cost one read of the decoder weights per step
instead of N.

Nothing grows without bound. A session's inbox holds at most ``max_buffer_seconds`` of audio: when
it is full, ``append`` waits, so the WebSocket stops being read and TCP pushes back on the client;
nothing already accepted is dropped. Updates to the client are coalesced (new words, tokens and
the lag figure accumulate until the client's handler takes them), so a slow reader costs a few
bytes of text, not a queue of messages. Every update carries ``lag``: seconds of received audio
not yet transcribed, which is how a client learns that it is not being served in real time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..session import Stream, decode_step, prepare_ready
from ..transcript import Transcript, Word

log = logging.getLogger("voxlive.server")


class EngineBusy(RuntimeError):
    """More sessions than ``max_sessions``."""


class SessionOver(RuntimeError):
    """Audio for a session that has ended, failed or been closed."""


@dataclass
class Update:
    """Everything new for one session since the client's handler last looked."""

    tokens: list[int] = field(default_factory=list)  # generated ids, in order
    words: list[Word] = field(default_factory=list)  # newly completed words
    partial: str = ""  # the word in progress
    lag: float = 0.0  # seconds of received audio not yet transcribed
    cuts: list[Cut] = field(default_factory=list)  # forced finals, to apply before ``tokens``
    transcript: Transcript | None = None  # set once, on the last update of a finished session
    error: str | None = None  # set once, when the engine failed this session


@dataclass
class Cut:
    """A forced final: the tokens offline ``transcribe`` gives for the first ``samples`` received
    (a fork of the stream, right-padded and decoded as ``finish()`` does). Its first ``forked_at``
    tokens are the main stream's, published before it; the main stream's tokens from ``forked_at``
    on are published after it (the engine holds them back while the fork runs)."""

    samples: int
    forked_at: int
    tokens: list[int]


@dataclass
class _Fork:
    samples: int
    stream: Stream | None = None


class Session:
    """One stream in the engine, as seen from the asyncio side (a WebSocket or HTTP handler)."""

    def __init__(self, engine: Engine, delay_ms: int | None, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.delay_ms = delay_ms
        self.loop = loop
        self.stream: Stream | None = None  # created by the engine thread
        self.received = 0  # samples accepted
        self._published = 0  # stream tokens already handed to the client
        self._inbox: deque[np.ndarray] = deque()
        self._inbox_samples = 0
        self._ending = False  # no more audio will come
        self._closed = False  # nobody is listening: drop the stream
        self._pending = Update()
        self._done = False
        self._changed = asyncio.Event()
        self._drained = asyncio.Event()
        self._last_lag = 0.0  # the lag the client was last told
        self._forks: list[_Fork] = []  # forced finals asked for, in order (engine side)

    # -- asyncio side -----------------------------------------------------------------------------

    async def append(self, pcm: np.ndarray) -> None:
        """Queue float32 16 kHz mono audio; waits while the inbox is full (backpressure)."""
        if self._ending:
            raise SessionOver("audio after the end of the stream")
        limit = self.engine.max_buffer_samples
        while True:
            with self.engine.lock:
                if self._inbox_samples < limit or self._done or self._closed:
                    break
                self._drained.clear()
            await self._drained.wait()
        if self._done or self._closed:
            raise SessionOver(self._pending.error or "session is over")
        with self.engine.lock:
            if len(pcm):
                self._inbox.append(pcm)
                self._inbox_samples += len(pcm)
                self.received += len(pcm)
            self.engine.work.notify()

    def cut(self) -> int:
        """Force a final for the audio received so far without ending the session: the engine forks
        the stream there, and a later Update's ``cuts`` carries the fork's tokens. Returns the cut's
        sample count (its key)."""
        with self.engine.lock:
            if self._ending:
                raise SessionOver("audio after the end of the stream")
            fork = _Fork(self.received)
            self._inbox.append(fork)  # in line with the audio: the fork takes exactly what came before
            self.engine.work.notify()
        return fork.samples

    def end(self) -> None:
        """No more audio: the engine right-pads, decodes to the end and delivers the transcript."""
        with self.engine.lock:
            self._ending = True
            self.engine.work.notify()

    def close(self) -> None:
        """The client is gone: forget the session (its slot is freed). Call from the event loop."""
        with self.engine.lock:
            self._closed = True
            self.engine.work.notify()
        self._drained.set()  # an append waiting for room gives up

    async def next_update(self) -> Update:
        """Wait for news, then take all of it (one coalesced Update)."""
        while True:
            with self.engine.lock:
                news = self._pending
                if news.tokens or news.words or news.cuts or news.transcript or news.error \
                        or news.lag != self._last_lag:
                    self._pending = Update(partial=news.partial, lag=news.lag)
                    self._last_lag = news.lag
                    self._changed.clear()
                    return news
                self._changed.clear()
            await self._changed.wait()

    @property
    def finished(self) -> bool:
        return self._done

    # -- engine side (called with engine.lock held) -----------------------------------------------

    def _notify(self, *events: asyncio.Event) -> None:
        for event in events:
            try:
                self.loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the client's event loop is gone, and nobody is waiting
                pass


class Engine:
    """The thread that owns the model. Create one per model; ``start`` it, ``stop`` it at shutdown."""

    def __init__(self, model, *, max_sessions: int = 16, max_buffer_seconds: float = 30.0,
                 max_backlog_seconds: float = 4.0, refill_below_seconds: float = 1.0):
        self.model = model
        self.max_sessions = max_sessions
        rate = model.config.audio.sample_rate
        self.max_buffer_samples = int(max_buffer_seconds * rate)
        ms = model.config.audio.ms_per_token
        self.max_backlog_tokens = max(1, round(max_backlog_seconds * 1000 / ms))
        self.refill_below_tokens = min(self.max_backlog_tokens - 1, round(refill_below_seconds * 1000 / ms))
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.sessions: list[Session] = []
        self.steps = 0  # batched decode steps run (for metrics and tests)
        self.max_batch = 0  # the largest decode batch seen
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="voxlive-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.work.notify()
        self._thread.join(timeout=30)

    def open(self, *, delay_ms: int | None = None) -> Session:
        """A new session on the calling event loop; raises EngineBusy past ``max_sessions``."""
        self.model.config.delay_tokens(delay_ms)  # a bad delay fails here, in the caller's thread
        session = Session(self, delay_ms, asyncio.get_running_loop())
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise EngineBusy(f"server busy: {self.max_sessions} sessions already running")
            self.sessions.append(session)
            self.work.notify()
        return session

    @property
    def active(self) -> int:
        with self.lock:
            return len(self.sessions)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stop and not self._has_work():
                    self.work.wait()
                if self._stop:
                    for s in self.sessions:
                        self._fail(s, "server shutting down")
                    self.sessions.clear()
                    return
                self.sessions = [s for s in self.sessions if not s._closed]
                sessions = list(self.sessions)
            try:
                self._iteration(sessions)
            except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
                log.exception("engine step failed")
                with self.lock:
                    for s in sessions:
                        self._fail(s, f"internal error: {err}")
                    self.sessions = [s for s in self.sessions if s not in sessions]

    def _has_work(self) -> bool:
        for s in self.sessions:
            if s._closed or s.stream is None or s._inbox or s._forks or (s._ending and not s.stream.finished):
                return True
            if s.stream.ready() or (s.stream.finished and not s._done):
                return True
        return False

    def _iteration(self, sessions: list[Session]) -> None:
        for s in sessions:
            if s.stream is None:
                s.stream = self.model.stream(delay_ms=s.delay_ms)
        self._ingest(sessions)
        streams = [s.stream for s in sessions] + [f.stream for s in sessions for f in s._forks]
        prepare_ready(streams)
        advanced = decode_step(streams)
        if advanced:
            self.steps += 1
            self.max_batch = max(self.max_batch, len(advanced))
        self._publish(sessions)

    def _ingest(self, sessions: list[Session]) -> None:
        """Move audio from inboxes into streams, keeping each stream's undecoded backlog bounded."""
        per_token = self.model.config.audio.samples_per_token
        with self.lock:
            for s in sessions:
                st = s.stream
                lagging = st.backlog > self.refill_below_tokens
                room = 0 if lagging else (self.max_backlog_tokens - st.backlog) * per_token
                taken = []
                while s._inbox and (room > 0 or isinstance(s._inbox[0], _Fork)):
                    chunk = s._inbox.popleft()
                    if isinstance(chunk, _Fork):
                        if taken:
                            st.push(np.concatenate(taken) if len(taken) > 1 else taken[0])
                            taken = []
                        chunk.stream = st.fork()
                        chunk.stream.end_audio()
                        s._forks.append(chunk)
                        continue
                    if len(chunk) > room:
                        s._inbox.appendleft(chunk[room:])
                        chunk = chunk[:room]
                    taken.append(chunk)
                    room -= len(chunk)
                    s._inbox_samples -= len(chunk)
                if taken:
                    st.push(np.concatenate(taken) if len(taken) > 1 else taken[0])
                    s._notify(s._drained)
                if s._ending and not s._inbox and not st.finished:
                    st.end_audio()

    def _publish(self, sessions: list[Session]) -> None:
        rate = self.model.config.audio.sample_rate
        step = self.model.config.audio.ms_per_token / 1000
        with self.lock:
            finished = []
            for s in sessions:
                st = s.stream
                if s._done:
                    continue
                news = s._pending
                while s._forks and s._forks[0].stream.finished and not s._forks[0].stream.ready() \
                        and not s._forks[0].stream.backlog:
                    fork = s._forks.pop(0)
                    news.cuts.append(Cut(fork.samples, s._published, fork.stream.tokens))
                    s._notify(s._changed)
                if s._forks:
                    continue  # the main stream's tokens wait until the fork before them is out
                new_tokens = st.tokens[s._published:]
                s._published = len(st.tokens)
                news.tokens += new_tokens
                news.words += st.take_words()
                news.partial = st.partial_word
                transcribed = max(0, st.decoded - len(st.prompt) + 1) * step
                news.lag = round(max(0.0, s.received / rate - transcribed), 2)
                if st.finished and not st.ready():
                    news.transcript = st.complete()
                    news.words += st.take_words()
                    news.partial = ""
                    news.lag = 0.0
                    s._done = True
                    finished.append(s)
                if new_tokens or news.words or news.transcript or news.lag != s._last_lag:
                    s._notify(s._changed)
            if finished:
                self.sessions = [s for s in self.sessions if s not in finished]

    def _fail(self, s: Session, message: str) -> None:
        if not s._done:
            s._pending.error = message
            s._done = True
            s._notify(s._changed, s._drained)
