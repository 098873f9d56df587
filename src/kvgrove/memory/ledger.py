"""The byte ledger: who holds how many bytes, by category, against per-tier budgets. No trio here.

Categories: "weights" (the model), "live" (caches of running sequences), and the prefix
cache's tiers "device", "host", "disk". Device usage is weights + live + device-tier snapshots;
host and disk usage are their tier's snapshots. The accountant actor wraps one Ledger and is its
only writer: the others send it `Charge`s (the tiers: one aggregate entry per trie).

Invariants (`check_integrity`): every entry is > 0 and belongs to a known category, and the
running totals equal the sum of the entries. Readers other than the accountant see the ledger
only as `statistics()` snapshots: frozen, as trio's `statistics()` are.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs

TIERS = ("device", "host", "disk")  # the prefix cache's tiers, fastest first: the one definition
CATEGORIES = ("weights", "live", *TIERS)
_DEVICE_CATEGORIES = ("weights", "live", "device")


@attrs.frozen
class Budgets:
    device_bytes: int
    host_bytes: int
    disk_bytes: int

    def of(self, tier: str) -> int:
        return {"device": self.device_bytes, "host": self.host_bytes, "disk": self.disk_bytes}[tier]


@attrs.frozen
class TierBytes:
    """Bytes per prefix-cache tier."""

    device: int
    host: int
    disk: int

    @classmethod
    def of(cls, bytes_of: Callable[[str], int]) -> TierBytes:
        return cls(*(bytes_of(t) for t in TIERS))


@attrs.frozen
class LedgerStats:
    """The ledger at one moment (the ledger's part of /api/memory)."""

    weights_bytes: int
    live_cache_bytes: int
    live_sequences: int
    cached_kv_bytes: TierBytes
    device_used_bytes: int
    budgets_bytes: TierBytes
    headroom_bytes: TierBytes  # negative where a tier is over its budget
    consistent: bool  # check_integrity() held

    @property
    def over_budget_bytes(self) -> TierBytes:
        """Bytes over budget per tier (0 where a tier is within its budget)."""
        return TierBytes.of(lambda t: max(0, -getattr(self.headroom_bytes, t)))


class Ledger:
    """Entries keyed by (category, owner), with running totals per category."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self._entries: dict[tuple[str, str], int] = {}
        self._totals: collections.Counter[str] = collections.Counter()

    # -- entries ---------------------------------------------------------------------------

    def set(self, category: str, owner: str, nbytes: int) -> None:
        """Set (category, owner) to nbytes; 0 removes the entry."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown ledger category {category!r}")
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        old = self._entries.pop((category, owner), 0)
        if nbytes:
            self._entries[(category, owner)] = nbytes
        self._totals[category] += nbytes - old

    def get(self, category: str, owner: str) -> int:
        return self._entries.get((category, owner), 0)

    def total(self, category: str) -> int:
        return self._totals[category]

    def owners(self, category: str) -> list[str]:
        return [o for (c, o) in self._entries if c == category]

    # -- usage against budgets -------------------------------------------------------------

    @property
    def device_bytes(self) -> int:
        return sum(self._totals[c] for c in _DEVICE_CATEGORIES)

    def used(self, tier: str) -> int:
        return self.device_bytes if tier == "device" else self._totals[tier]

    def headroom(self, tier: str) -> int:
        """Bytes left under `tier`'s budget (negative when over)."""
        return self.budgets.of(tier) - self.used(tier)

    # -- checks and views ------------------------------------------------------------------

    def check_integrity(self) -> None:
        assert self._consistent(), f"ledger totals {dict(self._totals)} != its entries"

    def _consistent(self) -> bool:
        totals: collections.Counter[str] = collections.Counter()
        for (category, _), n in self._entries.items():
            if category not in CATEGORIES or n <= 0:  # zero entries are removed
                return False
            totals[category] += n
        return all(totals[c] == self._totals[c] for c in CATEGORIES)

    def statistics(self) -> LedgerStats:
        return LedgerStats(
            weights_bytes=self._totals["weights"],
            live_cache_bytes=self._totals["live"],
            live_sequences=len(self.owners("live")),
            cached_kv_bytes=TierBytes.of(self.total),
            device_used_bytes=self.device_bytes,
            budgets_bytes=TierBytes.of(self.budgets.of),
            headroom_bytes=TierBytes.of(self.headroom),
            consistent=self._consistent(),
        )
