"""The prefix cache of one model: a `Tiers` (trie + tiers) per cache namespace, one set of budgets.

Namespaces keep tenants apart: each API key (and `cache_salt`) gets its own trie, so one tenant's
prompts can never be hit by another's. Budgets are global, and so is LRU: every trie stamps last
use from one shared clock, and `rebalance` demotes the least recently used unlocked node of all
namespaces until each tier fits.

Everything here touches MLX arrays, so it runs on the executor's MLX thread only (the pager and
the executor take turns there). No trio.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvgrove.memory.ledger import Budgets
from kvgrove.memory.snapshots import WHOLE
from kvgrove.memory.tiers import Hit, Move, Tiers

log = logging.getLogger(__name__)

TIERS = ("device", "host", "disk")
DEFAULT_NAMESPACE = "default"
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def namespace_dir(namespace: str) -> str:
    """A file-system-safe folder name for a namespace (hashed unless already safe)."""
    if _SAFE.match(namespace):
        return namespace
    return "ns-" + hashlib.sha256(namespace.encode()).hexdigest()[:32]


class PrefixCache:
    """Match, restore, store and page prefixes for every namespace of one model."""

    def __init__(
        self,
        kinds: tuple[str, ...],
        budgets: Budgets,
        *,
        fingerprint: str,
        cache_dir: Path | None,
        fsync: bool = True,
    ) -> None:
        self.kinds = kinds
        self.budgets = budgets
        self.fingerprint = fingerprint
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.fsync = fsync
        self._clock = itertools.count(1).__next__
        self._tiers: dict[str, Tiers] = {}
        self._hits: dict[int, tuple[Tiers, Hit]] = {}
        self.recovered_nodes = 0
        if self.cache_dir is not None and budgets.disk_bytes > 0:
            root = self.cache_dir / fingerprint
            if root.is_dir():
                for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                    tiers = self._tiers_for_dir(folder.name)
                    self.recovered_nodes += tiers.recovered
        self.rebalance()

    @property
    def has_whole_layers(self) -> bool:
        """Some layer (recurrent, sliding window) can only be restored at snapshot ends."""
        return WHOLE in self.kinds

    def _tiers_for_dir(self, folder: str) -> Tiers:
        tiers = self._tiers.get(folder)
        if tiers is None:
            tiers = self._tiers[folder] = Tiers(
                self.kinds,
                self.budgets,
                fingerprint=self.fingerprint,
                namespace=folder,
                cache_dir=self.cache_dir,
                fsync=self.fsync,
                clock=self._clock,
            )
        return tiers

    def tiers(self, namespace: str = DEFAULT_NAMESPACE) -> Tiers:
        return self._tiers_for_dir(namespace_dir(namespace or DEFAULT_NAMESPACE))

    # -- one sequence's life: match (lock) -> restore -> store (unlock) --------------------------

    def match(self, request_id: int, namespace: str, tokens: Sequence[int]) -> int:
        """Lock the longest usable cached prefix of `tokens` for `request_id` and return its
        length (at least one token is left to evaluate). Nothing moves yet: the path is
        promoted when the sequence starts (`restore`), so a queued request holds no device
        memory, and the lock only keeps the path from being dropped meanwhile."""
        self.release(request_id)
        if len(tokens) < 2:
            return 0
        tiers = self.tiers(namespace)
        hit = tiers.lookup(tokens, max_tokens=len(tokens) - 1, promote=False)
        if hit.usable_tokens == 0:
            tiers.release(hit)
            return 0
        self._hits[request_id] = (tiers, hit)
        return hit.usable_tokens

    def restore(self, request_id: int, cache: Sequence[Any]) -> int:
        """Promote and stitch the locked prefix of `request_id` into a fresh live cache, then
        unlock it (the live cache has its own copy) and rebalance. Returns the tokens restored:
        fewer than matched only if a file failed to verify (the caller computes the rest)."""
        held = self._hits.pop(request_id, None)
        if held is None:
            return 0
        tiers, hit = held
        try:
            return tiers.restore_hit(cache, hit)
        finally:
            self.rebalance()

    def store(
        self,
        namespace: str,
        tokens: Sequence[int],
        cache: Sequence[Any],
        *,
        request_id: int | None = None,
    ) -> int:
        """Cache `tokens` (exactly what the live cache holds) as a restore point; release the
        request's lock if it had one; rebalance. Returns how many tokens were new."""
        try:
            new = self.tiers(namespace).insert(tokens, cache, restore_point=True).new_tokens
        finally:
            if request_id is not None:
                self.release(request_id)
        self.rebalance()
        return new

    def release(self, request_id: int) -> None:
        """Unlock the request's matched prefix (idempotent)."""
        held = self._hits.pop(request_id, None)
        if held is not None:
            tiers, hit = held
            tiers.release(hit)

    # -- paging ----------------------------------------------------------------------------

    def tier_bytes(self) -> dict[str, int]:
        return {t: sum(x.tier_bytes(t) for x in self._tiers.values()) for t in TIERS}

    def rebalance(self) -> list[Move]:
        """Demote the globally least recently used unlocked nodes until every tier fits."""
        moves: list[Move] = []
        for tier in TIERS:
            budget = self.budgets.of(tier)
            while sum(x.tier_bytes(tier) for x in self._tiers.values()) > budget:
                oldest = None
                for tiers in self._tiers.values():
                    lru = tiers.trie.lru_nodes(tier)
                    if lru and (oldest is None or lru[0].last_use < oldest[1].last_use):
                        oldest = (tiers, lru[0])
                if oldest is None:
                    break  # only locked nodes are left in this tier
                moves.append(oldest[0].demote(oldest[1]))
        return moves

    def flush(self) -> list[Move]:
        """On graceful shutdown: write unlocked nodes to disk so the cache survives a restart."""
        moves = []
        for tiers in self._tiers.values():
            moves += tiers.flush()
        return moves + self.rebalance()

    # -- views and checks ------------------------------------------------------------------

    def statistics(self) -> dict:
        totals: dict[str, Any] = {
            "namespaces": len(self._tiers),
            "nodes": 0,
            "tokens": 0,
            "locked_requests": len(self._hits),
            "recovered_nodes": self.recovered_nodes,
            "bytes": dict.fromkeys(TIERS, 0),
            "nodes_by_tier": dict.fromkeys(TIERS, 0),
            "budgets_bytes": {t: self.budgets.of(t) for t in TIERS},
            "moved_bytes": {},
            "moved_seconds": {},
        }
        counters = (
            "lookups",
            "lookup_tokens",
            "hit_tokens",
            "inserted_tokens",
            "corrupt_entries",
            "snapshot_seconds",
            "restore_seconds",
        )
        for key in counters:
            totals[key] = 0
        for tiers in self._tiers.values():
            s = tiers.statistics()
            totals["nodes"] += s["nodes"]
            totals["tokens"] += s["tokens"]
            for t in TIERS:
                totals["bytes"][t] += s["bytes"][t]
                totals["nodes_by_tier"][t] += s["nodes_by_tier"][t]
            for key in counters:
                totals[key] += s[key]
            for key in ("moved_bytes", "moved_seconds"):
                for move, n in s[key].items():
                    totals[key][move] = totals[key].get(move, 0) + n
        looked = totals["lookup_tokens"]
        totals["hit_ratio"] = totals["hit_tokens"] / looked if looked else 0.0
        return totals

    def check_integrity(self) -> None:
        for tiers in self._tiers.values():
            tiers.check_integrity()
        for request_id, (_, hit) in self._hits.items():
            assert hit.node.lock_count > 0 or hit.node.is_root, f"request {request_id} unlocked"
