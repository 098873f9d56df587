"""A deadline on the sections that wait on other ranks (sync, threads only, no MLX).

A collective whose peer has died fails (the ring reports the lost connection), but one whose
peer is hung or stopped (SIGSTOP, a wedged GPU, a dead network with no reset) just waits, on
the MLX thread, forever. `Watchdog.guard(what)` times such a section from a thread of its own:
past `timeout` seconds it calls `on_timeout(what, seconds)` once, from that thread, and stays
fired (the ranks are out of step for good). Sections nest; only the outermost is timed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class Watchdog:
    def __init__(self, timeout: float, on_timeout: Callable[[str, float], None]) -> None:
        self.timeout = timeout
        self._on_timeout = on_timeout
        self._cond = threading.Condition()
        self._depth = 0
        self._armed: tuple[float, str] | None = None  # (started, what)
        self._closed = False
        self.fired: str | None = None  # what timed out
        self._thread = threading.Thread(target=self._loop, name="kvgrove-tp-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        with self._cond:
            self._depth += 1
            if self._depth == 1:
                self._armed = (time.monotonic(), what)
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._armed = None
                    self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._armed is None:
                    self._cond.wait()
                    continue
                started, what = self._armed
                left = started + self.timeout - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self.fired = what
                break
            else:
                return
        self._on_timeout(what, time.monotonic() - started)
