"""The engine thread: one thread owns the model and serves every live session in batched steps.

Sessions (WebSocket streams, uploads) hand audio to the engine thread through bounded inboxes.
Each step is schedule -> execute -> publish: the scheduler (``scheduler.py``, a pure function)
turns the sessions' public state into a plan; the engine executes it (move audio from inboxes
into streams, ONE batched encoder pass, prompt positions, ONE batched decode step over every
stream with a position ready); then each session publishes what is new to its client. Sessions
join and leave between steps (continuous batching), so N streams cost one read of the decoder
weights per step instead of N.

Nothing grows without bound. A session's inbox holds at most ``max_buffer_seconds`` of audio: when
it is full, ``append`` waits, so the WebSocket stops being read and TCP pushes back on the client;
nothing already accepted is dropped. Updates to the client are coalesced (new words, tokens and
the lag figure accumulate until the client's handler takes them), so a slow reader costs a few
bytes of text, not a queue of messages. Every update carries ``lag``: seconds of received audio
not yet transcribed, which is how a client learns that it is not being served in real time.

Blank ruts (``voxlive.rut``): each session's stream breaks them with the session's policy; the
speech threshold's VAD runs in the session's ``append``, on the client's event loop, and its
probabilities travel with the audio, so the engine thread never waits on it. Every rut broken is
in the session's updates (``Update.ruts``) and counted in ``Engine.ruts`` (``/health``).

Locking: ``engine.lock`` guards what both sides touch (inboxes, pending updates, flags). A stream
is touched only by the engine thread, and model work runs without the lock held.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..rut import DEFAULT_POLICY, Rut, RutPolicy
from ..session import Stream, decode_step, encode_and_prefill
from ..transcript import Transcript, Word
from .scheduler import Plan, Policy, SessionView, schedule

log = logging.getLogger("voxlive.server")


class EngineBusy(RuntimeError):
    """More sessions than ``max_sessions``."""


class SessionOver(RuntimeError):
    """Audio for a session that has ended, failed or been closed."""


@dataclass(frozen=True)
class Load:
    """How busy an engine is, as ``/health``, ``/metrics`` and a router of replicas see it."""

    sessions: int  # live sessions (streams and uploads)
    max_sessions: int
    lag: float  # the worst session's seconds of received audio not yet transcribed
    steps: int  # batched decode steps run
    step_seconds: float  # model time of every engine step so far (a counter: rate / steps' rate = mean step)
    batch: int  # streams in the last decode step
    max_batch: int  # the largest decode batch seen
    ruts: int = 0  # blank ruts broken, all sessions together (a counter)

    @property
    def full(self) -> bool:
        return self.sessions >= self.max_sessions


@dataclass
class Update:
    """Everything new for one session since the client's handler last looked."""

    tokens: list[int] = field(default_factory=list)  # generated ids, in order
    probabilities: list[float] = field(default_factory=list)  # the model's probability of each token
    words: list[Word] = field(default_factory=list)  # newly completed words
    partial: str = ""  # the word in progress
    lag: float = 0.0  # seconds of received audio not yet transcribed
    cuts: list[Cut] = field(default_factory=list)  # forced finals: see ``in_order``
    transcript: Transcript | None = None  # set once, on the last update of a finished session
    positions: int = 0  # with the transcript: decoder positions run (prompt included)
    error: str | None = None  # set once, when the engine failed this session
    ruts: list[Rut] = field(default_factory=list)  # blank ruts broken since the last update

    def in_order(self, seen: int) -> list[Cut | tuple[list[int], list[float]]]:
        """The cuts and the runs of main tokens between them (tokens, probabilities), in the order the
        engine published them, for a reader that has taken ``seen`` main tokens. Updates merged while
        the reader was busy can hold tokens published before a cut (each cut counts those before it:
        ``forked_at``)."""
        out, tokens, probabilities = [], self.tokens, self.probabilities
        for cut in self.cuts:
            before = cut.forked_at - seen
            if before > 0:
                out.append((tokens[:before], probabilities[:before]))
                tokens, probabilities, seen = tokens[before:], probabilities[before:], cut.forked_at
            out.append(cut)
        return out + [(tokens, probabilities)] if tokens else out

    def merge(self, news: Update) -> None:
        self.cuts += news.cuts
        self.tokens += news.tokens
        self.probabilities += news.probabilities
        self.words += news.words
        self.ruts += news.ruts
        self.partial, self.lag = news.partial, news.lag
        self.transcript = news.transcript or self.transcript
        self.positions = news.positions or self.positions


@dataclass
class Cut:
    """A forced final: the tokens offline ``transcribe`` gives for the first ``samples`` received
    (a fork of the stream, right-padded and decoded as ``finish()`` does). Its first ``forked_at``
    tokens are the main stream's, published before it; the main stream's tokens from ``forked_at``
    on are published after it (they are held back while forks run)."""

    samples: int
    forked_at: int
    tokens: list[int]
    probabilities: list[float]  # the model's probability of each token


