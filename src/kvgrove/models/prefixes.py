"""The pager's sync core: its work with the prefix cache, run on the one MLX thread. No trio.

`PagerCore` builds fresh live caches from the cache's locked prefixes (`restore`), stores what
a step kept (`store`), fits the device tier beside the live caches (`fit`) and writes the cache
to disk when the MLX thread closes (`flush`). Whatever fails in a restore or a store only costs
a later recompute: it is logged, the request's lock is released, and the answer is unchanged.
The pager actor (`kvgrove.actors.pager`) calls it on the MLX thread; a tensor-parallel
follower calls it in step order on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from kvgrove.config import Settings
from kvgrove.memory import snapshots
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


class PagerCore:
    """The prefix cache's operations for one model; every call on the MLX thread.

    `own_caches` gives the sequences' own live caches (`Keep`s) when the thread closes."""

    def __init__(
        self,
        settings: Settings,
        loaded: Any,
        cache: PrefixCache,
        own_caches: Callable[[], Iterable[Keep]],
    ) -> None:
        self.settings = settings
        self.loaded = loaded
        self.cache = cache
        self._own_caches = own_caches

    def restore(self, requests: tuple[RestoreRequest, ...]) -> tuple:
        """A live cache per request holding what could be restored of its promised prefix
        (None where nothing was: the executor recomputes the rest). No lock is left held."""
        out = []
        for r in requests:
            cache = make_cache(self.loaded.model)
            try:
                if r.rematch:
                    self.cache.match(r.request_id, r.namespace, r.tokens[: r.promised + 1])
                restored = min(self.cache.fill(r.request_id, cache), r.promised)
                if restored and cache_tokens(cache) != restored:
                    raise RuntimeError(f"restored {cache_tokens(cache)} tokens, not {restored}")
            except Exception:
                log.exception("restoring %d cached tokens failed; recomputing them", r.promised)
                self.cache.release(r.request_id)  # idempotent: never leave the path locked
                restored = 0
            out.append((r.request_id, cache if restored else None, restored))
        return tuple(out)

    def store(self, keeps: tuple[Keep, ...], live_bytes: int | None) -> tuple[tuple, tuple]:
        """Store `keeps`, then (unless `live_bytes` is None) fit the device tier. Returns
        ((request_id, tokens now cached) per preempted sequence, (tier, bytes) per tier)."""
        kept = []
        # The snapshots of every keep are evaluated together: one wait on the device, where one
        # per sequence cost a 64-row wave on the H200 ~2 ms per sequence stored.
        with snapshots.deferred() as taken:
            for keep in keeps:
                n = self.store_one(keep)
                if keep.preempted:
                    kept.append((keep.request_id, n))
        self.cache.settle(taken)
        if live_bytes is not None:
            self.fit(live_bytes)
        return tuple(kept), tuple(self.cache.tier_bytes().items())

    def store_one(self, keep: Keep) -> int:
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

    def fit(self, live_bytes: int) -> None:
        """The device tier gets its share of the device budget, less whatever live caches took
        beyond theirs (one budget for weights, live caches and cached KV), and fits into it."""
        split = self.settings.device_split(self.loaded.info.nbytes)
        cap = max(0, min(split.prefix_bytes, split.room_bytes - live_bytes))
        if self.cache.budgets.device_bytes != cap:
            self.cache.budgets = attrs.evolve(self.cache.budgets, device_bytes=cap)
        self.cache.rebalance()

    def flush(self) -> None:
        """As the MLX thread closes: keep the sequences' own caches, write the cache to disk."""
        for keep in self._own_caches():
            self.store_one(keep)
        self.cache.flush()

    def summary(self, check: bool) -> dict:
        """The /api/cache body; with `check`, check_integrity()'s report first."""
        out: dict = {"enabled": True}
        if check:
            # A report (what disagreed, what was repaired); a failure of the check itself
            # is reported too, and never leaves the pager.
            try:
                out["integrity"] = self.cache.check_integrity().to_dict()
            except Exception as exc:
                log.exception("prefix cache integrity check failed")
                failed = [f"the check failed: {exc!r}"]
                out["integrity"] = {
                    "clean": False,
                    "problems": failed,
                    "repaired": [],
                    "unrepaired": list(failed),
                }
        return {**out, **self.cache.statistics()}
