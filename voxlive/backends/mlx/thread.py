"""The one thread on which all MLX work of the process runs.

MLX streams belong to the thread that created them: an array built on one thread and evaluated on
another fails with "There is no Stream(gpu, N) in current thread". A server calls the runtime from
a pool of threads, so every runtime method hands its work to this single thread and waits for it.
It is one per process, not one per runtime, because the device (and its streams) is one per
process; calls from the MLX thread itself run directly. It is a daemon thread that never exits:
a thread that has used MLX and exits at interpreter shutdown (as a ThreadPoolExecutor's worker
does) aborts the process about one time in two ("terminate called without an active exception").
"""

from __future__ import annotations

import functools
import queue
import threading
from concurrent.futures import Future


class MLXThread:
    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="voxlive-mlx", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            future, fn, args, kwargs = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller, raised in its thread
                    future.set_exception(e)

    def run(self, fn, *args, **kwargs):
        """Call ``fn`` on the MLX thread and return its result (or raise its exception) here."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future.result()


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