@dataclass
class _Fork:
    samples: int
    stream: Stream

    @property
    def done(self) -> bool:
        return not (self.stream.can_prepare or self.stream.can_decode)


class Session:
    """One stream in the engine: the asyncio side (a WebSocket or HTTP handler) feeds audio and
    reads updates; the engine thread reads its ``view``, moves its audio and publishes to it."""

    def __init__(self, engine: Engine, delay_ms: int | None, loop: asyncio.AbstractEventLoop, *,
                 rut: RutPolicy | None = DEFAULT_POLICY, vad=None):
        self.engine = engine
        self.delay_ms = delay_ms
        self.loop = loop
        self.rut = rut  # the stream's blank-rut policy (None: pure greedy)
        self.vad = vad  # a VadStream for the rut's speech threshold, run here in append (None: none)
        self._speech: list[np.ndarray] = []  # its probabilities not yet handed to the stream
        self.stream: Stream | None = None  # created, and touched, by the engine thread only
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
        self._cuts: deque[int] = deque()  # received-sample counts where the client forced a final
        self._forks: list[_Fork] = []  # engine thread: forks being decoded, in order

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
        probs = self.vad.push(pcm) if self.vad is not None and len(pcm) else None
        with self.engine.lock:
            if probs is not None and len(probs):
                self._speech.append(probs)
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
            self._cuts.append(self.received)
            self.engine.work.notify()
            return self.received

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
                if news.tokens or news.words or news.cuts or news.ruts or news.transcript or news.error \
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

    @property
    def ending(self) -> bool:
        """The client said no more audio; the engine is finishing the session."""
        return self._ending

    @property
    def buffered(self) -> int:
        """Samples accepted and not yet taken by the engine."""
        return self._inbox_samples

    @property
    def lag(self) -> float:
        """Seconds of received audio not yet transcribed, as last published."""
        return self._pending.lag

    # -- engine side ------------------------------------------------------------------------------

    def view(self) -> SessionView:
        """This session's public state for the scheduler (engine lock held)."""
        st = self.stream
        taken = self.received - self._inbox_samples
        return SessionView(
            key=self, started=st is not None, closed=self._closed, done=self._done, inbox=self._inbox_samples,
            ending=self._ending, audio_ended=st is not None and st.finished, backlog=st.backlog if st else 0,
            can_prepare=st is not None and st.can_prepare, can_decode=st is not None and st.can_decode,
            cut=self._cuts[0] - taken if self._cuts else None, forking=bool(self._forks))

    def take_audio(self, n: int) -> np.ndarray:
        """Remove the first ``n`` samples of the inbox (engine lock held); its writer may go on."""
        taken = []
        while n > 0:
            chunk = self._inbox.popleft()
            if len(chunk) > n:
                self._inbox.appendleft(chunk[n:])
                chunk = chunk[:n]
            taken.append(chunk)
            n -= len(chunk)
            self._inbox_samples -= len(chunk)
        self._notify(self._drained)
        return np.concatenate(taken) if len(taken) > 1 else taken[0]

    def take_speech(self) -> np.ndarray | None:
        """The VAD probabilities computed since the last call (engine lock held)."""
        if not self._speech:
            return None
        probs, self._speech = np.concatenate(self._speech), []
        return probs

    def progress(self, *, complete: bool) -> Update:
        """What the stream has that the client has not seen (engine thread, no lock: the final
        transcript is decoded here, not while every session waits for the lock)."""
        st = self.stream
        lag = round(max(0.0, self.received / self.engine.sample_rate - st.transcribed), 2)
        cuts = []
        while self._forks and self._forks[0].done:
            fork = self._forks.pop(0)
            cuts.append(Cut(fork.samples, self._published, fork.stream.tokens, fork.stream.probabilities.tolist()))
            fork.stream.runtime.release(fork.stream.state)  # its KV slots back to the pools now
        if self._forks:  # the main stream's tokens wait until the forks before them are out
            return Update(cuts=cuts, partial=self._pending.partial, lag=lag)
        news = Update(tokens=st.tokens[self._published:], probabilities=st.probabilities[self._published:].tolist(),
                      words=st.take_words(), partial=st.partial_word, cuts=cuts, ruts=st.take_ruts())
        if news.ruts:
            self.engine.ruts += len(news.ruts)
            for rut in news.ruts:
                log.warning("blank rut broken: %d pads from %.2f s of audio, text again at %.2f s", rut.positions,
                            rut.start, rut.end)
        self._published = len(st.tokens)
        news.lag = lag
        if complete:
            news.transcript = st.complete()
            news.positions = st.decoded
            news.words += st.take_words()
            news.partial, news.lag = "", 0.0
            self.release()
        return news

    def publish(self, news: Update) -> None:
        """Hand news to the client's side (engine lock held)."""
        if self._done:
            return
        self._pending.merge(news)
        self._done = news.transcript is not None
        if news.tokens or news.words or news.cuts or news.ruts or news.transcript or news.lag != self._last_lag:
            self._notify(self._changed)

    def fail(self, message: str) -> None:
        """The engine cannot go on with this session (engine lock held)."""
        if not self._done:
            self._pending.error = message
            self._done = True
            self.release()
            self._notify(self._changed, self._drained)

    def release(self) -> None:
        """Give the stream's cache slots back to the runtime now (engine thread): a long connection
        of many utterances reuses slots instead of growing the pools until the GC runs."""
        if self.stream is not None:
            self.stream.runtime.release(self.stream.state)
            self.stream = None

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
        audio = model.config.audio
        self.sample_rate = audio.sample_rate
        self.max_buffer_samples = int(max_buffer_seconds * audio.sample_rate)
        max_backlog = max(1, round(max_backlog_seconds * 1000 / audio.ms_per_token))
        self.policy = Policy(samples_per_token=audio.samples_per_token, max_backlog_tokens=max_backlog,
                             refill_below_tokens=min(max_backlog - 1, round(refill_below_seconds * 1000 / audio.ms_per_token)))
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.sessions: list[Session] = []
        self.steps = 0  # batched decode steps run (for metrics and tests)
        self.step_seconds = 0.0  # model time of all engine steps
        self.batch = 0  # streams in the last decode step
        self.max_batch = 0  # the largest decode batch seen
        self.ruts = 0  # blank ruts broken, all sessions together (engine thread)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="voxlive-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.work.notify()
        self._thread.join(timeout=30)

    def open(self, *, delay_ms: int | None = None, rut: RutPolicy | None = DEFAULT_POLICY, vad=None) -> Session:
        """A new session on the calling event loop; raises EngineBusy past ``max_sessions``.

        ``rut``: its blank-rut policy; ``vad``: a VadStream for the policy's speech threshold."""
        self.model.config.delay_tokens(delay_ms)  # a bad delay fails here, in the caller's thread
        if rut is not None:
            rut.check()
        session = Session(self, delay_ms, asyncio.get_running_loop(), rut=rut, vad=vad)
        with self.lock:
            if self._live() >= self.max_sessions:
                raise EngineBusy(f"server busy: {self.max_sessions} sessions already running")
            self.sessions.append(session)
            self.work.notify()
        return session

    def _live(self) -> int:
        """Sessions holding a slot (lock held). A closed session's slot is free at once, though the
        engine thread drops its stream only before its next step (which runs it no more): a client
        that reconnects, or a router that counted the connection's end, finds the slot free."""
        return sum(not s._closed for s in self.sessions)

    @property
    def active(self) -> int:
        """Sessions the engine still holds, closed ones not yet dropped included."""
        with self.lock:
            return len(self.sessions)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def load(self) -> Load:
        with self.lock:
            lag = max((s.lag for s in self.sessions), default=0.0)
            return Load(self._live(), self.max_sessions, lag, self.steps, self.step_seconds, self.batch,
                        self.max_batch, self.ruts)

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.lock:
                while True:
                    if self._stop:
                        for s in self.sessions:
                            s.fail("server shutting down")
                        self.sessions.clear()
                        return
                    plan = schedule([s.view() for s in self.sessions], self.policy)
                    if plan:
                        break
                    self.work.wait()
                for s in plan.drop:
                    s.release()
                if plan.drop:
                    self.sessions = [s for s in self.sessions if not s._closed]
                audio = {s: (s.take_audio(n), s.take_speech()) for s, n in plan.ingest.items()}
                cuts = {s: s._cuts.popleft() for s in plan.fork}
                sessions = list(self.sessions)
            try:
                started = time.perf_counter()
                self._execute(plan, audio, cuts)
                self.step_seconds += time.perf_counter() - started
                updates = [(s, s.progress(complete=s in plan.complete)) for s in sessions if s.stream is not None]
            except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
                log.exception("engine step failed")
                with self.lock:
                    for s in sessions:
                        s.fail(f"internal error: {err}")
                    self.sessions = [s for s in self.sessions if s not in sessions]
                continue
            with self.lock:
                for s, news in updates:
                    s.publish(news)
                if plan.complete:
                    self.sessions = [s for s in self.sessions if not s.finished]

    def _execute(self, plan: Plan, audio: dict[Session, tuple], cuts: dict[Session, int]) -> None:
        """Run a plan's model work (engine thread, no lock held)."""
        for s in plan.start:
            s.stream = self.model.stream(delay_ms=s.delay_ms, rut=s.rut, speech="fed" if s.vad else "none")
        for s, (pcm, speech) in audio.items():
            if speech is not None:
                s.stream.add_speech(speech)
            s.stream.push(pcm)
        for s, samples in cuts.items():  # the audio up to the cut is in: fork there, pad the fork
            fork = s.stream.fork()
            fork.end_audio()
            s._forks.append(_Fork(samples, fork))
        for s in plan.end_audio:
            s.stream.end_audio()
        forks = [f.stream for s in dict.fromkeys(plan.forks + plan.fork) for f in s._forks]
        encode_and_prefill([s.stream for s in plan.prepare] + forks)
        advanced = decode_step([s.stream for s in plan.decode] + forks)
        if advanced:
            self.steps += 1
            self.batch = len(advanced)
            self.max_batch = max(self.max_batch, self.batch)
