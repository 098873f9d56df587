"""PrefixCache: namespaces, one LRU across them, and restores after concurrent splits."""

from __future__ import annotations

from kvgrove.memory.ledger import Budgets
from kvgrove.memory.prefix_cache import PrefixCache, namespace_dir
from kvgrove.memory.snapshots import layout
from kvgrove.models.caches import cache_tokens, make_cache
from kvgrove.models.generate import generate
from kvgrove.sampling import SamplingParams
from tiny_models import prefilled

GREEDY = SamplingParams(temperature=0.0)


AMPLE = Budgets(1 << 30, 1 << 30, 1 << 30)


def make(model, tmp_path, budgets=AMPLE):
    kinds = layout(make_cache(model))
    return PrefixCache(kinds, budgets, fingerprint="test", cache_dir=tmp_path)


def test_a_split_after_the_match_still_restores_the_matched_prefix(model, tmp_path):
    cache = make(model, tmp_path)
    base = list(range(10, 52))  # 42 tokens in one node
    cache.store("", base, prefilled(model, base))
    query = [*base[:36], 200, 201]  # diverges inside the node, at 36
    assert cache.match(1, "", query) == 36
    # Another sequence stores a continuation that splits the locked node at 36.
    other = [*base[:36], 250, 251, 252]
    cache.store("", other, prefilled(model, other))
    live = make_cache(model)
    assert cache.fill(1, live) == 36
    assert cache_tokens(live) == 36
    expected = [s.token for s in generate(model, query, GREEDY, max_tokens=5)]
    got = [
        s.token for s in generate(model, query, GREEDY, max_tokens=5, cache=live, cached_tokens=36)
    ]
    assert got == expected
    cache.release(1)
    assert cache.check_integrity().clean


def test_namespaces_are_separate_tries_under_one_lru(model, tmp_path):
    per_token = None
    cache = make(model, tmp_path)
    a, b = list(range(10, 40)), list(range(100, 130))
    cache.store("alice", a, prefilled(model, a))
    per_token = cache.tier_bytes()["device"] // len(a)
    cache.store("bob", b, prefilled(model, b))
    assert cache.match(1, "bob", [*a, 1]) == 0  # alice's prompt is not bob's
    assert cache.match(2, "alice", [*a, 1]) == len(a)
    cache.release(1)
    cache.release(2)
    # Shrink the device tier to one prompt's worth: the least recently used (bob's) moves down,
    # although it lives in another namespace.
    cache.budgets = Budgets(per_token * len(a), 1 << 30, 1 << 30)
    moves = cache.rebalance()
    assert len(moves) == 1 and moves[0].target == "host"
    assert cache.tiers("bob").tier_bytes("host") > 0
    assert cache.tiers("alice").tier_bytes("device") > 0
    stats = cache.statistics()
    assert stats["namespaces"] == 2 and stats["moved_bytes"] == {"device->host": moves[0].nbytes}
    assert cache.check_integrity().clean


def test_namespace_folders_are_safe_names():
    assert namespace_dir("default") == "default"
    hashed = namespace_dir("key:../../etc/passwd")
    assert hashed.startswith("ns-") and "/" not in hashed and "." not in hashed
    assert namespace_dir("a b") != namespace_dir("a_b")
