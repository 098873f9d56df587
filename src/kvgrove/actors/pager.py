"""The pager actor: owns the prefix cache (a trie per namespace over device / host / disk tiers).

It is the only code that touches the `PrefixCache`. Every operation on it moves or reads MLX
arrays, so it runs on the one MLX thread, through the narrow handle the pager is given at start
(`kvgrove.actors.mlx_thread.MLXHandle`); the thread is the serialization point, and the trio
side of the pager only routes messages. It answers, on `inbox`:

- `Match` (from the scheduler): lock the longest usable cached prefix, reply `Matched` to the
  scheduler's inbox;
- `Release`: unlock a request's prefix (a request that ended before its first step);
- `CacheQuery` (/api/cache, /metrics);

and, on the channel it gives the executor at start (`UsePager`), on a task of its own so that
a step never waits behind the scheduler's inbox:

- `RestorePrefixes`: fresh live caches holding the locked (or, for a resume, re-matched)
  prefixes, promoted first; `Restored`;
- `StorePrefixes`: store what the step kept, fit the device tier beside the live caches;
  `Stored` (what each tier holds, which the executor charges with the live caches in one go).

When the MLX thread closes it stores the sequences' own caches and writes the cache to disk,
so it survives a restart.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import Any

import trio

from kvgrove.actors.messages import (
    CacheQuery,
    Charge,
    Match,
    Matched,
    Release,
    Restored,
    RestorePrefixes,
    Stored,
    StorePrefixes,
    UsePager,
)
from kvgrove.actors.mlx_thread import MLXHandle
from kvgrove.config import Settings
from kvgrove.memory.prefix_cache import PrefixCache
from kvgrove.models.prefixes import PagerCore, build_prefix_cache

log = logging.getLogger(__name__)

MAX_BATCH = 256  # lookups taken by one call on the MLX thread


def _take_run(queue: collections.deque) -> list[Match | Release]:
    """The matches and releases at the head of `queue` (at most MAX_BATCH), taken off it."""
    run = []
    while queue and len(run) < MAX_BATCH and isinstance(queue[0], Match | Release):
        run.append(queue.popleft())
    return run


def _take_lookups(
    cache: PrefixCache, queue: collections.deque
) -> tuple[list[Match | Release], list[int]]:
    """On the MLX thread: the run at the head of the pager's queue as it stands now (the trio
    thread only appends to it meanwhile), and each Match's cached tokens (0 for a Release)."""
    run = _take_run(queue)
    return run, _lookups(cache, run)


def _lookups(cache: PrefixCache, run: list[Match | Release]) -> list[int]:
    """On the MLX thread: each Match's cached tokens (0 for a Release)."""
    out = []
    for msg in run:
        if isinstance(msg, Release):
            cache.release(msg.request_id)
            out.append(0)
            continue
        try:
            out.append(cache.match(msg.request_id, msg.namespace, msg.tokens))
        except Exception:  # a broken cache entry never fails the request
            log.exception("prefix match failed; computing the prompt in full")
            out.append(0)
    return out


