"""The one thread on which all MLX work of the process runs.

MLX streams belong to the thread that created them: an array built on one thread and evaluated on
another fails with "There is no Stream(gpu, N) in current thread". A server calls the runtime from
a pool of threads, so every runtime method hands its work to this single thread and waits for it.
It is one per process, not one per runtime, because the device (and its streams) is one per
process; calls from the MLX thread itself run directly.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor


class MLXThread:
    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="voxlive-mlx")
        self._ident = self._pool.submit(threading.get_ident).result()

    def run(self, fn, *args, **kwargs):
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()


_lock = threading.Lock()
_thread: MLXThread | None = None


def mlx_thread() -> MLXThread:
    """The process's MLX thread, started on first use."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = MLXThread()
        return _thread


def on_mlx_thread(method):
    """Run a runtime method on the MLX thread, inside the runtime's device stream."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        def call():
            import mlx.core as mx

            with mx.stream(self.device):
                return method(self, *args, **kwargs)

        return mlx_thread().run(call)

    return wrapper
