"""A compressed radix trie over token ids: which prefixes are cached, where, and who uses them.

One trie per (model, cache namespace). Each node covers a span of tokens [start, end) and holds a
payload for that span only (per-layer snapshots; opaque here, handled through `PayloadOps`, so
the trie is testable without MLX). The shape follows mini-sglang's BasePrefixCache:
`match_prefix`, `insert_prefix`, `lock_handle`, `evict`, `size_info`, `check_integrity`.

- Children are keyed by their first token; a partial match splits a node in two (the original
  object keeps the lower half, so lock handles to it stay valid).
- A chain parent -> only child merges back when the parent is unlocked, is not an explicit
  restore point and keeps no whole-state boundary (recurrent / window state at its end).
- A match is *usable* only up to the deepest boundary where every layer can be restored:
  anywhere inside a node whose layers are all sliceable, else only at node ends carrying the
  whole state (`PayloadOps.restorable`).
- Locks are counted on every node of a path (root excluded); locked nodes are never removed,
  and never merged away.
- Last use is a logical clock, refreshed on every node of a matched or inserted path; LRU order
  breaks ties deepest first, so children go before their parents.

Not thread-safe, and nothing here blocks except what `PayloadOps` does (split / join / drop of a
payload in a slow tier). A MatchResult is only valid until the next mutation unless locked:
recompute the path from its `node` (`path(node)`) after other work.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol

from kvgrove.memory.ledger import TIERS


class PayloadOps(Protocol):
    """What the trie needs to know about (and do to) the opaque per-node payloads."""

    def nbytes(self, payload: Any) -> int: ...

    def tier(self, payload: Any) -> str: ...

    def restorable(self, payload: Any, k: int) -> bool:
        """Can every layer be restored to just after this payload's first k tokens (k >= 1)?"""
        ...

    def keeps_boundary(self, payload: Any) -> bool:
        """Does the payload hold state that exists only at its end (so must not be merged)?"""
        ...

    def split(self, payload: Any, k: int) -> tuple[Any, Any]:
        """(first k tokens, the rest); whole state stays with the rest. Consumes `payload`."""
        ...

    def can_join(self, first: Any, second: Any) -> bool: ...

    def join(self, first: Any, second: Any) -> Any:
        """One payload covering first's then second's tokens. Consumes both."""
        ...

    def drop(self, payload: Any) -> None:
        """Release whatever the payload holds (arrays, buffers, files)."""
        ...


PayloadFactory = Callable[[int, int], Any]  # (start, end) -> payload for tokens [start, end)


