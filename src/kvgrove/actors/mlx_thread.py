"""The MLX thread: the one resource the actors share, by design.

MLX streams belong to the thread that made them, and trio's thread cache does not promise the
same thread twice, so every MLX call (loading, each step, every prefix-cache copy) goes to one
dedicated OS thread. The executor owns it (it starts and stops it); the pager gets a narrow
handle to it at start (`MLXHandle`): run its copies there, read the sequences' own caches there
when it flushes at shutdown, and have that flush run before the thread stops.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import mlx.core as mx
import trio

from kvgrove import timeline
from kvgrove.models.generate import generation_stream

T = TypeVar("T")


class MLXThread:
    """One OS thread that runs submitted functions in order; results come back into trio."""

    def __init__(self, name: str = "kvgrove-mlx") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._at_stop: list[Callable[[], None]] = []
        self.ident: int | None = None
        # Seconds the thread spent running work (steps, prefix-cache copies), all of it: with
        # the wall time, whether the thread (the device, or the host launching its work) or
        # the rest of the server sets the pace (/metrics).
        self.busy_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        self.ident = threading.get_ident()
        with mx.stream(generation_stream()):  # this thread's own stream, for all its work
            while (work := self._queue.get()) is not None:
                work()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the thread and return its result; shielded (work is never torn)."""
        return await self.submit(fn, *args).result()

    def submit(self, fn: Callable[..., T], *args: Any) -> Queued[T]:
        """Queue fn(*args) on the thread now (from trio); await `.result()` for what it gives.
        Work queued behind a running call starts the moment that call ends, with no trip
        through trio (nor a wait for the GIL) between them."""
        token = trio.lowlevel.current_trio_token()
        queued = Queued[T]()
        rec = timeline.recorder
        at = time.perf_counter()

        def work() -> None:
            start = time.perf_counter()
            try:
                queued.box["value"] = fn(*args)
            except BaseException as e:
                queued.box["error"] = e
            end = time.perf_counter()
            self.busy_seconds += end - start
            if rec is not None:
                label = getattr(fn, "__qualname__", type(fn).__name__)
                rec.add("mlx", start, end=end, queued=at, label=label)
            token.run_sync_soon(queued.finished.set)

        self._queue.put(work)
        return queued

    def at_stop(self, fn: Callable[[], None]) -> None:
        """Run fn on the thread when it closes (before it stops), after earlier ones."""
        self._at_stop.append(fn)

    async def close(self) -> None:
        """Run the at-stop work on the thread, then stop it (even if that work failed)."""
        try:
            hooks, self._at_stop = self._at_stop, []
            for fn in hooks:
                await self.call(fn)
        finally:
            self.stop()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


class Queued(Generic[T]):
    """Work queued on the MLX thread (`MLXThread.submit`)."""

    def __init__(self) -> None:
        self.finished = trio.Event()
        self.box: dict[str, Any] = {}

    async def result(self) -> T:
        """Its result once it ran (or its exception); shielded: work is never torn."""
        with trio.CancelScope(shield=True):
            await self.finished.wait()
        if "error" in self.box:
            raise self.box["error"]
        return self.box["value"]


class MLXHandle:
    """What the pager may do with the MLX thread: run work there (`call`), read the sequences'
    own caches there (`own_caches`, a list of `kvgrove.models.runner.Keep`), and run work when
    the thread closes (`at_stop`). Nothing else of the executor is reachable through it."""

    def __init__(self, thread: MLXThread, own_caches: Callable[[], list[Any]]) -> None:
        self._thread = thread
        self.own_caches = own_caches  # call on the MLX thread only

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._thread.call(fn, *args)

    def at_stop(self, fn: Callable[[], None]) -> None:
        self._thread.at_stop(fn)
