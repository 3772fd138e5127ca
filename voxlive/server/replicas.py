"""``voxlive serve --ray``: the server's own app as a Ray Serve deployment, one engine per replica.

Each replica is a Ray actor that loads the model on its device (``gpus_per_replica``), runs one
engine thread, and serves the same FastAPI app as ``voxlive serve`` (every route and protocol)
behind Ray's HTTP proxy. Routing, autoscaling and the proxy's answer to a lost replica are in
``routing.py``. ``application`` builds the deployment from Python; ``build`` does it from a Serve
config file (``import_path: voxlive.server.replicas:build``, as KubeRay's RayService uses).
"""

from __future__ import annotations

import os
import sys
import time

import ray
from ray import serve
from ray.serve import metrics as serve_metrics
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from .app import create_app
from .engine import Engine
from .metrics import resident_bytes
from .routing import PROXY_CALLBACK, PROXY_CALLBACK_ENV, LeastLoadedRouter, SessionsPolicy

APP_NAME = "voxlive"
# Requests a replica admits past its engine's max_sessions: /health, /metrics and the page stay
# answerable on a full replica, and a session that finds every engine full is refused by one
# (1013, 503) instead of waiting in Ray's queue.
HEADROOM = 8
ROUTING_STATS_SECONDS = 1.0  # how often each replica reports its engine's load to the routers
# On a scale-down or redeploy, a replica's live sessions get this long to end before it is stopped.
DRAIN_SECONDS = 300.0
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
PROXY_READY_SECONDS = "30"  # an environment variable's value


@serve.deployment
@serve.ingress()
class VoxliveReplica:
    """One replica: a model, its engine, and the app around them."""

    def __init__(self, source: str | None, load_options: dict, server_options: dict, max_sessions: int):
        import voxlive

        self.engine = Engine(voxlive.load(source, **load_options), max_sessions=max_sessions)
        self.name = serve.get_replica_context().replica_tag
        self.server_options = server_options
        # Ray's own metrics (its Prometheus export and dashboard), tagged with the replica by Ray:
        # every replica's load in one place, where /metrics answers for one replica at a time.
        self.gauges = {name: serve_metrics.Gauge(name, description=text) for name, text in (
            ("voxlive_sessions", "live sessions"), ("voxlive_lag_seconds", "the worst session's lag"),
            ("voxlive_decode_batch_size", "streams in the last decode step"),
            ("voxlive_resident_memory_bytes", "the replica's resident memory"))}

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, replica=self.name, **self.server_options)

    def record_routing_stats(self) -> dict:
        """Called by Ray every ROUTING_STATS_SECONDS: the routers' figures, and Ray's gauges."""
        load = self.engine.load()
        for name, value in (("voxlive_sessions", load.sessions), ("voxlive_lag_seconds", load.lag),
                            ("voxlive_decode_batch_size", load.batch),
                            ("voxlive_resident_memory_bytes", resident_bytes())):
            if value is not None:
                self.gauges[name].set(value)
        return {"sessions": load.sessions, "max_sessions": load.max_sessions, "lag": load.lag}

    def record_autoscaling_stats(self) -> dict:
        load = self.engine.load()
        return {"sessions": float(load.sessions), "lag": load.lag}

    def check_health(self) -> None:
        if not self.engine.running:
            raise RuntimeError("the engine thread has stopped")