class LruIndex:
    """Unlocked nodes per tier in LRU order (last use, deepest first): a heap per tier with lazy
    invalidation. Each node points at its one current entry; older entries are skipped when they
    surface and the heaps are compacted when stale entries outnumber live ones. Several tries
    may share one index (and one clock): then the order is global across them."""

    def __init__(self) -> None:
        self.heaps: dict[str, list] = {t: [] for t in TIERS}
        self.live = dict.fromkeys(TIERS, 0)
        self._serial = itertools.count()

    def update(self, node: Node, owner: Any) -> None:
        """(Re)file `node` after its last use, tier, span or lock state changed."""
        self.forget(node)
        if node.lock_count or not node.attached or node.parent is None:
            return
        entry = (node.last_use, -node.end, next(self._serial), node, owner, node.tier)
        node.lru_entry = entry
        heap = self.heaps[node.tier]
        heapq.heappush(heap, entry)
        self.live[node.tier] += 1
        if len(heap) > 64 and len(heap) > 4 * self.live[node.tier]:
            heap[:] = [e for e in heap if e[3].lru_entry is e]
            heapq.heapify(heap)

    def forget(self, node: Node) -> None:
        entry = node.lru_entry
        if entry is not None:
            node.lru_entry = None
            self.live[entry[5]] -= 1

    def oldest(self, tier: str, owner: Any = None) -> tuple[Node, Any] | None:
        """The least recently used unlocked node of `tier` (of `owner`'s trie, if given)."""
        heap = self.heaps[tier]
        while heap and heap[0][3].lru_entry is not heap[0]:
            heapq.heappop(heap)
        if not heap:
            return None
        if owner is None or heap[0][4] is owner:
            return heap[0][3], heap[0][4]
        found = [e for e in heap if e[3].lru_entry is e and e[4] is owner]
        if not found:
            return None
        e = min(found)
        return e[3], e[4]

    def problems(self, nodes: dict[Node, Any]) -> list[str]:
        """Disagreements with `nodes` (every attached node of the tries sharing this index)."""
        out = []
        valid = 0
        for tier, heap in self.heaps.items():
            for e in heap:
                n = e[3]
                if n.lru_entry is not e:
                    continue
                valid += 1
                if n not in nodes or nodes[n] is not e[4]:
                    out.append(f"LRU entry for {n!r}, which is not in its trie")
                elif n.lock_count:
                    out.append(f"LRU entry for locked {n!r}")
                elif (e[0], -e[1], e[5]) != (n.last_use, n.end, n.tier) or tier != n.tier:
                    out.append(f"stale LRU entry for {n!r}")
        unlocked = sum(1 for n in nodes if not n.lock_count)
        if valid != unlocked:
            out.append(f"LRU index files {valid} nodes, the tries have {unlocked} unlocked")
        if sum(self.live.values()) != valid:
            out.append(f"LRU live counts {self.live} disagree with {valid} entries")
        return out

    def rebuild(self, nodes: dict[Node, Any]) -> None:
        for n in nodes:
            n.lru_entry = None
        self.heaps = {t: [] for t in TIERS}
        self.live = dict.fromkeys(TIERS, 0)
        for n, owner in nodes.items():
            self.update(n, owner)


class Node:
    __slots__ = (
        "attached",
        "children",
        "id",
        "last_use",
        "lock_count",
        "lru_entry",
        "nbytes",
        "parent",
        "payload",
        "restore_point",
        "start",
        "tier",
        "tokens",
    )

    def __init__(self, node_id: int, tokens: tuple[int, ...], start: int, parent: Node | None):
        self.id = node_id
        self.tokens = tokens
        self.start = start
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.payload: Any = None
        self.nbytes = 0
        self.tier = ""
        self.lock_count = 0
        self.last_use = 0
        self.restore_point = False
        self.attached = True
        self.lru_entry: tuple | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        return (
            f"Node(#{self.id} [{self.start},{self.end}) {self.tier} {self.nbytes}B "
            f"locks={self.lock_count} children={len(self.children)})"
        )


class MatchResult(NamedTuple):
    """`nodes`: root excluded, down to `node`, the node holding the last usable token (the last
    may be used in part). `matched_tokens`: the longest cached prefix of the query;
    `usable_tokens` (<= matched): how much of it can be restored."""

    nodes: tuple[Node, ...]
    matched_tokens: int
    usable_tokens: int
    node: Node


class InsertResult(NamedTuple):
    node: Node  # the node ending at len(tokens) (the root for an empty insert)
    new_tokens: int  # tokens that were not cached before
    new_nodes: int


class Removed(NamedTuple):
    tokens: tuple[int, ...]  # the full path from the root to the removed node's end
    start: int
    nbytes: int
    tier: str


class SizeInfo(NamedTuple):
    nodes: int
    tokens: int
    bytes_by_tier: dict[str, int]
    nodes_by_tier: dict[str, int]
    locked_bytes: int


