"""Talking to running actors from a test: one query, one greedy request; every wait bounded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from kvgrove.actors.messages import Done, Failed, Submit, Token
from kvgrove.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
DEADLINE_SECONDS = 60


async def ask(inbox: Any, make: Any) -> Any:
    """Send make(reply_channel) to an actor's inbox and return its one reply."""
    send, recv = trio.open_memory_channel(1)
    with trio.fail_after(DEADLINE_SECONDS):
        await inbox.send(make(send))
        return await recv.receive()


async def run(scheduler: Any, rid: int, prompt: Any, n: int, *, namespace: str = "") -> Any:
    """Submit a greedy request of `n` tokens; return (its tokens, its Done)."""
    send, recv = trio.open_memory_channel(64)
    submit = Submit(rid, tuple(prompt), GREEDY, n, 400, frozenset(), send, namespace=namespace)
    out = []
    with trio.fail_after(DEADLINE_SECONDS):
        await scheduler.inbox.send(submit)
        async for msg in recv:
            out.append(msg)
            if isinstance(msg, Done | Failed):
                break
    assert isinstance(out[-1], Done), out[-1]
    return [m.token for m in out if isinstance(m, Token)], out[-1]


async def gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run the calls concurrently; return their results in the calls' order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, call: Callable[[], Awaitable[Any]]) -> None:
        results[i] = await call()

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return results


def drain(channel: Any) -> list[Any]:
    """Every message queued on a receive channel now, without waiting."""
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except trio.WouldBlock:
            return out
