"""Tiers: the prefix trie's payloads on device (MLX arrays), host (numpy) and disk (safetensors).

`Tiers` owns one trie (it is the trie's `PayloadOps`) and moves payloads between tiers under byte
budgets: demotion in LRU order device -> host -> disk -> dropped, promotion before use; locked
nodes never move down. Every copy is timed (`Move`) for metrics.

The disk tier is a folder per model fingerprint and namespace, one safetensors file per node. A
file's header carries everything needed to rebuild the trie after a restart (its span's tokens,
where it starts, the key of the prefix it hangs from, the whole-state flag, the MLX dtypes) and a
CRC-32 of the tensor bytes, verified on every load: a file that fails to parse or to verify is
deleted and its node dropped, so the caller recomputes instead of answering from bad data. Files
are written to a temporary name, fsynced and renamed, so a crash mid-write leaves nothing that
is trusted; stray temporary files are removed at startup.

Sync and single-threaded: a pager actor calls these on the MLX thread. Only the explicit moves
(`demote`, `promote`, `rebalance`, `flush`) and splits of disk payloads touch the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from kvgrove import faults
from kvgrove.memory import snapshots
from kvgrove.memory.ledger import Budgets
from kvgrove.memory.snapshots import Payload
from kvgrove.memory.trie import InsertResult, Node, Trie

FORMAT = "kvgrove-kv-1"
_ORDER = ("device", "host", "disk")


class CorruptEntry(Exception):
    """A disk file failed to parse or to verify."""


class Move(NamedTuple):
    node_id: int
    source: str
    target: str  # "device" | "host" | "disk" | "dropped"
    nbytes: int
    seconds: float


@attrs.frozen
class Hit:
    """A locked, promoted match: restore `usable_tokens` from `node`'s path, then `release`."""

    node: Node
    matched_tokens: int
    usable_tokens: int
    moves: tuple[Move, ...]


def path_key(tokens: Sequence[int]) -> str:
    """A stable name for a token prefix (the disk files' keys)."""
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def _crc(arrays: dict[str, np.ndarray]) -> int:
    crc = 0
    for key in sorted(arrays):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(arrays[key]).data, crc)
    return crc


