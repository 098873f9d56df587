"""The byte ledger: who holds how many bytes, by category, against per-tier budgets. No trio here.

Categories: "weights" (the model), "live" (caches of running sequences), "reserved" (bytes
promised to admitted work, see `reserve`), and the prefix cache's tiers "device", "host",
"disk". Device usage is weights + live + reserved + device-tier snapshots; host and disk usage
are their tier's snapshots. The accountant actor wraps one Ledger; the prefix cache charges its
tiers through `set` (one aggregate entry per trie).

Invariants (`check_integrity`): every entry is > 0 and belongs to a known category, the running
totals equal the sum of the entries, and reservations are exactly the "reserved" entries.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from collections.abc import Iterator

import attrs

CATEGORIES = ("weights", "live", "reserved", "device", "host", "disk")
TIERS = ("device", "host", "disk")  # the prefix cache's tiers, fastest first: the one definition
_DEVICE_CATEGORIES = ("weights", "live", "reserved", "device")


class OverBudget(Exception):
    """A reservation would take a tier past its budget."""


@attrs.frozen
class Budgets:
    device_bytes: int
    host_bytes: int
    disk_bytes: int

    def of(self, tier: str) -> int:
        return {"device": self.device_bytes, "host": self.host_bytes, "disk": self.disk_bytes}[tier]


@attrs.frozen
class Reservation:
    owner: str
    nbytes: int


class Ledger:
    """Entries keyed by (category, owner), with running totals per category."""

    def __init__(self, budgets: Budgets) -> None:
        self.budgets = budgets
        self._entries: dict[tuple[str, str], int] = {}
        self._totals: collections.Counter[str] = collections.Counter()
        self._reservations: dict[str, int] = {}
        self._ids = itertools.count(1)

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

    # -- reservations ----------------------------------------------------------------------

    def can_reserve(self, nbytes: int) -> bool:
        return nbytes <= self.headroom("device")

    def acquire(self, nbytes: int, *, owner: str | None = None, force: bool = False) -> Reservation:
        """Promise `nbytes` of device memory to `owner`; raises OverBudget unless it fits or
        `force`. Pair with `release` (or use `reserve`, which does)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if not force and not self.can_reserve(nbytes):
            raise OverBudget(
                f"reserving {nbytes} bytes needs {nbytes - self.headroom('device')} more "
                f"than the device budget ({self.budgets.device_bytes} bytes) allows"
            )
        owner = owner if owner is not None else f"reservation-{next(self._ids)}"
        if owner in self._reservations:
            raise ValueError(f"{owner!r} already holds a reservation")
        self._reservations[owner] = nbytes
        self.set("reserved", owner, nbytes)
        return Reservation(owner, nbytes)

    def release(self, reservation: Reservation) -> None:
        if self._reservations.pop(reservation.owner, None) is None:
            raise ValueError(f"{reservation.owner!r} holds no reservation")
        self.set("reserved", reservation.owner, 0)

    @contextlib.contextmanager
    def reserve(
        self, nbytes: int, *, owner: str | None = None, force: bool = False
    ) -> Iterator[Reservation]:
        """`with ledger.reserve(n):` holds n device bytes for the block, released on any exit."""
        reservation = self.acquire(nbytes, owner=owner, force=force)
        try:
            yield reservation
        finally:
            self.release(reservation)

    # -- checks and views ------------------------------------------------------------------

    def check_integrity(self) -> None:
        totals: collections.Counter[str] = collections.Counter()
        for (category, _), n in self._entries.items():
            assert category in CATEGORIES, category
            assert n > 0, "zero entries are removed"
            totals[category] += n
        for category in CATEGORIES:
            assert totals[category] == self._totals[category], category
        reserved = {o: n for (c, o), n in self._entries.items() if c == "reserved"}
        assert reserved == {o: n for o, n in self._reservations.items() if n}, "reservations"

    def totals(self) -> dict[str, int]:
        return {c: self._totals[c] for c in CATEGORIES}

    def snapshot(self) -> dict:
        """The ledger as /api/memory shows it."""
        return {
            "weights_bytes": self._totals["weights"],
            "live_cache_bytes": self._totals["live"],
            "live_sequences": len(self.owners("live")),
            "reserved_bytes": self._totals["reserved"],
            "reservations": len(self._reservations),
            "cached_kv_bytes": {t: self._totals[t] for t in TIERS},
            "device_used_bytes": self.device_bytes,
            "budgets_bytes": {t: self.budgets.of(t) for t in TIERS},
            "headroom_bytes": {t: self.headroom(t) for t in TIERS},
            "over_budget_bytes": self.over_budget(),
        }
