"""The prefix cache of one model: a `Tiers` (trie + tiers) per cache namespace, one set of budgets.

Namespaces keep tenants apart: each API key (and `cache_salt`) gets its own trie, so one tenant's
prompts can never be hit by another's. Budgets are global, and so is LRU: every trie stamps last
use from one shared clock, and `rebalance` demotes the least recently used unlocked node of all
namespaces until each tier fits.

Bookkeeping scales: byte totals are kept incrementally in one dict shared by the namespaces'
tries (`tier_bytes` is a lookup), LRU is one heap per tier shared by them (a demotion pops the
oldest, no sort), and a namespace that holds nothing and no lock is collected with its folder.

A disk folder has one owner: the PrefixCache holds an exclusive `flock` on `<folder>/.lock`
for its life (`close` releases it); a second one on the same folder fails with `CacheDirBusy`.

Everything here touches MLX arrays, so it runs on the executor's MLX thread only (the pager and
the executor take turns there). No trio.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx

from kvgrove import faults
from kvgrove.memory.ledger import TIERS, Budgets
from kvgrove.memory.snapshots import WHOLE
from kvgrove.memory.tiers import DiskHealth, Hit, IntegrityReport, LruIndex, Move, Tiers

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "default"
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CacheDirBusy(RuntimeError):
    """Another prefix cache (this process or another) owns the folder."""


class _Clock:
    """The logical clock of last use, shared by every namespace (restarts past recovered use)."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 1
        return self.now