class DiskStore:
    """One folder of safetensors files, written atomically and verified on load."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        for stray in self.root.glob("*.tmp"):
            stray.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def write(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> int:
        """Write atomically; returns the checksum recorded in the header."""
        checksum = _crc(arrays)
        final = self.path(key)
        tmp = final.with_name(final.name + ".tmp")
        save_file(arrays, str(tmp), metadata={**meta, "format": FORMAT, "crc32": str(checksum)})
        if self.fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, final)
        return checksum

    def read(self, key: str, checksum: int | None) -> dict[str, np.ndarray]:
        """Load and verify; raises CorruptEntry on any failure."""
        try:
            arrays = load_file(str(self.path(key)))
            meta = self.header(key)
        except Exception as exc:
            raise CorruptEntry(f"{key}: {exc}") from exc
        recorded = int(meta.get("crc32", "-1"))
        if _crc(arrays) != recorded or (checksum is not None and recorded != checksum):
            raise CorruptEntry(f"{key}: checksum mismatch")
        return arrays

    def header(self, key: str) -> dict[str, str]:
        with safe_open(str(self.path(key)), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CorruptEntry(f"{key}: not a {FORMAT} file")
        return meta

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def stored_keys(self) -> list[str]:
        return sorted(p.name.removesuffix(".safetensors") for p in self.root.glob("*.safetensors"))


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
    ) -> None:
        self.kinds = kinds
        self.budgets = budgets
        self.fingerprint = fingerprint
        self.namespace = namespace
        self.trie = Trie(self, name=f"prefix:{fingerprint}:{namespace}", ledger=ledger, clock=clock)
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
        False the path stays where it is (lock only): `restore_hit` promotes when it is used."""
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

    def restore_hit(self, cache: Sequence[Any], hit: Hit) -> int:
        """Promote the hit's path to the device tier, stitch it into a fresh live cache and
        release the hit (the live cache holds its own copy).

        Returns the tokens restored: `hit.usable_tokens`, or 0 when a file on the path failed
        to verify (it is dropped where no one else holds it; the caller recomputes)."""
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
        try:
            self.restore(cache, hit)
        finally:
            self.release(hit)
        return hit.usable_tokens

    def restore(self, cache: Sequence[Any], hit: Hit) -> float:
        """Stitch the hit's path into a fresh live cache; returns the seconds it took."""
        if hit.usable_tokens == 0:
            return 0.0
        # A split since the match (another sequence stored a diverging continuation) leaves the
        # hit's node holding only the tokens after the cut: pieces past the usable end drop off.
        pieces = [n.payload for n in self.trie.path(hit.node) if n.start < hit.usable_tokens]
        seconds = snapshots.restore(cache, pieces, hit.usable_tokens)
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
        p, source = node.payload, node.tier
        if source == "disk":
            p = self._read(p)
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
        if _ORDER.index(target) <= _ORDER.index(source):
            raise ValueError(f"cannot demote from {source} to {target}")
        p = node.payload
        faults.check("tiers.demote")
        if p.tier == "device":
            p = snapshots.to_host(p)
        if target == "disk":
            p = self._write(p, node)
        old = node.payload
        self.trie.set_payload(node, p)
        old.arrays = {}
        return self._moved(node, source, target, time.perf_counter() - t0)

    def rebalance(self) -> list[Move]:
        """Demote least recently used unlocked nodes until every tier is within its budget."""
        moves: list[Move] = []
        for tier in _ORDER:
            while self.tier_bytes(tier) > self.budgets.of(tier):
                lru = self.trie.lru_nodes(tier)
                if not lru:
                    break
                moves.append(self.demote(lru[0]))
        return moves

    def flush(self) -> list[Move]:
        """Write every unlocked node to disk (graceful shutdown), then rebalance."""
        if self.disk is None:
            return []
        moves = [
            self.demote(n, "disk")
            for n in sorted(self.trie.nodes(), key=lambda n: n.start)
            if n.tier != "disk" and n.lock_count == 0
        ]
        return moves + self.rebalance()

    # -- views and checks ------------------------------------------------------------------

    def tier_bytes(self, tier: str) -> int:
        return self.trie.size_info().bytes_by_tier[tier]

    def statistics(self) -> dict:
        info = self.trie.size_info()
        return {
            "nodes": info.nodes,
            "tokens": info.tokens,
            "bytes": info.bytes_by_tier,
            "nodes_by_tier": info.nodes_by_tier,
            "locked_bytes": info.locked_bytes,
            "budgets_bytes": {t: self.budgets.of(t) for t in _ORDER},
            **self.stats,
            "moved_bytes": {f"{s}->{t}": n for (s, t), n in self.moved_bytes.items()},
            "moved_seconds": {f"{s}->{t}": x for (s, t), x in self.moved_seconds.items()},
        }

    def check_integrity(self) -> None:
        self.trie.check_integrity()
        for node in self.trie.nodes():
            p = node.payload
            if p.tier == "disk":
                assert not p.arrays and p.key is not None
                assert self.disk is not None and self.disk.path(p.key).exists(), p.key
            else:
                assert p.key is None and set(p.arrays) == set(p.shapes), node
        if self.disk is not None:
            on_disk = {n.payload.key for n in self.trie.nodes() if n.tier == "disk"}
            assert set(self.disk.stored_keys()) == on_disk, "disk files and trie disagree"

    # -- internals -------------------------------------------------------------------------

    def _below(self, tier: str) -> str:
        if tier == "device" and self.budgets.host_bytes > 0:
            return "host"
        if tier in ("device", "host") and self.disk is not None:
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
        key = f"{path_key(path)}-{node.start}"
        meta = {
            "start": str(node.start),
            "tokens": json.dumps(list(node.tokens)),
            "prefix": path_key(path[: node.start]),
            "whole": "1" if p.whole else "0",
            "restore_point": "1" if node.restore_point else "0",
            "kinds": json.dumps(list(p.kinds)),
            "dtypes": json.dumps(p.dtypes),
        }
        checksum = self.disk.write(key, p.arrays, meta)
        return attrs.evolve(p, arrays={}, tier="disk", key=key, checksum=checksum)

    def _read(self, p: Payload) -> Payload:
        assert self.disk is not None and p.key is not None
        try:
            arrays = self.disk.read(p.key, p.checksum)
            if {k: tuple(a.shape) for k, a in arrays.items()} != p.shapes:
                raise CorruptEntry(f"{p.key}: shapes differ from the index")
        except CorruptEntry as exc:
            raise CorruptEntry(str(exc), p) from exc
        return attrs.evolve(p, arrays=arrays, tier="host", key=None, checksum=None)

    def _drop_corrupt(self, exc: CorruptEntry) -> None:
        """Drop the node whose payload failed to load (exc.args[1]), with its subtree."""
        self.stats["corrupt_entries"] += 1
        bad = exc.args[1] if len(exc.args) > 1 else None
        node = next((n for n in self.trie.nodes() if n.payload is bad), None)
        if node is None:
            raise AssertionError("a corrupt entry outside the trie") from exc
        if node.lock_count:
            raise RuntimeError(f"corrupt {node!r} is locked by another user")
        self.trie.remove(node)

    def _load_disk(self) -> int:
        """Rebuild the trie from the disk folder; unreadable or orphaned files are deleted."""
        assert self.disk is not None
        entries = []
        for key in self.disk.stored_keys():
            try:
                meta = self.disk.header(key)
                with safe_open(str(self.disk.path(key)), framework="numpy") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
                tokens = tuple(json.loads(meta["tokens"]))
                kinds = tuple(json.loads(meta["kinds"]))
                if kinds != self.kinds or not tokens:
                    raise CorruptEntry(f"{key}: another layout")
                payload = Payload(
                    len(tokens),
                    kinds,
                    {},
                    json.loads(meta["dtypes"]),
                    shapes,
                    meta["whole"] == "1",
                    "disk",
                    key,
                    int(meta["crc32"]),
                )
                entries.append((int(meta["start"]), meta["prefix"], tokens, meta, payload))
            except Exception:
                self.disk.delete(key)
        by_path: dict[str, Node] = {path_key(()): self.trie.root}
        paths: dict[str, tuple[int, ...]] = {path_key(()): ()}
        loaded = 0
        for start, prefix, tokens, meta, payload in sorted(entries, key=lambda e: e[0]):
            parent = by_path.get(prefix)
            if parent is None or parent.end != start or tokens[0] in parent.children:
                self.disk.delete(payload.key)  # its prefix did not survive: useless
                continue
            node = self.trie.attach(
                parent, tokens, payload, restore_point=meta["restore_point"] == "1"
            )
            full = paths[prefix] + tokens
            paths[path_key(full)] = full
            by_path[path_key(full)] = node
            loaded += 1
        return loaded
