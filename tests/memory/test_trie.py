"""The prefix trie on fake payloads: unit tests, then a stateful test against a naive model."""

from __future__ import annotations

import itertools

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from kvgrove.memory.ledger import Budgets, Ledger
from kvgrove.memory.trie import Trie

TOKEN_BYTES = 4
WHOLE_BYTES = 16


@attrs.frozen(eq=False)
class Fake:
    n: int
    whole: bool
    tier: str = "device"
    id: int = attrs.field(factory=itertools.count().__next__)


class FakeOps:
    """Payloads that only count: `hybrid` models a recurrent layer (whole state at ends only)."""

    def __init__(self, *, hybrid: bool, join_tiers: bool = True) -> None:
        self.hybrid = hybrid
        self.join_tiers = join_tiers
        self.live: set[int] = set()

    def make(self, n: int, whole: bool, tier: str = "device") -> Fake:
        p = Fake(n, whole and self.hybrid, tier)
        self.live.add(p.id)
        return p

    def consume(self, *ps: Fake) -> None:
        for p in ps:
            self.live.remove(p.id)

    def nbytes(self, p: Fake) -> int:
        return p.n * TOKEN_BYTES + (WHOLE_BYTES if p.whole else 0)

    def tier(self, p: Fake) -> str:
        return p.tier

    def restorable(self, p: Fake, k: int) -> bool:
        return not self.hybrid or (k == p.n and p.whole)

    def keeps_boundary(self, p: Fake) -> bool:
        return p.whole

    def split(self, p: Fake, k: int) -> tuple[Fake, Fake]:
        self.consume(p)
        return self.make(k, False, p.tier), self.make(p.n - k, p.whole, p.tier)

    def can_join(self, a: Fake, b: Fake) -> bool:
        return self.join_tiers or a.tier == b.tier

    def join(self, a: Fake, b: Fake) -> Fake:
        self.consume(a, b)
        colder = max(a.tier, b.tier, key=("device", "host", "disk").index)
        return self.make(a.n + b.n, b.whole, colder)

    def drop(self, p: Fake) -> None:
        self.consume(p)

    def factory(self, n_live: int):
        return lambda start, end: self.make(end - start, end == n_live)


def make(hybrid: bool = False, **kw) -> tuple[Trie, FakeOps, Ledger]:
    ops = FakeOps(hybrid=hybrid, **kw)
    ledger = Ledger(Budgets(1 << 30, 1 << 30, 1 << 30))
    return Trie(ops, name="t", ledger=ledger), ops, ledger


def insert(trie: Trie, ops: FakeOps, tokens, **kw):
    return trie.insert_prefix(tokens, ops.factory(len(tokens)), **kw)


def check(trie: Trie, ops: FakeOps) -> None:
    trie.check_integrity()
    assert {n.payload.id for n in trie.nodes()} == ops.live


def test_insert_and_match_sliceable():
    trie, ops, ledger = make()
    r = insert(trie, ops, [1, 2, 3, 4])
    assert (r.new_tokens, r.new_nodes) == (4, 1)
    m = trie.match_prefix([1, 2, 3, 9])
    assert (m.matched_tokens, m.usable_tokens) == (3, 3)
    assert m.nodes == (r.node,)
    assert trie.match_prefix([1, 2, 3, 4, 5], max_tokens=4).usable_tokens == 4
    assert trie.match_prefix([1, 2, 3, 4], max_tokens=3).usable_tokens == 3
    assert trie.match_prefix([7]).matched_tokens == 0
    assert trie.match_prefix([7]).node is trie.root
    assert ledger.get("device", "t") == 4 * TOKEN_BYTES
    check(trie, ops)


def test_split_on_partial_match_keeps_children_keyed_and_spans_contiguous():
    trie, ops, _ = make()
    a = insert(trie, ops, [1, 2, 3, 4]).node
    b = insert(trie, ops, [1, 2, 5]).node
    assert [n.tokens for n in trie.path(a)] == [(1, 2), (3, 4)]
    assert [n.tokens for n in trie.path(b)] == [(1, 2), (5,)]
    assert trie.path(a)[0] is trie.path(b)[0]
    assert trie.size_info().nodes == 3 and trie.size_info().tokens == 5
    check(trie, ops)


def test_remove_merges_single_child_chain():
    trie, ops, _ = make()
    a = insert(trie, ops, [1, 2, 3, 4]).node
    b = insert(trie, ops, [1, 2, 5]).node
    trie.remove(b)
    assert [n.tokens for n in trie.path(a)] == [(1, 2, 3, 4)]
    assert trie.size_info().nodes == 1
    check(trie, ops)