class Pager:
    """Other actors hold only `inbox` (the executor: the channel `UsePager` gives it)."""

    def __init__(
        self,
        settings: Settings,
        *,
        mlx: MLXHandle | None = None,
        loaded: Any = None,
        executor: trio.MemorySendChannel | None = None,
        accountant: trio.MemorySendChannel | None = None,
    ) -> None:
        self.settings = settings
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.pager_inbox_items)
        self._mlx = mlx
        self._loaded = loaded
        self._executor = executor
        self._accountant = accountant
        self.core: PagerCore | None = None  # called on the MLX thread only
        # Messages taken from the inbox, not yet answered: the trio side appends, the MLX
        # thread takes the run of lookups at the head (`_take_lookups`). A few per request at
        # most (its Match, a rematch, a Release), and requests are bounded by admission.
        self._queue: collections.deque[object] = collections.deque()

    @property
    def cache(self) -> PrefixCache | None:
        """The prefix cache (touched on the MLX thread only), None when it is off."""
        return None if self.core is None else self.core.cache

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the prefix cache, tell the executor, then answer until cancelled."""
        if self.settings.prefix_cache and self._mlx is not None:
            cache = await self._mlx.call(build_prefix_cache, self.settings, self._loaded)
            if cache is not None:
                self.core = PagerCore(self.settings, self._loaded, cache, self._mlx.own_caches)
        steps_send, steps = trio.open_memory_channel[object](1)
        # Charged before the executor hears of the pager: from then on the executor alone
        # charges the tiers, replacing these figures (UsePager tells it what they were).
        charged = await self._charge()
        if self.core is not None:
            self._mlx.at_stop(self.core.flush)
            if self._executor is not None:
                await self._executor.send(UsePager(steps_send, charged))
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_executor, steps)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            if self.cache is not None:
                self.cache.close()  # give up the cache folder's lock (the files stay)

    async def _serve(self) -> None:
        """Messages are answered in their order. A run of `Match`/`Release` at the head of the
        queue is one call on the MLX thread, which takes the run as it stands when the call
        starts (`_take_lookups`), so lookups that arrive while the call waits behind a step go
        with it. The thread serves the executor's steps too: a call per message let through a
        few a step (a wave of 64 requests on the H200 was admitted 3 per step), and a call
        that took only what had arrived when it was asked for left a burst's later prompts for
        a call behind the step's store, so they missed the next step."""
        while True:
            try:
                self._queue.append(await self._inbox.receive())
            except trio.EndOfChannel:
                return
            while self._queue:
                head = self._queue[0]
                if isinstance(head, Match | Release):
                    await self._lookups()
                    continue
                self._queue.popleft()
                match head:
                    case CacheQuery(reply=reply, check=check):
                        reply.send_nowait(await self._summary(check))
                    case _:
                        raise AssertionError(f"pager: unexpected message {head!r}")

    async def _lookups(self) -> None:
        """The run of matches and releases at the head of the queue, in their order, in one
        call on the MLX thread, the inbox queued meanwhile; then the `Matched` answers (the
        executor charges the tiers after its next step: the one place that does, so the ledger
        never gets an older figure after a newer one)."""
        if self.cache is None:
            run = _take_run(self._queue)
            cached = [0] * len(run)
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._queue_arrivals)
                run, cached = await self._mlx.call(_take_lookups, self.cache, self._queue)
                nursery.cancel_scope.cancel()
        for msg, n in zip(run, cached, strict=True):
            if isinstance(msg, Match):
                await msg.reply.send(Matched(msg.request_id, n))

    async def _queue_arrivals(self) -> None:
        with contextlib.suppress(trio.EndOfChannel):  # the loop above sees it next
            while True:
                self._queue.append(await self._inbox.receive())

    async def _serve_executor(self, steps: trio.MemoryReceiveChannel) -> None:
        async for msg in steps:
            match msg:
                case RestorePrefixes(requests=requests, reply=reply):
                    reply.send_nowait(Restored(await self._mlx.call(self.core.restore, requests)))
                case StorePrefixes(keeps=keeps, live_bytes=live_bytes, reply=reply):
                    stored = await self._mlx.call(self.core.store, keeps, live_bytes)
                    reply.send_nowait(Stored(*stored))
                case _:
                    raise AssertionError(f"pager: unexpected message {msg!r}")

    async def _summary(self, check: bool) -> dict:
        if self.core is None:
            return {"enabled": False}
        return await self._mlx.call(self.core.summary, check)

    async def _charge(self) -> tuple[tuple[str, int], ...]:
        """Tell the accountant what each tier holds at start (recovered from disk); returns it."""
        if self.cache is None:
            return ()
        tier_bytes = await self._mlx.call(self.cache.tier_bytes)
        if self._accountant is None:
            return ()
        for tier, nbytes in tier_bytes.items():
            await self._accountant.send(Charge(tier, "prefix", nbytes))
        return tuple(tier_bytes.items())
