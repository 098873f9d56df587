"""Prefix-cache bookkeeping at scale: per-step cost (tier_bytes + a rebalance with nothing to do)
and per-demotion cost, at 1k / 10k / 100k nodes over 1 / 100 / 10k namespaces, for today's code
(incremental totals, one heap LRU shared by the namespaces) and, beside it, the algorithm it
replaced (copied below as `old_*`, labelled "old": a walk of every trie per tier_bytes and a
scan + sort of every node per demotion). Tiny host-tier snapshots (one layer, 4 tokens), no
model; a demotion from host drops the node (no disk tier), so the table shows the bookkeeping.

    .venv/bin/python benchmarks/trie_scale.py [--quick]
"""

from __future__ import annotations

import random
import sys
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import numpy as np

from _common import table
from kvgrove.memory.ledger import TIERS, Budgets
from kvgrove.memory.prefix_cache import PrefixCache
from kvgrove.memory.snapshots import Payload

SPAN_TOKENS = 4


def payload() -> Payload:
    a = np.zeros((1, 1, SPAN_TOKENS, 2), dtype=np.float32)
    shapes = {"0.0": a.shape, "0.1": a.shape}
    return Payload(
        SPAN_TOKENS, ("span",), {"0.0": a, "0.1": a.copy()}, {"0.0": "float32", "0.1": "float32"},
        shapes, False, "host",
    )  # fmt: skip


def build(nodes: int, namespaces: int, seed: int = 0) -> PrefixCache:
    """`nodes` nodes spread over `namespaces` tries, each a random tree (branches and chains)."""
    rng = random.Random(seed)
    cache = PrefixCache(("span",), Budgets(1 << 40, 1 << 40, 0), fingerprint="b", cache_dir=None)
    tries = [cache.tiers(f"ns{i}").trie for i in range(namespaces)]
    members: list[list] = [[t.root] for t in tries]
    for i in range(nodes):
        k = i % namespaces
        parent = rng.choice(members[k])
        first = len(parent.children) + 1
        tokens = (first, *(rng.randrange(1000) for _ in range(SPAN_TOKENS - 1)))
        members[k].append(tries[k].attach(parent, tokens, payload()))
    # Recency as real use leaves it: a use touches a whole path, so a parent is never older
    # than its children. Leaves get random last uses; each parent the newest of its subtree.
    order = list(range(nodes))
    rng.shuffle(order)
    leaf_use = iter(order)
    for k, trie in enumerate(tries):
        for node in reversed(members[k][1:]):  # children were attached after their parents
            uses = [c.last_use for c in node.children.values()]
            node.last_use = max(uses) if uses else next(leaf_use) + 1
            trie.lru.update(node, trie.owner)
    cache._clock.now = nodes + 1
    return cache


# -- the replaced algorithm (main before this change), on the same objects ------------------


def old_tier_bytes(cache: PrefixCache) -> dict[str, int]:
    return {
        t: sum(x.trie.size_info().bytes_by_tier[t] for x in cache._tiers.values()) for t in TIERS
    }


def old_rebalance(cache: PrefixCache) -> list:
    moves = []
    for tier in TIERS:
        budget = cache.budgets.of(tier)
        while sum(x.trie.size_info().bytes_by_tier[tier] for x in cache._tiers.values()) > budget:
            oldest = None
            for tiers in cache._tiers.values():
                lru = tiers.trie.lru_nodes(tier)
                if lru and (oldest is None or lru[0].last_use < oldest[1].last_use):
                    oldest = (tiers, lru[0])
            if oldest is None:
                break
            moves.append(oldest[0].demote(oldest[1]))
    return moves


# -- measurements ----------------------------------------------------------------------------


def per_step(cache: PrefixCache, old: bool, budget_s: float = 0.3) -> float:
    if old:
        tier_bytes, rebalance = old_tier_bytes, old_rebalance
    else:
        tier_bytes, rebalance = PrefixCache.tier_bytes, PrefixCache.rebalance
    n, t0 = 0, time.perf_counter()
    while True:
        tier_bytes(cache)
        assert not rebalance(cache)
        n += 1
        if time.perf_counter() - t0 > budget_s and n >= 3:
            return (time.perf_counter() - t0) / n


def per_demotion(cache: PrefixCache, old: bool, count: int) -> float:
    """Shrink the host budget by `count` nodes' bytes: the rebalance demotes (drops) them."""
    one = payload().nbytes
    cache.budgets = Budgets(1 << 40, cache.tier_bytes()["host"] - count * one, 0)
    t0 = time.perf_counter()
    moves = old_rebalance(cache) if old else cache.rebalance()
    seconds = time.perf_counter() - t0
    assert len(moves) >= 1
    return seconds / len(moves)


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = (1_000, 10_000) if quick else (1_000, 10_000, 100_000)
    rows = []
    for namespaces in (1, 100, 10_000):
        for nodes in sizes:
            if namespaces > nodes:
                continue
            cache = build(nodes, namespaces)
            new_step = per_step(cache, old=False)
            old_step = per_step(cache, old=True, budget_s=0.3)
            per_demotion(cache, old=False, count=1)  # pops the entries the build left stale
            new_demote = per_demotion(cache, old=False, count=min(2000, nodes // 4))
            old_demote = per_demotion(cache, old=True, count=3 if nodes >= 10_000 else 20)
            report = cache.check_integrity()
            assert report.clean, report.problems
            rows.append(
                (
                    f"{nodes:,}",
                    f"{namespaces:,}",
                    f"{new_step * 1e6:.1f}",
                    f"{old_step * 1e6:.0f}",
                    f"{new_demote * 1e6:.1f}",
                    f"{old_demote * 1e6:.0f}",
                )
            )
            print(*rows[-1], sep="\t", flush=True)
    print()
    print(
        table(
            (
                "nodes",
                "namespaces",
                "step µs (now)",
                "step µs (old)",
                "demotion µs (now)",
                "demotion µs (old)",
            ),
            rows,
        )
    )


if __name__ == "__main__":
    main()