def test_hybrid_usable_only_at_whole_state_boundaries():
    trie, ops, _ = make(hybrid=True)
    insert(trie, ops, [1, 2, 3, 4])
    m = trie.match_prefix([1, 2, 3, 9])
    assert (m.matched_tokens, m.usable_tokens) == (3, 0)
    assert trie.match_prefix([1, 2, 3, 4, 5]).usable_tokens == 4
    # The fork point gets whole state from the second sequence's own prefill, split there.
    insert(trie, ops, [1, 2])
    assert trie.match_prefix([1, 2, 3, 9]).usable_tokens == 2
    assert trie.match_prefix([1, 2, 3, 4], max_tokens=3).usable_tokens == 2
    check(trie, ops)


def test_whole_state_boundary_survives_removal_of_a_sibling():
    trie, ops, _ = make(hybrid=True)
    for t in ([0], [0, 1], [0, 2]):
        insert(trie, ops, t)
    assert [r.tokens for r in trie.evict(1)] == [(0, 1)]
    assert trie.size_info().nodes == 2  # no merge: [0] keeps its recurrent state
    assert trie.match_prefix([0, 1]).usable_tokens == 1
    check(trie, ops)


def test_insert_inside_node_splits_only_when_boundary_gains_something():
    trie, ops, _ = make()
    insert(trie, ops, [1, 2, 3, 4])
    insert(trie, ops, [1, 2])
    assert trie.size_info().nodes == 1  # fully sliceable: nothing to keep at 2
    insert(trie, ops, [1, 2], restore_point=True)
    assert trie.size_info().nodes == 2
    check(trie, ops)


def test_lock_protects_path_and_releases_on_exit():
    trie, ops, _ = make()
    a = insert(trie, ops, [1, 2, 3]).node
    b = insert(trie, ops, [4, 5]).node
    with trie.lock(a):
        assert trie.lru_nodes() == [b]
        assert [r.tokens for r in trie.evict(10**9)] == [(4, 5)]
        with pytest.raises(ValueError):
            trie.remove(a)
        # A split under the lock keeps the handle and the counts right.
        insert(trie, ops, [1, 9])
        assert all(n.lock_count == 1 for n in trie.path(a))
        check(trie, ops)
    assert all(n.lock_count == 0 for n in trie.nodes())
    with pytest.raises(ValueError, match="not locked"):
        trie.lock_handle(a, unlock=True)
    check(trie, ops)


def test_lru_order_refreshed_on_every_node_of_a_matched_path():
    trie, ops, _ = make()
    insert(trie, ops, [1, 2, 3])
    insert(trie, ops, [1, 2, 4])
    insert(trie, ops, [5])
    trie.match_prefix([1, 2, 3])
    order = [trie.path_tokens(n) for n in trie.lru_nodes()]
    # [1,2,4] is oldest; [5] next; the matched path last, deepest first on equal times.
    assert order == [(1, 2, 4), (5,), (1, 2, 3), (1, 2)]
    removed = trie.evict(1)
    assert [r.tokens for r in removed] == [(1, 2, 4)]
    assert [n.tokens for n in trie.nodes()].count((1, 2, 3)) == 1  # merged back
    check(trie, ops)


def test_no_join_across_tiers_keeps_chain():
    trie, ops, _ = make(join_tiers=False)
    a = insert(trie, ops, [1, 2, 3, 4]).node
    b = insert(trie, ops, [1, 2, 5]).node
    upper = trie.path(a)[0]
    trie.set_payload(upper, ops.make(2, False, "host"))
    ops.consume(upper.payload)  # the fake "moved" it; pretend the old one was released
    ops.live.add(upper.payload.id)
    trie.remove(b)
    assert trie.size_info().nodes == 2
    assert trie.size_info().bytes_by_tier["host"] == 2 * TOKEN_BYTES


def test_attach_and_size_info():
    trie, ops, ledger = make()
    n = trie.attach(trie.root, (1, 2), ops.make(2, False, "disk"))
    trie.attach(n, (3,), ops.make(1, False, "disk"))
    info = trie.size_info()
    assert info.nodes_by_tier["disk"] == 2 and info.bytes_by_tier["disk"] == 12
    assert ledger.get("disk", "t") == 12
    assert trie.match_prefix([1, 2, 3]).usable_tokens == 3
    check(trie, ops)


