"""Tiers: the prefix trie's payloads on device (MLX arrays), host (numpy) and disk (safetensors).

`Tiers` owns one trie (it is the trie's `PayloadOps`) and moves payloads between tiers under byte
budgets: demotion in LRU order device -> host -> disk -> dropped, promotion before use; locked
nodes never move down. Every copy is timed (`Move`) for metrics.

The disk tier is a folder per model fingerprint and namespace, one file per node, in the format
of memory/disk.py. A file that fails to parse or to verify is deleted and its node dropped, so the
caller recomputes instead of answering from bad data; a file must also describe exactly the node
(path) it is filed under. A disk that fails to write (full, I/O error, folder gone) never fails a
request: the node that could not be written is dropped instead and the tier is skipped while
`DiskHealth` says it is degraded (host demotes to dropped, so it stays within budget).

Sync and single-threaded: a pager actor calls these on the MLX thread. Only the explicit moves
(`demote`, `promote`, `rebalance`, `flush`) and splits of disk payloads touch the disk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs

from kvgrove import faults
from kvgrove.memory import snapshots
from kvgrove.memory.disk import (
    CorruptEntry,
    DiskHealth,
    DiskStore,
    describes,
    node_header,
    node_key,
    path_key,
    read_header,
)
from kvgrove.memory.ledger import TIERS, Budgets
from kvgrove.memory.snapshots import Payload
from kvgrove.memory.trie import InsertResult, LruIndex, Node, Trie

log = logging.getLogger(__name__)


class Move(NamedTuple):
    node_id: int
    source: str
    target: str  # "device" | "host" | "disk" | "dropped"
    nbytes: int
    seconds: float


@attrs.define
class IntegrityReport:
    """What a check found (`problems`), fixed (`repaired`) and could not fix (`unrepaired`)."""

    problems: list[str] = attrs.Factory(list)
    repaired: list[str] = attrs.Factory(list)
    unrepaired: list[str] = attrs.Factory(list)

    @property
    def clean(self) -> bool:
        """Nothing was wrong."""
        return not self.problems

    def extend(self, other: IntegrityReport) -> None:
        self.problems += other.problems
        self.repaired += other.repaired
        self.unrepaired += other.unrepaired

    def to_dict(self) -> dict:
        return {
            "clean": self.clean,
            "problems": list(self.problems),
            "repaired": list(self.repaired),
            "unrepaired": list(self.unrepaired),
        }


@attrs.frozen
class Hit:
    """A locked, promoted match: restore `usable_tokens` from `node`'s path, then `release`."""

    node: Node
    matched_tokens: int
    usable_tokens: int
    moves: tuple[Move, ...]


