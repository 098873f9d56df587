"""The pager actor: owns the prefix cache (a trie per namespace over device / host / disk tiers).

Every operation on the cache moves or reads MLX arrays, so it runs on the executor's one MLX
thread: the pager hands its work to that thread (`MLXThread.call`) and the executor, which
restores and stores sequences' KV between steps, uses the same object there. The thread is the
serialization point; the trio side of the pager only routes messages. It answers:

- `Match` (from the scheduler): lock the longest usable cached prefix, promote it to the device
  tier, reply `Matched` to the scheduler's inbox;
- `Release`: unlock a request's prefix (a request that ended before its first step);
- `CacheQuery` (/api/cache, /metrics);
and on shutdown it writes the cache to disk so it survives a restart.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from kvgrove.actors.messages import (
    CacheQuery,
    Charge,
    Match,
    Matched,
    Release,
    UsePrefixCache,
)
from kvgrove.config import Settings

log = logging.getLogger(__name__)


def build_prefix_cache(settings: Settings, loaded: Any) -> Any:
    """On the MLX thread: a PrefixCache laid out like the model's caches (None if it can't)."""
    from kvgrove.memory.ledger import Budgets
    from kvgrove.memory.prefix_cache import PrefixCache
    from kvgrove.memory.snapshots import NotSnapshotCapable, layout
    from kvgrove.models.caches import make_cache
    from kvgrove.paths import kv_dir

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
    """Other actors hold only `inbox`. `mlx` is the executor's MLX thread (a resource handle)."""

    def __init__(
        self,
        settings: Settings,
        *,
        mlx: Any = None,
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
        self.cache: Any = None  # PrefixCache, touched through self._mlx only

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Build the prefix cache, lend it to the executor, then answer until cancelled."""
        if self.settings.prefix_cache and self._mlx is not None:
            self.cache = await self._mlx.call(build_prefix_cache, self.settings, self._loaded)
        if self.cache is not None and self._executor is not None:
            await self._executor.send(UsePrefixCache(self.cache))
        await self._charge()
        task_status.started()
        try:
            await self._serve()
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
