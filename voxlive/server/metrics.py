"""``/metrics``: an engine's load and the process's memory in the Prometheus text format (0.0.4).

Each server process (a plain ``voxlive serve``, or one Ray replica) answers for itself; a
``replica`` label, when set, tells replicas apart once a scraper has merged them.
"""

from __future__ import annotations

import os
import resource
import sys

from .engine import Load

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def resident_bytes() -> int | None:
    """The process's resident set now (Linux); None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_resident_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(load: Load, *, replica: str | None = None) -> str:
    labels = f'{{replica="{_label(replica)}"}}' if replica else ""
    rows = [
        ("voxlive_sessions", "gauge", "live sessions (streams and uploads)", load.sessions),
        ("voxlive_max_sessions", "gauge", "sessions this engine admits", load.max_sessions),
        ("voxlive_lag_seconds", "gauge", "the worst session's received audio not yet transcribed", load.lag),
        ("voxlive_decode_steps_total", "counter", "batched decode steps run", load.steps),
        ("voxlive_step_seconds_total", "counter",
         "model time of all engine steps (divide its rate by the steps' rate for the mean step)", load.step_seconds),
        ("voxlive_decode_batch_size", "gauge", "streams in the last decode step", load.batch),
        ("voxlive_decode_batch_size_max", "gauge", "the largest decode batch so far", load.max_batch),
        ("voxlive_blank_ruts_total", "counter", "blank ruts the pad penalty broke, all sessions together", load.ruts),
        ("process_resident_memory_bytes", "gauge", "resident memory", resident_bytes()),
        ("voxlive_peak_resident_memory_bytes", "gauge", "the most resident memory so far", peak_resident_bytes()),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        if value is None:
            continue
        shown = repr(float(value)) if isinstance(value, float) else str(value)
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {shown}"]
    return "\n".join(lines) + "\n"