class Tiers:
    """The prefix cache of one (model fingerprint, namespace): trie + tiers + budgets."""

    def __init__(
        self,
        kinds: tuple[str, ...],
        budgets: Budgets,
        *,
        fingerprint: str,
        namespace: str = "default",
        cache_dir: Path | None = None,
        ledger: Any = None,
        fsync: bool = True,
        clock: Any = None,
        lru: LruIndex | None = None,
        totals: dict[str, int] | None = None,
        health: DiskHealth | None = None,
    ) -> None:
        """`clock`, `lru`, `totals` and `health` are shared by the namespaces of one
        PrefixCache (one LRU order, O(1) byte totals, one disk state)."""
        self.kinds = kinds
        self.budgets = budgets
        self.fingerprint = fingerprint
        self.namespace = namespace
        self.trie = Trie(
            self,
            name=f"prefix:{fingerprint}:{namespace}",
            ledger=ledger,
            clock=clock,
            lru=lru,
            totals=totals,
            owner=self,
        )
        self.health = health if health is not None else DiskHealth()
        self.disk: DiskStore | None = None
        if cache_dir is not None and budgets.disk_bytes > 0:
            self.disk = DiskStore(Path(cache_dir) / fingerprint / namespace, fsync=fsync)
        self.stats: dict[str, float] = {
            "lookups": 0,
            "lookup_tokens": 0,
            "hit_tokens": 0,
            "inserted_tokens": 0,
            "snapshot_seconds": 0.0,
            "restore_seconds": 0.0,
            "corrupt_entries": 0,
        }
        self.moved_bytes: dict[tuple[str, str], int] = {}
        self.moved_seconds: dict[tuple[str, str], float] = {}
        self.recovered = self._load_disk() if self.disk is not None else 0

    # -- PayloadOps (the trie calls these) -------------------------------------------------

    def nbytes(self, p: Payload) -> int:
        return p.nbytes

    def tier(self, p: Payload) -> str:
        return p.tier

    def restorable(self, p: Payload, k: int) -> bool:
        return p.restorable(k)

    def keeps_boundary(self, p: Payload) -> bool:
        return p.whole

    def split(self, p: Payload, k: int) -> tuple[Payload, Payload]:
        if p.tier == "disk":  # split on host; the halves are written again when demoted
            key, p = p.key, self._read(p)
            self.disk.delete(key)
        return snapshots.split(p, k)

    def can_join(self, a: Payload, b: Payload) -> bool:
        return "disk" not in (a.tier, b.tier)

    def join(self, a: Payload, b: Payload) -> Payload:
        if a.tier != b.tier:  # device + host: join on host (the colder tier)
            a, b = (snapshots.to_host(x) if x.tier == "device" else x for x in (a, b))
        return snapshots.join(a, b)

    def drop(self, p: Payload) -> None:
        if p.tier == "disk" and self.disk is not None and p.key is not None:
            self.disk.delete(p.key)
        p.arrays = {}

    # -- use: lookup, restore, insert ------------------------------------------------------

    def lookup(
        self, tokens: Sequence[int], *, max_tokens: int | None = None, promote: bool = True
    ) -> Hit:
        """Match `tokens`, promote the usable path to the device tier and lock it.

        A corrupt disk entry on the path is dropped and the match retried, so the hit only
        ever shrinks to what verified. Pair with `release` (or use `use`). With `promote`
        False the path stays where it is (lock only): `fill` promotes when it is used."""
        self.stats["lookups"] += 1
        self.stats["lookup_tokens"] += len(tokens)
        moves: list[Move] = []
        while True:
            m = self.trie.match_prefix(tokens, max_tokens=max_tokens)
            self.trie.lock_handle(m.node)
            try:
                for node in m.nodes if promote else ():
                    if node.tier != "device":
                        moves.append(self.promote(node))
            except CorruptEntry as exc:
                self.trie.lock_handle(m.node, unlock=True)
                self._drop_corrupt(exc)
                continue
            self.stats["hit_tokens"] += m.usable_tokens
            return Hit(m.node, m.matched_tokens, m.usable_tokens, tuple(moves))

    def release(self, hit: Hit) -> None:
        self.trie.lock_handle(hit.node, unlock=True)

    @contextlib.contextmanager
    def use(self, tokens: Sequence[int], *, max_tokens: int | None = None) -> Iterator[Hit]:
        hit = self.lookup(tokens, max_tokens=max_tokens)
        try:
            yield hit
        finally:
            self.release(hit)

    def fill(self, cache: Sequence[Any], hit: Hit) -> int:
        """Promote the hit's path to the device tier, stitch it into a fresh live cache and
        release the hit (the live cache holds its own copy).

        Returns the tokens restored: `hit.usable_tokens`, or 0 when a file on the path failed
        to verify (it is dropped where no one else holds it; the caller recomputes). Any other
        failure (an allocation in promote or stitch) releases the hit and propagates."""
        try:
            for node in self.trie.path(hit.node):
                if node.start < hit.usable_tokens and node.tier != "device":
                    self.promote(node)
        except CorruptEntry as exc:
            self.stats["hit_tokens"] -= hit.usable_tokens
            self.release(hit)
            # Another request may hold it: then it is dropped on a later use.
            with contextlib.suppress(RuntimeError):
                self._drop_corrupt(exc)
            return 0
        except BaseException:  # e.g. an allocation failure: unlock; the caller recomputes
            self.stats["hit_tokens"] -= hit.usable_tokens
            self.release(hit)
            raise
        try:
            self.stitch(cache, hit)
        finally:
            self.release(hit)
        return hit.usable_tokens

    def stitch(self, cache: Sequence[Any], hit: Hit) -> float:
        """Stitch the hit's path into a fresh live cache; returns the seconds it took."""
        if hit.usable_tokens == 0:
            return 0.0
        # A split since the match (another sequence stored a diverging continuation) leaves the
        # hit's node holding only the tokens after the cut: pieces past the usable end drop off.
        pieces = [n.payload for n in self.trie.path(hit.node) if n.start < hit.usable_tokens]
        faults.check("tiers.stitch")
        seconds = snapshots.stitch(cache, pieces, hit.usable_tokens)
        self.stats["restore_seconds"] += seconds
        return seconds

    def insert(
        self, tokens: Sequence[int], cache: Sequence[Any], *, restore_point: bool = False
    ) -> InsertResult:
        """Cache `tokens` from a live cache that holds at least them (whole state is taken only
        where the cache stands exactly at the end: split the prefill there)."""
        t0 = time.perf_counter()
        while True:
            try:
                result = self.trie.insert_prefix(
                    tokens,
                    lambda s, e: snapshots.take(cache, s, e, self.kinds),
                    restore_point=restore_point,
                )
                break
            except CorruptEntry as exc:  # a disk payload to split failed to verify
                self._drop_corrupt(exc)
        self.stats["snapshot_seconds"] += time.perf_counter() - t0
        self.stats["inserted_tokens"] += result.new_tokens
        return result

    # -- moves -----------------------------------------------------------------------------

    def promote(self, node: Node) -> Move:
        """Bring a node's payload to the device tier (raises CorruptEntry for a bad file)."""
        t0 = time.perf_counter()
        faults.check("tiers.promote")
        p, source = node.payload, node.tier
        if source == "disk":
            p = self._read(p, node)
            self.disk.delete(node.payload.key)
        if p.tier == "host":
            p = snapshots.to_device(p)
        self.trie.set_payload(node, p)
        return self._moved(node, source, "device", time.perf_counter() - t0)

    def demote(self, node: Node, target: str | None = None) -> Move:
        """Move an unlocked node one tier down (or to `target`); "dropped" removes its subtree."""
        if node.lock_count:
            raise ValueError(f"{node!r} is locked")
        source = node.tier
        target = target or self._below(source)
        t0 = time.perf_counter()
        if target == "dropped":
            nbytes = sum(r.nbytes for r in self.trie.remove(node))
            seconds = time.perf_counter() - t0
            self._count(source, "dropped", nbytes, seconds)
            return Move(node.id, source, "dropped", nbytes, seconds)
        if TIERS.index(target) <= TIERS.index(source):
            raise ValueError(f"cannot demote from {source} to {target}")
        p = node.payload
        try:
            faults.check("tiers.demote")
            if p.tier == "device":
                p = snapshots.to_host(p)
        except Exception:  # the copy failed (an allocation): drop the node, never the request
            log.warning("copying %r to host memory failed; dropping it", node, exc_info=True)
            return self._drop_instead(node, source, t0)
        if target == "disk":
            try:
                p = self._write(p, node)
            except OSError as exc:  # the disk failed: drop the node instead, never the request
                self.health.failed(exc, self.disk.root)
                self.health.dropped_writes += 1
                return self._drop_instead(node, source, t0)
            self.health.succeeded()
        old = node.payload
        self.trie.set_payload(node, p)
        old.arrays = {}
        return self._moved(node, source, target, time.perf_counter() - t0)

    def _drop_instead(self, node: Node, source: str, t0: float) -> Move:
        nbytes = sum(r.nbytes for r in self.trie.remove(node))
        seconds = time.perf_counter() - t0
        self._count(source, "dropped", nbytes, seconds)
        return Move(node.id, source, "dropped", nbytes, seconds)

    def rebalance(self) -> list[Move]:
        """Demote least recently used unlocked nodes until every tier is within its budget."""
        moves: list[Move] = []
        for tier in TIERS:
            while self.tier_bytes(tier) > self.budgets.of(tier):
                oldest = self.trie.oldest(tier)
                if oldest is None:
                    break
                moves.append(self.demote(oldest))
        return moves

    def flush(self) -> list[Move]:
        """Write every unlocked node to disk (graceful shutdown), then rebalance."""
        if self.disk is None:
            return []
        moves = []
        for n in sorted(self.trie.nodes(), key=lambda n: n.start):
            if n.attached and n.tier != "disk" and n.lock_count == 0 and self.health.writable():
                moves.append(self.demote(n, "disk"))
        recency = {n.payload.key: n.last_use for n in self.trie.nodes() if n.tier == "disk"}
        if recency:
            try:
                self.disk.write_recency(recency)
            except OSError as exc:
                self.health.failed(exc, self.disk.root)
        return moves + self.rebalance()

    # -- views and checks ------------------------------------------------------------------

    def tier_bytes(self, tier: str) -> int:
        return self.trie.tier_bytes(tier)

    @property
    def empty(self) -> bool:
        """Holds no node and no lock (so its namespace can be collected)."""
        return not self.trie.root.children and not self.trie._handles

    def statistics(self) -> dict:
        info = self.trie.size_info()
        return {
            "nodes": info.nodes,
            "tokens": info.tokens,
            "bytes": info.bytes_by_tier,
            "nodes_by_tier": info.nodes_by_tier,
            "locked_bytes": info.locked_bytes,
            "budgets_bytes": {t: self.budgets.of(t) for t in TIERS},
            **self.stats,
            "moved_bytes": {f"{s}->{t}": n for (s, t), n in self.moved_bytes.items()},
            "moved_seconds": {f"{s}->{t}": x for (s, t), x in self.moved_seconds.items()},
        }

    def check_integrity(self, *, repair: bool = True, with_lru: bool = True) -> IntegrityReport:
        """What disagrees (trie structure, totals, LRU, payloads, the disk folder against the
        trie), and with `repair` what was fixed: disk nodes whose file vanished are dropped
        (unless locked), stray files removed, totals recounted, the LRU index rebuilt."""
        report = IntegrityReport()
        trie_problems = self.trie.problems(with_lru=with_lru)
        report.problems += [f"{self.namespace}: {p}" for p in trie_problems]
        if repair and any(
            p.startswith(("byte totals", "node counts", "tokens/")) for p in trie_problems
        ):
            self.trie.repair_totals()
            report.repaired.append(f"{self.namespace}: totals recounted")
        if repair and with_lru and any("LRU" in p for p in trie_problems):
            self.trie.lru.rebuild(dict.fromkeys(self.trie.nodes(), self))
            report.repaired.append(f"{self.namespace}: LRU index rebuilt")
        vanished = []
        for node in self.trie.nodes():
            p = node.payload
            if p is None:
                continue
            if p.tier == "disk":
                if p.arrays or p.key is None:
                    report.problems.append(f"{self.namespace}: {node!r} on disk holds arrays")
                elif self.disk is None or not self.disk.path(p.key).exists():
                    report.problems.append(f"{self.namespace}: the file of {node!r} vanished")
                    vanished.append(node)
            elif p.key is not None or set(p.arrays) != set(p.shapes):
                report.problems.append(f"{self.namespace}: {node!r} arrays differ from shapes")
        for node in vanished:
            if not repair or not node.attached:
                continue
            if node.lock_count:
                report.unrepaired.append(f"{self.namespace}: {node!r} is locked")
                continue
            gone = self.trie.remove(node)
            report.repaired.append(f"{self.namespace}: dropped {len(gone)} nodes of a lost file")
        if self.disk is not None:
            on_disk = {n.payload.key for n in self.trie.nodes() if n.tier == "disk"}
            for key in sorted(set(self.disk.stored_keys()) - on_disk):
                report.problems.append(f"{self.namespace}: stray file {key}")
                if repair:
                    self.disk.delete(key)
                    report.repaired.append(f"{self.namespace}: removed stray file {key}")
        return report

    # -- internals -------------------------------------------------------------------------

    def _below(self, tier: str) -> str:
        if tier == "device" and self.budgets.host_bytes > 0:
            return "host"
        if tier in ("device", "host") and self.disk is not None and self.health.writable():
            return "disk"
        return "dropped"

    def _moved(self, node: Node, source: str, target: str, seconds: float) -> Move:
        self._count(source, target, node.nbytes, seconds)
        return Move(node.id, source, target, node.nbytes, seconds)

    def _count(self, source: str, target: str, nbytes: int, seconds: float) -> None:
        self.moved_bytes[(source, target)] = self.moved_bytes.get((source, target), 0) + nbytes
        self.moved_seconds[(source, target)] = (
            self.moved_seconds.get((source, target), 0.0) + seconds
        )

    def _write(self, p: Payload, node: Node) -> Payload:
        assert self.disk is not None
        path = self.trie.path_tokens(node)
        key = node_key(path, node.start)
        meta = node_header(
            path,
            node.start,
            whole=p.whole,
            restore_point=node.restore_point,
            kinds=p.kinds,
            dtypes=p.dtypes,
            last_use=node.last_use,
        )
        checksum = self.disk.write(key, p.arrays, meta)
        return attrs.evolve(p, arrays={}, tier="disk", key=key, checksum=checksum)

    def _read(self, p: Payload, node: Node | None = None) -> Payload:
        """Load a disk payload; with `node`, the file must describe exactly that node's span."""
        assert self.disk is not None and p.key is not None
        try:
            arrays, meta = self.disk.read(p.key, p.checksum)
            if {k: tuple(a.shape) for k, a in arrays.items()} != p.shapes:
                raise CorruptEntry(f"{p.key}: shapes differ from the index")
            if node is not None and not describes(
                meta, p.key, self.trie.path_tokens(node), node.start
            ):
                raise CorruptEntry(f"{p.key}: the file is not the node it is filed under")
        except CorruptEntry as exc:
            if isinstance(exc.__cause__, OSError):
                self.health.read_errors += 1
            raise CorruptEntry(str(exc), p) from exc
        return attrs.evolve(p, arrays=arrays, tier="host", key=None, checksum=None)

    def _drop_corrupt(self, exc: CorruptEntry) -> None:
        """Drop the node whose payload failed to load (exc.args[1]), with its subtree."""
        self.stats["corrupt_entries"] += 1
        bad = exc.args[1] if len(exc.args) > 1 else None
        node = next((n for n in self.trie.nodes() if n.payload is bad), None)
        if node is None:
            raise RuntimeError("a corrupt entry outside the trie") from exc
        if node.lock_count:
            raise RuntimeError(f"corrupt {node!r} is locked by another user")
        self.trie.remove(node)

    def _load_disk(self) -> int:
        """Rebuild the trie from the disk folder; unreadable or orphaned files are deleted."""
        assert self.disk is not None
        entries = []
        recency = self.disk.read_recency()
        for key in self.disk.stored_keys():
            try:
                stored = read_header(self.disk, key)
                if stored.kinds != self.kinds:
                    raise CorruptEntry(f"{key}: another layout")
            except Exception:
                self.disk.delete(key)
                continue
            payload = Payload(
                len(stored.tokens),
                stored.kinds,
                {},
                stored.dtypes,
                stored.shapes,
                stored.whole,
                "disk",
                key,
                stored.checksum,
            )
            entries.append((stored, payload))
        by_path: dict[str, Node] = {path_key(()): self.trie.root}
        paths: dict[str, tuple[int, ...]] = {path_key(()): ()}
        loaded = 0
        for stored, payload in sorted(entries, key=lambda e: e[0].start):
            start, prefix, tokens = stored.start, stored.prefix, stored.tokens
            parent = by_path.get(prefix)
            if parent is None or parent.end != start or tokens[0] in parent.children:
                self.disk.delete(payload.key)  # its prefix did not survive: useless
                continue
            full = paths[prefix] + tokens
            if payload.key != node_key(full, start):
                # The header's tokens (or start, or prefix) are not those the file is filed
                # under: a tampered or misplaced file never serves another prompt.
                self.stats["corrupt_entries"] += 1
                self.disk.delete(payload.key)
                continue
            last_use = recency.get(payload.key, stored.last_use)
            node = self.trie.attach(
                parent,
                tokens,
                payload,
                restore_point=stored.restore_point,
                last_use=last_use,
            )
            paths[path_key(full)] = full
            by_path[path_key(full)] = node
            loaded += 1
        return loaded