# -- the stateful test ---------------------------------------------------------------------


class TrieMachine(RuleBasedStateMachine):
    """The trie against a naive model: the set of cached prefixes, and (hybrid) the set of
    prefixes at which whole state was stored."""

    hybrid = False
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.trie, self.ops, self.ledger = make(hybrid=self.hybrid)
        self.prefixes: set[tuple[int, ...]] = set()
        self.ends: set[tuple[int, ...]] = set()
        self.locked: list[tuple] = []

    def expected(self, query: tuple[int, ...], limit: int) -> tuple[int, int]:
        matched = max(j for j in range(len(query) + 1) if query[:j] in self.prefixes or j == 0)
        if self.hybrid:
            usable = max(
                len(e) for e in self.ends | {()} if query[: len(e)] == e and len(e) <= limit
            )
        else:
            usable = min(matched, limit)
        return matched, usable

    def draw_tokens(self, data, *, min_size: int = 1) -> tuple[int, ...]:
        """Mostly a cut of something inserted before plus a few tokens: shared prefixes."""
        base = data.draw(st.sampled_from(sorted(self.ends | {()})))
        cut = data.draw(st.integers(0, len(base)))
        extra = data.draw(st.lists(st.integers(0, 2), min_size=max(0, min_size - cut), max_size=3))
        return base[:cut] + tuple(extra)

    @rule(data=st.data(), restore_point=st.sampled_from([False, False, False, True]))
    def insert(self, data, restore_point):
        t = self.draw_tokens(data)
        insert(self.trie, self.ops, t, restore_point=restore_point)
        self.prefixes.update(t[:j] for j in range(1, len(t) + 1))
        self.ends.add(t)

    @rule(data=st.data(), cap=st.integers(0, 8))
    def match(self, data, cap):
        q = self.draw_tokens(data)
        m = self.trie.match_prefix(q, max_tokens=cap)
        assert (m.matched_tokens, m.usable_tokens) == self.expected(q, cap)
        assert sum(len(n.tokens) for n in m.nodes) >= m.usable_tokens
        if m.nodes:
            assert m.nodes[-1].start < m.usable_tokens <= m.nodes[-1].end

    @rule(target=handles, data=st.data())
    def lock(self, data):
        m = self.trie.match_prefix(self.draw_tokens(data))
        self.trie.lock_handle(m.node)
        return (m.node, self.trie.path_tokens(m.node))

    @rule(handle=consumes(handles))
    def unlock(self, handle):
        node, path = handle
        assert self.trie.path_tokens(node) == path
        self.trie.lock_handle(node, unlock=True)

    @rule(nbytes=st.integers(1, 8))
    def evict(self, nbytes):
        for r in self.trie.evict(nbytes):
            for j in range(r.start + 1, len(r.tokens) + 1):
                self.prefixes.discard(r.tokens[:j])
                self.ends.discard(r.tokens[:j])

    @precondition(lambda self: self.trie.size_info().nodes > 0)
    @rule(data=st.data(), tier=st.sampled_from(["device", "host"]))
    def move(self, data, tier):
        nodes = self.trie.lru_nodes()
        if not nodes:
            return
        node = data.draw(st.sampled_from(nodes))
        p = node.payload
        self.ops.consume(p)
        self.trie.set_payload(node, self.ops.make(p.n, p.whole, tier))

    @invariant()
    def integrity(self):
        check(self.trie, self.ops)
        self.ledger.check_integrity()
        assert self.trie.size_info().tokens == len(self.prefixes)
        # The heap LRU agrees with a full sort, and the totals with a recount.
        for tier in ("device", "host", "disk"):
            lru = self.trie.lru_nodes(tier)
            assert self.trie.oldest(tier) is (lru[0] if lru else None), tier
            assert self.trie.tier_bytes(tier) == sum(n.nbytes for n in self.trie.nodes()
                                                     if n.tier == tier)  # fmt: skip
        for q in self.ends | self.prefixes:
            m = self.trie.match_prefix(q, touch=False)
            assert (m.matched_tokens, m.usable_tokens) == self.expected(q, len(q)), q


class HybridTrieMachine(TrieMachine):
    hybrid = True


_settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestTrieSliceable = TrieMachine.TestCase
TestTrieSliceable.settings = _settings
TestTrieHybrid = HybridTrieMachine.TestCase
TestTrieHybrid.settings = _settings