def _lock_folder(root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder else ""
        raise CacheDirBusy(
            f"the prefix cache folder {root} is in use by another kvgrove{who}; "
            "give this one its own --kv-cache-dir"
        ) from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


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
        self._clock = _Clock()
        self._lru = LruIndex()
        self._totals = dict.fromkeys(TIERS, 0)
        self.health = DiskHealth()
        self._tiers: dict[str, Tiers] = {}
        self._hits: dict[int, tuple[Tiers, Hit]] = {}
        self.recovered_nodes = 0
        self.collected_namespaces = 0
        self._retired: dict[str, dict] = {}
        self._lock_fd: int | None = None
        if self.cache_dir is not None and budgets.disk_bytes > 0:
            root = self.cache_dir / fingerprint
            try:
                self._lock_fd = _lock_folder(root)
            except OSError as exc:  # an unusable folder: serve without the disk tier
                log.warning("prefix cache: no disk tier, %s is unusable: %s", root, exc)
                self.cache_dir = None
        if self.cache_dir is not None and budgets.disk_bytes > 0:
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                tiers = self._tiers_for_dir(folder.name)
                self.recovered_nodes += tiers.recovered
                self._clock.now = max([self._clock.now, *(n.last_use for n in tiers.trie.nodes())])
                self._collect(tiers)
        self.rebalance()

    def close(self) -> None:
        """Give up the folder (idempotent). Call after the last `flush`."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

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
                lru=self._lru,
                totals=self._totals,
                health=self.health,
            )
        return tiers

    def _retire(self, s: dict) -> None:
        """Keep a collected namespace's counters (statistics are totals since start)."""
        old = self._retired.get("all")
        if old is None:
            self._retired["all"] = s
            return
        for key, value in s.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    old[key][k] = old[key].get(k, 0) + v
            elif key not in ("nodes", "tokens", "locked_bytes"):
                old[key] += value

    def _collect(self, tiers: Tiers) -> None:
        """Forget a namespace (and remove its folder) once it holds nothing and no lock."""
        if tiers.empty and self._tiers.get(tiers.namespace) is tiers:
            del self._tiers[tiers.namespace]
            self.collected_namespaces += 1
            self._retire(tiers.statistics())
            if tiers.disk is not None:
                tiers.disk.remove_folder()

    def tiers(self, namespace: str = DEFAULT_NAMESPACE) -> Tiers:
        return self._tiers_for_dir(namespace_dir(namespace or DEFAULT_NAMESPACE))

    # -- one sequence's life: match (lock) -> fill -> store (unlock) --------------------------

    def match(self, request_id: int, namespace: str, tokens: Sequence[int]) -> int:
        """Lock the longest usable cached prefix of `tokens` for `request_id` and return its
        length (at least one token is left to evaluate). Nothing moves yet: the path is
        promoted when the sequence starts (`fill`), so a queued request holds no device
        memory, and the lock only keeps the path from being dropped meanwhile."""
        self.release(request_id)
        if len(tokens) < 2:
            return 0
        tiers = self.tiers(namespace)
        hit = tiers.lookup(tokens, max_tokens=len(tokens) - 1, promote=False)
        if hit.usable_tokens == 0:
            tiers.release(hit)
            self._collect(tiers)
            return 0
        self._hits[request_id] = (tiers, hit)
        return hit.usable_tokens

    def fill(self, request_id: int, cache: Sequence[Any]) -> int:
        """Promote and stitch the locked prefix of `request_id` into a fresh live cache, then
        unlock it (the live cache has its own copy) and rebalance. Returns the tokens restored:
        fewer than matched only if a file failed to verify (the caller computes the rest). Any
        other failure releases the request's lock and propagates."""
        held = self._hits.pop(request_id, None)
        if held is None:
            return 0
        tiers, hit = held
        try:
            return tiers.fill(cache, hit)
        finally:
            self.rebalance()
            self._collect(tiers)

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
        tiers = self.tiers(namespace)
        try:
            new = tiers.insert(tokens, cache, restore_point=True).new_tokens
        finally:
            if request_id is not None:
                self.release(request_id)
            self._collect(tiers)
        self.rebalance()
        return new

    def settle(self, taken: Sequence[Sequence[Any]]) -> int:
        """Evaluate, at once, the snapshots stores took inside `snapshots.deferred()`. If that
        fails (an allocation), every device node's snapshot is evaluated on its own and those
        that still fail are dropped (recomputed when next needed); a locked one stays, and a
        restore of it fails and recomputes. Returns the nodes dropped."""
        if not taken:
            return 0
        try:
            faults.check("snapshot.evaluate")
            mx.eval(list(taken))
            return 0
        except Exception:
            log.warning("evaluating a store's snapshots failed; one node at a time", exc_info=True)
        dropped = 0
        for tiers in list(self._tiers.values()):
            while (bad := self._unevaluable(tiers)) is not None:
                tiers.demote(bad, "dropped")
                dropped += 1
            self._collect(tiers)
        return dropped

    @staticmethod
    def _unevaluable(tiers: Tiers) -> Any:
        """The first unlocked device node whose snapshot fails to evaluate, or None."""
        for node in tiers.trie.nodes():
            p = node.payload
            if p is None or p.tier != "device" or node.lock_count:
                continue
            try:
                faults.check("snapshot.evaluate")
                mx.eval(list(p.arrays.values()))
            except Exception:
                log.warning("dropping %r: its snapshot does not evaluate", node, exc_info=True)
                return node
        return None

    def release(self, request_id: int) -> None:
        """Unlock the request's matched prefix (idempotent)."""
        held = self._hits.pop(request_id, None)
        if held is not None:
            tiers, hit = held
            tiers.release(hit)
            self._collect(tiers)

    # -- paging ----------------------------------------------------------------------------

    def tier_bytes(self) -> dict[str, int]:
        """Bytes per tier over every namespace (kept incrementally: a lookup)."""
        return dict(self._totals)

    def rebalance(self) -> list[Move]:
        """Demote the globally least recently used unlocked nodes until every tier fits."""
        moves: list[Move] = []
        emptied: list[Tiers] = []
        for tier in TIERS:
            budget = self.budgets.of(tier)
            while self._totals[tier] > budget:
                oldest = self._lru.oldest(tier)
                if oldest is None:
                    break  # only locked nodes are left in this tier
                node, tiers = oldest
                move = tiers.demote(node)
                moves.append(move)
                if move.target == "dropped":
                    emptied.append(tiers)
        for tiers in emptied:
            self._collect(tiers)
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
            "collected_namespaces": self.collected_namespaces,
            **self.health.statistics(),
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
        for s in [*(t.statistics() for t in self._tiers.values()), *self._retired.values()]:
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

    def check_integrity(self, *, repair: bool = True) -> IntegrityReport:
        """Every namespace's trie and folder, the shared LRU index and byte totals against a
        recount, and the requests' locks: a report of what disagreed and what was repaired
        (never raises; `report.clean` is the oracle's invariant)."""
        report = IntegrityReport()
        for tiers in list(self._tiers.values()):
            report.extend(tiers.check_integrity(repair=repair, with_lru=False))
        owners = {n: t for t in self._tiers.values() for n in t.trie.nodes()}
        lru = self._lru.problems(owners)
        report.problems += lru
        if lru and repair:
            self._lru.rebuild(owners)
            report.repaired.append("LRU index rebuilt")
        recount = {t: sum(x.trie.tier_bytes(t) for x in self._tiers.values()) for t in TIERS}
        if recount != self._totals:
            report.problems.append(f"tier totals {self._totals} != recount {recount}")
            if repair:
                self._totals.update(recount)
                report.repaired.append("tier totals recounted")
        for request_id, (tiers, hit) in self._hits.items():
            if not (hit.node.lock_count > 0 or hit.node.is_root):
                report.problems.append(f"request {request_id} holds no lock")
                report.unrepaired.append(f"request {request_id} holds no lock")
            elif self._tiers.get(tiers.namespace) is not tiers:
                report.problems.append(f"request {request_id} holds a collected namespace")
                report.unrepaired.append(f"request {request_id} holds a collected namespace")
        for tiers in list(self._tiers.values()):
            self._collect(tiers)
        return report
