"""The byte ledger: who holds how many bytes, by category, against per-tier budgets. No trio here.

Categories: "weights" (the model), "live" (caches of running sequences), "reserved" (bytes
promised to admitted work), and the prefix cache's tiers "device", "host", "disk". Device
usage is weights + live + reserved + device-tier snapshots.
"""

from __future__ import annotations

import collections

import attrs

CATEGORIES = ("weights", "live", "reserved", "device", "host", "disk")


@attrs.frozen
class Budgets:
    device_bytes: int
    host_bytes: int
    disk_bytes: int


class Ledger:
    """Entries keyed by (category, owner). Invariant: totals equal the sum of entries, all >= 0."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self._entries: dict[tuple[str, str], int] = {}
        self._totals: collections.Counter[str] = collections.Counter()

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

    def total(self, category: str) -> int:
        return self._totals[category]

    def owners(self, category: str) -> list[str]:
        return [o for (c, o) in self._entries if c == category]

    @property
    def device_bytes(self) -> int:
        return sum(self._totals[c] for c in ("weights", "live", "reserved", "device"))

    def over_budget(self) -> dict[str, int]:
        """Bytes over budget per tier (only tiers that are over)."""
        used = {
            "device": self.device_bytes,
            "host": self._totals["host"],
            "disk": self._totals["disk"],
        }
        limits = {
            "device": self.budgets.device_bytes,
            "host": self.budgets.host_bytes,
            "disk": self.budgets.disk_bytes,
        }
        return {t: used[t] - limits[t] for t in used if used[t] > limits[t]}

    def check_integrity(self) -> None:
        totals: collections.Counter[str] = collections.Counter()
        for (category, _), n in self._entries.items():
            assert n > 0, "zero entries are removed"
            totals[category] += n
        for category in CATEGORIES:
            assert totals[category] == self._totals[category], category

    def snapshot(self) -> dict:
        """The ledger as /api/memory shows it."""
        return {
            "weights_bytes": self._totals["weights"],
            "live_cache_bytes": self._totals["live"],
            "live_sequences": len(self.owners("live")),
            "reserved_bytes": self._totals["reserved"],
            "cached_kv_bytes": {t: self._totals[t] for t in ("device", "host", "disk")},
            "device_used_bytes": self.device_bytes,
            "budgets_bytes": {
                "device": self.budgets.device_bytes,
                "host": self.budgets.host_bytes,
                "disk": self.budgets.disk_bytes,
            },
            "over_budget_bytes": self.over_budget(),
        }
