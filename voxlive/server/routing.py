"""How Ray Serve spreads voxlive sessions over replicas, scales them, and tells clients of a lost one.

Three pieces, each run by Ray in its own process (so this module imports Ray, and nothing of the
engine):

- ``LeastLoadedRouter`` (in every Ray proxy): a new connection or upload goes to the least loaded
  replica. Replicas are tried in order: not full and keeping up, then not full but behind (their
  worst lag past ``BEHIND_SECONDS``), then full ones, fewest sessions first in each; capacity and
  lag are what each engine reports every second (``record_routing_stats``). A WebSocket stays on
  the replica that accepted it for its life (Ray proxies the connection to that one replica).
  When every replica is full, the first one takes the session and its engine refuses it with the
  usual 1013 (an upload: 503), where Ray would otherwise hold it in its queue (``HEADROOM``).
- ``SessionsPolicy`` (in the Serve controller): replicas for the sessions there are, from the
  same engine figures (``record_autoscaling_stats``).
- ``ReplicaLostMiddleware`` (in every Ray proxy): when a replica dies, Ray ends the proxied
  request without a word; the middleware closes the client's WebSocket with 1011 and a reason
  (or answers an upload with a 503), so that clients know at once, instead of a dropped TCP
  connection. Ray loads it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (see ``PROXY_CALLBACK``).

How a session's slot is counted, and why there. Ray routes a request in two steps on the
router's event loop: ``choose_replicas`` ranks the replicas and Ray takes the first one under its
``max_ongoing_requests``; only when the request's coroutine next runs does Ray send it and count it
in its queue-length cache, and each acceptance then overwrites that count with the replica's own
figure, which misses the requests still on their way to it. Sessions arriving together were
ranked on counts that did not have the others yet: at full capacity, two took one replica's last
slot, and its engine refused one while another replica had room. So the router keeps its own
count (``_placed``): a request holds a slot from the moment it is ranked (on the first-ranked
replica, moved to the one Ray sent it to once that one has accepted it) until it ends, and a
replica's sessions are the larger of that count and Ray's (the replica's own figure, all proxies'
requests in it; the engine's report when Ray has no fresh one). Ranking has no await in it, so no
other placement runs between a count and its reservation: one proxy's sessions fill every slot
before any is refused. A slot held for a request Ray never sent (cancelled while it was placed)
is given back after ``PLACING_SECONDS``.

A retry after the engine's refusal could not do this. The engine opens a session after the
WebSocket handshake, on the protocol's own message (a WLK connection at once, the others at the
first audio, vLLM's once per utterance), so a refusal comes after the client has talked to that
replica, and replaying it elsewhere would replay the protocol; an upload would have to be held in
the proxy to be sent again. What the reservation leaves: with several proxies (one per node), each
knows the others' placements only from the replicas' figures, so two sessions arriving through
two proxies at once can still meet on one last slot; the later is refused (1013, 503) and its
client retries.
"""

from __future__ import annotations

import json
import math
import random
import time

from ray.serve.request_router import RequestRouter

PROXY_CALLBACK = "voxlive.server.routing:proxy_middlewares"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
BEHIND_SECONDS = 2.0  # a replica whose worst session lags more than this is behind
CLOSE_INTERNAL = 1011
LOST_REASON = "replica lost: reconnect"
# A slot reserved at ranking for a request no replica has accepted in this long is given back (Ray
# sends within milliseconds, or after a probe of a replica it has no fresh count of); Ray's own
# count has the request by then, if it was sent.
PLACING_SECONDS = 10.0


def routing_key(stats: dict, in_flight: int | None, placed: int = 0) -> tuple:
    """The order replicas are tried in (smallest first), from a replica's reported engine load
    (``stats``: sessions, max_sessions, lag; empty before its first report), Ray's count of the
    requests in flight to it (None: no fresh count) and this router's (``placed``: the requests it
    ranked this replica first for, or that it accepted, and that have not ended). The report's
    sessions may be a second old: a burst of sessions ending and others starting must not see the
    replicas full."""
    sessions = max(placed, in_flight if in_flight is not None else int(stats.get("sessions", 0)))
    limit = stats.get("max_sessions")
    lag = float(stats.get("lag", 0.0))
    return (limit is not None and sessions >= limit, lag > BEHIND_SECONDS, sessions, lag)