class Trie:
    """The prefix trie. `ledger` (optional) gets one aggregate entry per tier, owner `name`."""

    def __init__(
        self,
        ops: PayloadOps,
        *,
        name: str = "prefix",
        ledger: Any = None,
        clock: Callable[[], int] | None = None,
        lru: LruIndex | None = None,
        totals: dict[str, int] | None = None,
        owner: Any = None,
    ) -> None:
        """`clock` (optional) stamps last use; several tries sharing one are LRU-comparable,
        and sharing one `lru` index (entries tagged with `owner`) are ordered together.
        `totals` (optional, shared) gets every byte change per tier, so the sum over several
        tries is one lookup."""
        self.ops = ops
        self.lru = lru if lru is not None else LruIndex()
        self.owner = owner if owner is not None else self
        self.totals = totals
        self._clock = clock
        self.name = name
        self.ledger = ledger
        self._ids = itertools.count(1)
        self.root = Node(0, (), 0, None)
        self._tick = 0
        self._bytes = dict.fromkeys(TIERS, 0)
        self._counts = dict.fromkeys(TIERS, 0)
        self._tokens = 0
        self._nodes = 0
        self._handles: dict[Node, int] = {}

    # -- queries ---------------------------------------------------------------------------

    def match_prefix(
        self, tokens: Sequence[int], *, max_tokens: int | None = None, touch: bool = True
    ) -> MatchResult:
        """The longest cached prefix of `tokens`, and how much of it is usable (<= max_tokens).

        Refreshes last use on every node of the matched path (unless `touch` is False: a peek).
        Splits nothing."""
        limit = len(tokens) if max_tokens is None else max(0, min(max_tokens, len(tokens)))
        path: list[Node] = []
        node, i = self.root, 0
        usable, usable_len = 0, 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common(child.tokens, tokens, i)
            path.append(child)
            # Deepest restorable point within this child, at or below both k and the limit.
            room = min(k, limit - child.start)
            if room > 0 and self.ops.restorable(child.payload, room):
                usable, usable_len = child.start + room, len(path)
            i += k
            if k < len(child.tokens):
                break
            node = child
        if touch:
            self._touch(path)
        nodes = tuple(path[:usable_len])
        return MatchResult(nodes, i, usable, nodes[-1] if nodes else self.root)

    def path(self, node: Node) -> tuple[Node, ...]:
        """The nodes from the root (excluded) down to `node`."""
        out = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return tuple(reversed(out))

    def path_tokens(self, node: Node) -> tuple[int, ...]:
        spans = []
        while node.parent is not None:
            spans.append(node.tokens)
            node = node.parent
        return tuple(itertools.chain.from_iterable(reversed(spans)))

    def nodes(self) -> Iterator[Node]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def lru_nodes(self, tier: str | None = None, *, leaves_only: bool = False) -> list[Node]:
        """Unlocked nodes (optionally of one tier, optionally only leaves), least recent first."""
        found = [
            n
            for n in self.nodes()
            if n.lock_count == 0
            and (tier is None or n.tier == tier)
            and (not leaves_only or not n.children)
        ]
        found.sort(key=lambda n: (n.last_use, -n.end))
        return found

    def oldest(self, tier: str) -> Node | None:
        """The least recently used unlocked node of `tier` (O(log n) amortized)."""
        found = self.lru.oldest(tier, self.owner)
        return found[0] if found is not None else None

    def tier_bytes(self, tier: str) -> int:
        return self._bytes[tier]

    def size_info(self) -> SizeInfo:
        locked = sum(n.nbytes for n in self.nodes() if n.lock_count)
        return SizeInfo(self._nodes, self._tokens, dict(self._bytes), dict(self._counts), locked)

    # -- insertion -------------------------------------------------------------------------

    def insert_prefix(
        self, tokens: Sequence[int], payload_factory: PayloadFactory, *, restore_point: bool = False
    ) -> InsertResult:
        """Cache `tokens`: new nodes for what is not cached yet, their payloads made by
        `payload_factory(start, end)` (which adds whole state iff `end` is where the live cache
        stands). Where `tokens` end inside or at the end of a node without a restorable
        boundary, `payload_factory(n, n)` may supply the whole state to attach there.
        `restore_point` marks the end as an explicit restore point (never merged away)."""
        tokens = tuple(tokens)
        n = len(tokens)
        path: list[Node] = []
        node, i = self.root, 0
        new_tokens = new_nodes = 0
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                leaf = self._new_node(node, tokens[i:], i, payload_factory(i, n))
                path.append(leaf)
                new_tokens, new_nodes, node, i = n - i, 1, leaf, n
                break
            k = _common(child.tokens, tokens, i)
            if k < len(child.tokens):
                if i + k < n:
                    child = self._split(child, k)  # diverges inside: a fork point
                else:
                    child = self._end_inside(child, k, payload_factory, restore_point)
                    path.append(child)
                    node, i = child, i + k
                    break
            path.append(child)
            node, i = child, i + k
        if node is not self.root and node.end == n:
            if not self.ops.restorable(node.payload, len(node.tokens)) and new_nodes == 0:
                self._attach_end_state(node, payload_factory)
            node.restore_point |= restore_point
        self._touch(path)
        return InsertResult(node, new_tokens, new_nodes)

    def attach(
        self,
        parent: Node,
        tokens: Sequence[int],
        payload: Any,
        *,
        restore_point: bool = False,
        last_use: int | None = None,
    ) -> Node:
        """Hang an existing payload (e.g. found on disk at startup) under `parent`, last used
        at `last_use` (recovered recency) or now."""
        tokens = tuple(tokens)
        if not tokens or tokens[0] in parent.children:
            raise ValueError("attach needs a non-empty span whose first token is free")
        node = self._new_node(parent, tokens, parent.end, payload)
        node.restore_point = restore_point
        if last_use is None:
            self._touch([node])
        else:
            node.last_use = last_use
            self._tick = max(self._tick, last_use)
            self.lru.update(node, self.owner)
        return node

    def _end_inside(
        self, child: Node, k: int, factory: PayloadFactory, restore_point: bool
    ) -> Node:
        """`tokens` end k tokens into `child`: split there only if that boundary gains
        something (whole state, or an explicit restore point); return the node to stand on."""
        end = child.start + k
        extra = factory(end, end)
        if not (restore_point or self.ops.keeps_boundary(extra)):
            self.ops.drop(extra)
            return child
        upper = self._split(child, k)
        if self.ops.keeps_boundary(extra) and self.ops.can_join(upper.payload, extra):
            self._set(upper, self.ops.join(upper.payload, extra))
        else:
            self.ops.drop(extra)
        return upper

    def _attach_end_state(self, node: Node, factory: PayloadFactory) -> None:
        extra = factory(node.end, node.end)
        if self.ops.keeps_boundary(extra) and self.ops.can_join(node.payload, extra):
            self._set(node, self.ops.join(node.payload, extra))
        else:
            self.ops.drop(extra)

    # -- locks -----------------------------------------------------------------------------

    def lock_handle(self, node: Node, unlock: bool = False) -> None:
        """Lock (or unlock) the path root -> node against removal and merging."""
        if node.is_root:
            return
        if not node.attached:
            raise ValueError(f"{node!r} is no longer in the trie")
        delta = -1 if unlock else 1
        if unlock:
            held = self._handles.get(node, 0)
            if held <= 0:
                raise ValueError(f"{node!r} is not locked")
            if held == 1:
                del self._handles[node]
            else:
                self._handles[node] = held - 1
        else:
            self._handles[node] = self._handles.get(node, 0) + 1
        n: Node | None = node
        while n is not None and n.parent is not None:
            n.lock_count += delta
            if n.lock_count == (0 if unlock else 1):
                self.lru.update(n, self.owner)
            n = n.parent

    @contextlib.contextmanager
    def lock(self, node: Node) -> Iterator[Node]:
        """`with trie.lock(match.node):` holds the path for the block."""
        self.lock_handle(node)
        try:
            yield node
        finally:
            self.lock_handle(node, unlock=True)

    # -- payload moves and removal ---------------------------------------------------------

    def set_payload(self, node: Node, payload: Any) -> None:
        """Replace a node's payload (a tier move); the accounting follows."""
        if node.is_root or not node.attached:
            raise ValueError(f"{node!r} holds no payload")
        self._set(node, payload)

    def remove(self, node: Node) -> list[Removed]:
        """Drop `node` and its subtree (all unlocked), then merge the parent back if it can."""
        if node.is_root:
            raise ValueError("the root is never removed")
        if node.lock_count:
            raise ValueError(f"{node!r} is locked")
        prefix = self.path_tokens(node)[: node.start]
        removed: list[Removed] = []
        stack = [(node, prefix)]
        while stack:
            n, before = stack.pop()
            assert n.lock_count == 0, "a locked node under an unlocked one"
            full = before + n.tokens
            removed.append(Removed(full, n.start, n.nbytes, n.tier))
            stack.extend((c, full) for c in n.children.values())
            self._account(n, -1)
            self.ops.drop(n.payload)
            n.payload, n.attached = None, False
            self.lru.forget(n)
        parent = node.parent
        assert parent is not None
        del parent.children[node.tokens[0]]
        node.parent = None
        self._maybe_merge(parent)
        return removed

    def evict(self, nbytes: int, *, tier: str | None = None) -> list[Removed]:
        """Drop least recently used unlocked leaves (of `tier`, if given) until at least
        `nbytes` are freed or nothing is left to drop."""
        removed: list[Removed] = []
        freed = 0
        while freed < nbytes:
            leaves = self.lru_nodes(tier, leaves_only=True)
            if not leaves:
                break
            gone = self.remove(leaves[0])
            removed.extend(gone)
            freed += sum(r.nbytes for r in gone)
        return removed

    # -- integrity -------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise AssertionError listing every problem `problems()` finds."""
        found = self.problems()
        if found:
            raise AssertionError("; ".join(found))

    def problems(self, *, with_lru: bool = True) -> list[str]:
        """Structure, spans, locks, the incremental totals against a recount, the LRU index
        (unless shared: the sharer checks it) and the ledger: what disagrees, never raising."""
        out: list[str] = []
        tiers_bytes = dict.fromkeys(TIERS, 0)
        tiers_count = dict.fromkeys(TIERS, 0)
        tokens = nodes = 0
        handles_below: dict[Node, int] = {}
        order: list[Node] = []
        if self.root.payload is not None or self.root.tokens or self.root.lock_count:
            out.append("the root holds tokens, a payload or a lock")
        stack = [self.root]
        while stack:
            node = stack.pop()
            order.append(node)
            for first, child in node.children.items():
                if not child.attached:
                    out.append(f"{child!r} detached but reachable")
                if child.parent is not node:
                    out.append(f"{child!r} has the wrong parent")
                if not child.tokens or child.tokens[0] != first:
                    out.append(f"{child!r} keyed by {first}")
                if child.start != node.end:
                    out.append(f"{child!r} not contiguous with its parent")
                if child.payload is None:
                    out.append(f"{child!r} has no payload")
                else:
                    if self.ops.nbytes(child.payload) != child.nbytes:
                        out.append(f"{child!r} bytes")
                    if self.ops.tier(child.payload) != child.tier:
                        out.append(f"{child!r} tier")
                if child.lock_count < 0:
                    out.append(f"{child!r} negative lock count")
                tiers_bytes[child.tier] = tiers_bytes.get(child.tier, 0) + child.nbytes
                tiers_count[child.tier] = tiers_count.get(child.tier, 0) + 1
                tokens += len(child.tokens)
                nodes += 1
                stack.append(child)
        for node, held in self._handles.items():
            if held <= 0 or not node.attached:
                out.append(f"a lock handle on evicted {node!r}")
        for node in reversed(order):  # children before parents
            handles_below[node] = self._handles.get(node, 0) + sum(
                handles_below[c] for c in node.children.values()
            )
            if not node.is_root and node.lock_count != handles_below[node]:
                out.append(f"{node!r} lock count")
        if tiers_bytes != self._bytes:
            out.append(f"byte totals {self._bytes} != recount {tiers_bytes}")
        if tiers_count != self._counts:
            out.append(f"node counts {self._counts} != recount {tiers_count}")
        if (tokens, nodes) != (self._tokens, self._nodes):
            out.append(f"tokens/nodes {(self._tokens, self._nodes)} != recount {(tokens, nodes)}")
        if self.ledger is not None:
            for tier in TIERS:
                if self.ledger.get(tier, self.name) != self._bytes[tier]:
                    out.append(f"ledger {tier}")
        if with_lru:
            out += self.lru.problems(dict.fromkeys(order[1:], self.owner))
        return out

    def repair_totals(self) -> None:
        """Reset the incremental totals to a recount (after `problems` found them off)."""
        old = dict(self._bytes)
        self._bytes = dict.fromkeys(TIERS, 0)
        self._counts = dict.fromkeys(TIERS, 0)
        self._tokens = self._nodes = 0
        for n in self.nodes():
            self._bytes[n.tier] += n.nbytes
            self._counts[n.tier] += 1
            self._tokens += len(n.tokens)
            self._nodes += 1
        if self.totals is not None:
            for tier in TIERS:
                self.totals[tier] += self._bytes[tier] - old[tier]

    # -- internals -------------------------------------------------------------------------

    def _touch(self, path: Sequence[Node]) -> None:
        self._tick = self._clock() if self._clock is not None else self._tick + 1
        for node in path:
            node.last_use = self._tick
            self.lru.update(node, self.owner)

    def _new_node(self, parent: Node, tokens: tuple[int, ...], start: int, payload: Any) -> Node:
        node = Node(next(self._ids), tokens, start, parent)
        parent.children[tokens[0]] = node
        node.payload = payload
        self._account(node, +1)
        return node

    def _set(self, node: Node, payload: Any) -> None:
        self._account(node, -1)
        node.payload = payload
        self._account(node, +1)

    def _account(self, node: Node, sign: int) -> None:
        """Add (+1) or take out (-1) a node's payload from the totals; +1 re-reads the payload."""
        if sign > 0:
            node.nbytes = self.ops.nbytes(node.payload)
            node.tier = self.ops.tier(node.payload)
        self._bytes[node.tier] += sign * node.nbytes
        self._counts[node.tier] += sign
        self._tokens += sign * len(node.tokens)
        self._nodes += sign
        if self.totals is not None:
            self.totals[node.tier] += sign * node.nbytes
        if sign > 0:
            self.lru.update(node, self.owner)
        if self.ledger is not None:
            self.ledger.set(node.tier, self.name, self._bytes[node.tier])

    def _split(self, node: Node, k: int) -> Node:
        """Cut `node` after k tokens; a new upper node takes the first k, `node` keeps the rest
        (and its identity, children and handles). Returns the upper node."""
        assert 0 < k < len(node.tokens)
        parent = node.parent
        assert parent is not None
        left, right = self.ops.split(node.payload, k)
        self._account(node, -1)
        upper = Node(next(self._ids), node.tokens[:k], node.start, parent)
        upper.lock_count = node.lock_count
        upper.last_use = node.last_use
        parent.children[upper.tokens[0]] = upper
        node.tokens, node.start, node.parent = node.tokens[k:], node.start + k, upper
        upper.children[node.tokens[0]] = node
        upper.payload, node.payload = left, right
        self._account(upper, +1)
        self._account(node, +1)
        return upper

    def _maybe_merge(self, node: Node) -> None:
        """Fold `node` into its only child when nothing needs the boundary between them."""
        if node.is_root or len(node.children) != 1 or node.lock_count or node.restore_point:
            return
        if self.ops.keeps_boundary(node.payload):
            return
        (child,) = node.children.values()
        if not self.ops.can_join(node.payload, child.payload):
            return
        parent = node.parent
        assert parent is not None
        self._account(node, -1)
        self._account(child, -1)
        child.payload = self.ops.join(node.payload, child.payload)
        child.tokens, child.start, child.parent = node.tokens + child.tokens, node.start, parent
        child.last_use = max(child.last_use, node.last_use)
        parent.children[child.tokens[0]] = child
        node.payload, node.attached, node.children, node.parent = None, False, {}, None
        self.lru.forget(node)
        self._account(child, +1)


def _common(span: tuple[int, ...], tokens: Sequence[int], i: int) -> int:
    """How many leading tokens of `span` equal tokens[i:]."""
    k, limit = 0, min(len(span), len(tokens) - i)
    while k < limit and span[k] == tokens[i + k]:
        k += 1
    return k
