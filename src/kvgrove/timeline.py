"""An opt-in timeline of the server's work, for finding where a wave's time goes.

`kvgrove serve --timeline-file PATH` (KVGROVE_TIMELINE_FILE) turns it on: the MLX thread's
calls, the runner's steps (when each phase was launched, how long it waited for the device),
the executor's rounds with the pager, the scheduler's admissions and Python's garbage
collections (any thread's: a collection stops them all) are recorded in memory
(the newest `LIMIT` events) and written to PATH as JSON lines when the server stops.
`benchmarks/timeline.py` reads it. Off, it costs one global read per event site.
"""

from __future__ import annotations

import collections
import gc
import json
import time
from typing import Any

LIMIT = 500_000

# The process's recorder while one is on (set by `start`), else None.
recorder: Timeline | None = None


class Timeline:
    def __init__(self, limit: int = LIMIT) -> None:
        self.events: collections.deque[tuple[str, float, dict[str, Any]]] = collections.deque(
            maxlen=limit
        )

    def add(self, kind: str, at: float | None = None, **fields: Any) -> None:
        """An event at `at` (time.perf_counter(); now if None)."""
        self.events.append((kind, time.perf_counter() if at is None else at, fields))

    def write(self, path: str) -> int:
        events = list(self.events)
        with open(path, "w", encoding="utf-8") as f:
            for kind, at, fields in events:
                f.write(json.dumps({"kind": kind, "at": at, **fields}) + "\n")
        return len(events)


_gc_started: float | None = None


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    elif (rec := recorder) is not None and _gc_started is not None:
        rec.add(
            "gc",
            _gc_started,
            end=time.perf_counter(),
            generation=info["generation"],
            collected=info["collected"],
        )


def start() -> Timeline:
    global recorder
    recorder = Timeline()
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
    return recorder


def stop(path: str | None) -> int:
    """Write what was recorded to `path` (if given) and turn recording off."""
    global recorder
    rec, recorder = recorder, None
    if _on_gc in gc.callbacks:
        gc.callbacks.remove(_on_gc)
    if rec is None or path is None:
        return 0
    return rec.write(path)