def desired_replicas(sessions: list[float], lags: list[float], current: int, *, target_sessions: float) -> float:
    """Replicas for ``sessions`` live sessions (each replica's mean over the look-back window) at
    ``target_sessions`` each; one more than now while the replicas are behind on average."""
    wanted = sum(sessions) / target_sessions
    if lags and sum(lags) / len(lags) > BEHIND_SECONDS:
        wanted = max(wanted, current + 1)
    return wanted


class SessionsPolicy:
    """A Ray Serve autoscaling policy (``AutoscalingPolicy(policy_function=SessionsPolicy,
    policy_kwargs=...)``): Ray applies min/max replicas, the delays and the scaling factors."""

    def __init__(self, target_sessions: float):
        self.target_sessions = target_sessions

    def __call__(self, ctx) -> tuple[float, dict]:
        metrics = ctx.aggregated_metrics or {}
        sessions = list(metrics.get("sessions", {}).values())
        lags = list(metrics.get("lag", {}).values())
        if not sessions:  # no report yet: keep what there is
            return ctx.target_num_replicas, ctx.policy_state
        wanted = desired_replicas(sessions, lags, ctx.current_num_replicas, target_sessions=self.target_sessions)
        return math.ceil(wanted), ctx.policy_state


class LeastLoadedRouter(RequestRouter):
    """Ray Serve's request router for voxlive replicas (``RequestRouterConfig(request_router_class=...)``);
    the module's docstring says how it counts."""

    def initialize_state(self, **kwargs):
        # request id -> [its replica, when it was ranked (None once that replica accepted it)]
        self._placed: dict[str, list] = {}

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        # Each rank is one replica: Ray tries them in this order, skipping any it sees at its
        # max_ongoing_requests (HEADROOM past the engine's limit: the first one, nearly always).
        now = time.monotonic()
        for key, (_, ranked_at) in list(self._placed.items()):
            if ranked_at is not None and now - ranked_at > PLACING_SECONDS:
                del self._placed[key]
        placed: dict = {}
        for key, (replica_id, _) in self._placed.items():
            if pending_request is None or key != pending_request.metadata.internal_request_id:  # a retry: anew
                placed[replica_id] = placed.get(replica_id, 0) + 1
        cache = self.replica_queue_len_cache
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))  # ties go anywhere
        ranked = sorted(shuffled, key=lambda r: routing_key(r.routing_stats or {}, cache.get(r.replica_id),
                                                            placed.get(r.replica_id, 0)))
        if pending_request is not None and ranked:
            self._placed[pending_request.metadata.internal_request_id] = [ranked[0].replica_id, now]
        return [[r] for r in ranked]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        # accepted: its slot is where Ray sent it until it ends. A request already ended (a short
        # one's end can be told first) or given back is not placed again.
        placed = self._placed.get(pending_request.metadata.internal_request_id)
        if placed is not None:
            placed[:] = [replica_id, None]

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        self._placed.pop(internal_request_id, None)


class ReplicaLostMiddleware:
    """ASGI middleware for a Ray proxy: a request whose replica died ends with a clear error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("websocket", "http"):
            return await self.app(scope, receive, send)
        state = {"accepted": False, "over": False}

        async def watched_send(message):
            kind = message["type"]
            if kind in ("websocket.accept", "http.response.start"):
                state["accepted"] = True
            elif kind in ("websocket.close", "websocket.http.response.start"):
                state["over"] = True
            elif kind == "http.response.body" and not message.get("more_body", False):
                state["over"] = True
            await send(message)

        async def watched_receive():
            message = await receive()
            if message["type"] in ("websocket.disconnect", "http.disconnect"):
                state["over"] = True  # the client left: nobody to tell
            return message

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if not state["over"]:
                await self._tell(scope, send, state["accepted"])

    @staticmethod
    async def _tell(scope, send, accepted: bool) -> None:
        try:
            if scope["type"] == "websocket":  # before the handshake, this close refuses it (HTTP 403)
                await send({"type": "websocket.close", "code": CLOSE_INTERNAL, "reason": LOST_REASON})
            elif not accepted:
                body = json.dumps({"error": {"message": "the replica serving this request was lost: retry it",
                                             "type": "server_error", "param": None, "code": "replica_lost"}})
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
                await send({"type": "http.response.body", "body": body.encode()})
        except Exception:  # noqa: BLE001 - the client's connection is gone as well
            pass


def proxy_middlewares() -> list:
    """What Ray's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``) for its middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostMiddleware)]