def application(source: str | None, *, model_id: str, load_options: dict | None = None, max_sessions: int = 16,
                replicas: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
                target_sessions: float | None = None, autoscaling: dict | None = None, gpus_per_replica: float = 0,
                cpus_per_replica: float = 1, **server_options):
    """The bound deployment: ``replicas`` fixed, or autoscaled between ``min_replicas`` and
    ``max_replicas`` at ``target_sessions`` per replica (default three quarters of ``max_sessions``;
    ``autoscaling``: more of Ray's ``AutoscalingConfig``, e.g. ``upscale_delay_s``).
    ``server_options``: ``create_app``'s (api_key, delay_ms, max_upload_mb, idle_timeout, send_timeout,
    rut, ...), the same on every replica."""
    scaling = {}
    if min_replicas is not None or max_replicas is not None:
        if replicas is not None:
            raise ValueError("give a number of replicas, or a range to autoscale in, not both")
        target = target_sessions or max(1.0, 0.75 * max_sessions)
        scaling["autoscaling_config"] = AutoscalingConfig(
            **(autoscaling or {}),
            min_replicas=min_replicas if min_replicas is not None else 1,
            max_replicas=max_replicas if max_replicas is not None else max(1, min_replicas or 1),
            policy=AutoscalingPolicy(policy_function=SessionsPolicy, policy_kwargs={"target_sessions": target}))
    else:
        scaling["num_replicas"] = replicas or 1
    deployment = VoxliveReplica.options(
        name="VoxliveReplica",
        max_ongoing_requests=max_sessions + HEADROOM,
        graceful_shutdown_timeout_s=DRAIN_SECONDS,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        request_router_config=RequestRouterConfig(request_router_class=LeastLoadedRouter,
                                                  request_routing_stats_period_s=ROUTING_STATS_SECONDS),
        **scaling)
    return deployment.bind(source, dict(load_options or {}), {"model_id": model_id, **server_options}, max_sessions)


def build(args: dict):
    """Serve's application builder, for config files: ``args`` are ``application``'s keyword
    arguments, plus ``model`` (the checkpoint), the model's load options (``dtype``, ``device``,
    ``quantize``, ``backend``), ``idle_timeout`` and ``send_timeout`` (seconds; 0 or null: never)
    and ``rut``, the sessions' blank-rut policy (``voxlive.rut.RutPolicy``'s fields, e.g.
    ``{after: 100, speech_after: null}``; null: no penalty; absent: the default)."""
    from ..checkpoint import DEFAULT_MODEL
    from ..rut import RutPolicy

    args = dict(args)
    source = args.pop("model", None)
    load_options = {k: args.pop(k) for k in ("backend", "device", "dtype", "quantize", "compile", "drafts")
                    if k in args}
    for name in ("idle_timeout", "send_timeout"):
        if name in args:
            args[name] = args[name] or None
    if "rut" in args and args["rut"] is not None:
        args["rut"] = RutPolicy(**args["rut"]).check()
    return application(source, model_id=args.pop("model_id", source or DEFAULT_MODEL), load_options=load_options,
                       **args)


def connect(address: str | None = None, *, num_cpus: int | None = None, host: str = "127.0.0.1",
            port: int = 8000, dashboard: bool | None = None) -> None:
    """Join the Ray cluster at ``address`` (None: start a local one, with Ray's dashboard unless
    ``dashboard`` is False) and start Serve's proxy on ``host:port``, with the middleware that
    tells clients of a lost replica."""
    # The job's environment reaches the proxies and Serve's controller when this job starts Serve;
    # a cluster where Serve already runs needs the variables set on its nodes (see README). Ray's
    # 5 s for a proxy to answer its readiness check (three tries, then it is killed and the start
    # fails) is too short on a busy machine: a proxy that imports the middleware while other
    # work holds both cores was measured at 14 s.
    env = {PROXY_CALLBACK_ENV: PROXY_CALLBACK, PROXY_READY_ENV: os.environ.get(PROXY_READY_ENV, PROXY_READY_SECONDS)}
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=dashboard, log_to_driver=False,
             runtime_env={"env_vars": env})
    serve.start(http_options={"host": host, "port": port})


def serve_on_ray(source: str | None, *, address: str | None, host: str, port: int, **options) -> None:
    """``voxlive serve --ray``: deploy, then wait until interrupted; the application is deleted
    on the way out (and a local cluster stopped)."""
    connect(address, host=host, port=port)
    started = time.monotonic()
    shown = f"[{host}]" if ":" in host else host
    try:
        serve.run(application(source, **options), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"voxlive: {APP_NAME} on Ray Serve at http://{shown}:{port}/ (ready in "
              f"{time.monotonic() - started:.0f} s); Ctrl-C stops it", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if address is None:
            serve.shutdown()
            ray.shutdown()
