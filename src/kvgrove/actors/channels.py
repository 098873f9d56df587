"""Two small ways actors use each other's inboxes: ask for one reply, and send without blocking."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio


async def ask(inbox: trio.MemorySendChannel, make: Callable[[Any], Any]) -> Any:
    """Send make(reply_channel) to an actor and wait for its one reply."""
    send, recv = trio.open_memory_channel[Any](1)
    with send, recv:
        await inbox.send(make(send))
        return await recv.receive()


def sender(channel: trio.MemorySendChannel, make: Callable[..., Any]) -> Callable[..., bool]:
    """A function that sends make(*args) with send_nowait and says whether the channel took it
    (False: it is full)."""

    def send(*args: Any) -> bool:
        try:
            channel.send_nowait(make(*args))
        except trio.WouldBlock:
            return False
        return True

    return send
