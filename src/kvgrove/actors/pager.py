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

import logging
from typing import Any

import attrs
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
from kvgrove.memory.ledger import Budgets
from kvgrove.memory.prefix_cache import PrefixCache
from kvgrove.memory.snapshots import NotSnapshotCapable, layout
from kvgrove.models.caches import cache_tokens, make_cache
from kvgrove.models.runner import Keep, RestoreRequest
from kvgrove.paths import kv_dir

log = logging.getLogger(__name__)


def build_prefix_cache(settings: Settings, loaded: Any) -> PrefixCache | None:
    """On the MLX thread: a PrefixCache laid out like the model's caches (None if it can't)."""
    try:
        kinds = layout(make_cache(loaded.model))
    except NotSnapshotCapable as exc:
        log.warning("prefix cache off: %s", exc)
        return None
    weights = loaded.info.nbytes
    budgets = Budgets(
        device_bytes=settings.prefix_device_budget_bytes(weights),
        host_bytes=settings.host_budget_bytes,
        disk_bytes=settings.disk_budget_bytes,
    )
    folder = settings.kv_cache_dir or kv_dir()
    cache = PrefixCache(kinds, budgets, fingerprint=loaded.info.fingerprint, cache_dir=folder)
    if cache.recovered_nodes:
        log.info("prefix cache: recovered %d nodes from %s", cache.recovered_nodes, folder)
    return cache


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
        self.cache: PrefixCache | None = None  # touched on the MLX thread only

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the prefix cache, tell the executor, then answer until cancelled."""
        if self.settings.prefix_cache and self._mlx is not None:
            self.cache = await self._mlx.call(build_prefix_cache, self.settings, self._loaded)
        steps_send, steps = trio.open_memory_channel[object](1)
        if self.cache is not None:
            self._mlx.at_stop(self._flush)
            if self._executor is not None:
                await self._executor.send(UsePager(steps_send))
        await self._charge()
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
        async for msg in self._inbox:
            match msg:
                case Match(request_id=rid, namespace=ns, tokens=tokens, reply=reply):
                    cached = 0
                    if self.cache is not None:
                        try:
                            cached = await self._mlx.call(self.cache.match, rid, ns, tokens)
                        except Exception:  # a broken cache entry never fails the request
                            log.exception("prefix match failed; computing the prompt in full")
                    # The executor charges the tiers after its next step (the one place that
                    # does, so the ledger never gets an older figure after a newer one).
                    await reply.send(Matched(rid, cached))
                case Release(request_id=rid):
                    if self.cache is not None:
                        await self._mlx.call(self.cache.release, rid)
                case CacheQuery(reply=reply, check=check):
                    reply.send_nowait(await self._summary(check))
                case _:
                    raise AssertionError(f"pager: unexpected message {msg!r}")

    async def _serve_executor(self, steps: trio.MemoryReceiveChannel) -> None:
        async for msg in steps:
            match msg:
                case RestorePrefixes(requests=requests, reply=reply):
                    reply.send_nowait(Restored(await self._mlx.call(self._restore, requests)))
                case StorePrefixes(keeps=keeps, live_bytes=live_bytes, reply=reply):
                    reply.send_nowait(await self._mlx.call(self._store, keeps, live_bytes))
                case _:
                    raise AssertionError(f"pager: unexpected message {msg!r}")

    # -- on the MLX thread ----------------------------------------------------------------

    def _restore(self, requests: tuple[RestoreRequest, ...]) -> tuple:
        """A live cache per request holding what could be restored of its promised prefix
        (None where nothing was: the executor recomputes the rest). No lock is left held."""
        out = []
        for r in requests:
            cache = make_cache(self._loaded.model)
            try:
                if r.rematch:
                    self.cache.match(r.request_id, r.namespace, r.tokens[: r.promised + 1])
                restored = min(self.cache.restore(r.request_id, cache), r.promised)
                if restored and cache_tokens(cache) != restored:
                    raise RuntimeError(f"restored {cache_tokens(cache)} tokens, not {restored}")
            except Exception:
                log.exception("restoring %d cached tokens failed; recomputing them", r.promised)
                self.cache.release(r.request_id)  # idempotent: never leave the path locked
                restored = 0
            out.append((r.request_id, cache if restored else None, restored))
        return tuple(out)

    def _store(self, keeps: tuple[Keep, ...], live_bytes: int | None) -> Stored:
        kept = []
        for keep in keeps:
            n = self._store_one(keep)
            if keep.preempted:
                kept.append((keep.request_id, n))
        if live_bytes is not None:
            self._fit(live_bytes)
        return Stored(tuple(kept), tuple(self.cache.tier_bytes().items()))

    def _store_one(self, keep: Keep) -> int:
        """Keep what `keep.cache` holds (and unlock the request's prefix). Returns the tokens
        now cached (0 if none or the store failed): a failure only costs a later recompute."""
        n = len(keep.tokens) if keep.cache is not None else 0
        try:
            if n > 0:
                self.cache.store(
                    keep.namespace, keep.tokens, keep.cache, request_id=keep.request_id
                )
            elif keep.request_id is not None:
                self.cache.release(keep.request_id)
        except Exception:
            log.exception("storing %d tokens in the prefix cache failed", n)
            if keep.request_id is not None:
                self.cache.release(keep.request_id)
            return 0
        return n

    def _fit(self, live_bytes: int) -> None:
        """The device tier gets its share of the device budget, less whatever live caches took
        beyond theirs (one budget for weights, live caches and cached KV), and fits into it."""
        split = self.settings.device_split(self._loaded.info.nbytes)
        cap = max(0, min(split.prefix_bytes, split.room_bytes - live_bytes))
        if self.cache.budgets.device_bytes != cap:
            self.cache.budgets = attrs.evolve(self.cache.budgets, device_bytes=cap)
        self.cache.rebalance()

    def _flush(self) -> None:
        """As the MLX thread closes: keep the sequences' own caches, write the cache to disk."""
        for keep in self._mlx.own_caches():
            self._store_one(keep)
        self.cache.flush()

    # -- views ----------------------------------------------------------------------------

    async def _summary(self, check: bool) -> dict:
        if self.cache is None:
            return {"enabled": False}

        def summarize() -> dict:
            out: dict = {"enabled": True}
            if check:
                # A report (what disagreed, what was repaired); a failure of the check itself
                # is reported too, and never leaves the pager.
                try:
                    out["integrity"] = self.cache.check_integrity().to_dict()
                except Exception as exc:
                    log.exception("prefix cache integrity check failed")
                    out["integrity"] = {
                        "clean": False,
                        "problems": [f"the check failed: {exc!r}"],
                        "repaired": [],
                        "unrepaired": [f"the check failed: {exc!r}"],
                    }
            return {**out, **self.cache.statistics()}

        return await self._mlx.call(summarize)

    async def _charge(self) -> None:
        """Tell the accountant what each tier holds at start (recovered from disk)."""
        if self.cache is None:
            return
        tier_bytes = await self._mlx.call(self.cache.tier_bytes)
        if self._accountant is not None:
            for tier, nbytes in tier_bytes.items():
                await self._accountant.send(Charge(tier, "prefix", nbytes))
