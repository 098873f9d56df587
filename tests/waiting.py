"""Condition waits with deadlines, for the tests: never a bare sleep standing in for an event."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import trio


async def wait_until(
    condition: Callable[[], Any], *, what: str, seconds: float = 30.0, poll: float = 0.005
) -> Any:
    """Poll `condition()` (sync, or async) until it returns something true and return that;
    fail naming `what` after `seconds`. `poll=0` re-checks at every scheduling point."""
    with trio.move_on_after(seconds):
        while True:
            value = condition()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(poll)
    raise AssertionError(f"waited {seconds} s for {what}")
