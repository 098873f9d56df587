"""The byte ledger: who holds how many bytes, by category, against per-tier budgets. No trio here.

Categories: "weights" (the model), "live" (caches of running sequences), and the prefix
cache's tiers "device", "host", "disk". Device usage is weights + live + device-tier snapshots;
host and disk usage are their tier's snapshots. The accountant actor wraps one Ledger and is its
only writer: the others send it `Charge`s (the tiers: one aggregate entry per trie).

Invariants (`check_integrity`): every entry is > 0 and belongs to a known category, and the
running totals equal the sum of the entries.
"""

from __future__ import annotations

import collections

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

    def over_budget(self) -> dict[str, int]:
        """Bytes over budget per tier (only tiers that are over)."""
        return {t: -self.headroom(t) for t in TIERS if self.headroom(t) < 0}

    # -- checks and views ------------------------------------------------------------------

    def check_integrity(self) -> None:
        totals: collections.Counter[str] = collections.Counter()
        for (category, _), n in self._entries.items():
            assert category in CATEGORIES, category
            assert n > 0, "zero entries are removed"
            totals[category] += n
        for category in CATEGORIES:
            assert totals[category] == self._totals[category], category

    def totals(self) -> dict[str, int]:
        return {c: self._totals[c] for c in CATEGORIES}

    def snapshot(self) -> dict:
        """The ledger as /api/memory shows it."""
        return {
            "weights_bytes": self._totals["weights"],
            "live_cache_bytes": self._totals["live"],
            "live_sequences": len(self.owners("live")),
            "cached_kv_bytes": {t: self._totals[t] for t in TIERS},
            "device_used_bytes": self.device_bytes,
            "budgets_bytes": {t: self.budgets.of(t) for t in TIERS},
            "headroom_bytes": {t: self.headroom(t) for t in TIERS},
            "over_budget_bytes": self.over_budget(),
        }
