"""The engine's policy, as a pure function: the sessions' public state -> one step's plan.

The engine loop is schedule -> execute -> publish (as in vLLM's ``EngineCore.step``). This module
is the first part and nothing else: it reads a :class:`SessionView` per session (plain values,
no locks, no tensors) and says what the step does with each. It never touches a stream, so every
decision (joins, leaves, lagging streams, ends) is tested without threads or a model.

How much audio a stream takes is a trade-off between latency and encoder efficiency. A stream
that keeps up (undecoded backlog at most ``refill_below_tokens``) takes whatever has arrived, up
to ``max_backlog_tokens`` of backlog, so a live word is encoded as soon as its audio is in. A
stream that lags (an upload, or more streams than the machine serves in real time) takes nothing
until it has drained to that mark and is then topped up in one go: the encoder runs on many tokens
per pass (compute-bound GEMMs) instead of reading its weights once per 80 ms token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable


@dataclass(frozen=True)
class SessionView:
    """One session at the start of a step, as the scheduler sees it."""

    key: Hashable  # whatever identifies the session to the executor
    started: bool = False  # its stream exists
    closed: bool = False  # nobody is listening any more
    done: bool = False  # its last update (transcript or error) is out
    inbox: int = 0  # samples received and not yet handed to the stream
    ending: bool = False  # the client said no more audio will come
    audio_ended: bool = False  # the stream's right pad is queued
    backlog: int = 0  # audio tokens in the stream (whole, encoded or not) not yet decoded
    can_prepare: bool = False  # audio tokens to encode or prompt positions to run
    can_decode: bool = False  # a decode position whose audio is encoded


@dataclass(frozen=True)
class Policy:
    samples_per_token: int
    max_backlog_tokens: int
    refill_below_tokens: int


@dataclass
class Plan:
    """What one step does; every list holds session keys, in the order the sessions were given."""

    start: list = field(default_factory=list)  # create the stream
    drop: list = field(default_factory=list)  # closed: forget the session
    ingest: dict = field(default_factory=dict)  # key -> samples to move from the inbox to the stream
    end_audio: list = field(default_factory=list)  # queue the right pad (after this step's ingest)
    prepare: list = field(default_factory=list)  # encode (one batched pass) and run prompt positions
    decode: list = field(default_factory=list)  # one batched decode step
    complete: list = field(default_factory=list)  # decoded to the end: deliver the transcript

    def __bool__(self) -> bool:
        return any((self.start, self.drop, self.ingest, self.end_audio, self.prepare, self.decode, self.complete))


def intake(view: SessionView, policy: Policy) -> int:
    """Samples to move from the session's inbox into its stream this step."""
    if view.backlog > policy.refill_below_tokens:
        return 0  # lagging: let it drain, then top it up in one go
    room = (policy.max_backlog_tokens - view.backlog) * policy.samples_per_token
    return min(view.inbox, max(0, room))


def schedule(views: list[SessionView], policy: Policy) -> Plan:
    """The plan of one step. An empty plan means there is nothing to do until a session changes.

    Decoding takes the streams that can decode at the start of the step; audio encoded during the
    step is decoded by the next one, so a plan never depends on what the encoder will produce.
    """
    plan = Plan()
    for v in views:
        if v.closed:
            plan.drop.append(v.key)
            continue
        if v.done:
            continue
        if not v.started:
            plan.start.append(v.key)
        take = intake(v, policy)
        if take:
            plan.ingest[v.key] = take
        ends = v.ending and not v.audio_ended and take == v.inbox
        if ends:
            plan.end_audio.append(v.key)
        if take or ends or v.can_prepare:
            plan.prepare.append(v.key)
        if v.can_decode:
            plan.decode.append(v.key)
        elif v.audio_ended and not v.can_prepare:
            plan.complete.append(v.key)
    return plan
