"""Prefix-cache copy costs per MiB: snapshot, stitch, page out / in (host, disk). No model needed:
SpanKVCache layers shaped like SmolLM2-135M (30 layers, 3 KV heads x 64, float32).

    .venv/bin/python benchmarks/prefix_tiers.py [tokens] [nodes]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)
import mlx.core as mx

# isort: on
from kvgrove.memory.ledger import Budgets
from kvgrove.memory.snapshots import layout
from kvgrove.memory.tiers import Tiers
from kvgrove.models.caches import SpanKVCache

LAYERS, HEADS, DIM = 30, 3, 64


def live_cache(tokens: int) -> list[SpanKVCache]:
    cache = []
    for _ in range(LAYERS):
        c = SpanKVCache()
        k = mx.random.normal((1, HEADS, tokens, DIM))
        c.update_and_fetch(k, k + 1)
        cache.append(c)
    mx.eval([c.keys for c in cache])
    return cache


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    nodes = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    cache = live_cache(tokens)
    big = Budgets(1 << 40, 1 << 40, 1 << 40)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tiers = Tiers(layout(cache), big, fingerprint="bench", cache_dir=Path(d))
        step = tokens // nodes
        t0 = time.perf_counter()
        for end in range(step, tokens + 1, step):
            tiers.insert(list(range(end)), cache)
        mib = tiers.tier_bytes("device") / 2**20
        rows.append(("snapshot", time.perf_counter() - t0))
        with tiers.use(list(range(tokens))) as hit:
            fresh = [SpanKVCache() for _ in range(LAYERS)]
            rows.append((f"stitch ({nodes} nodes)", tiers.stitch(fresh, hit)))
        for target in ("host", "disk"):
            moves = [tiers.demote(n, target) for n in tiers.trie.lru_nodes()]
            rows.append((f"page out -> {target}", sum(m.seconds for m in moves)))
        moves = [tiers.promote(n) for n in tiers.trie.nodes()]
        rows.append(("page in disk -> device", sum(m.seconds for m in moves)))
        for n in tiers.trie.lru_nodes():
            tiers.demote(n, "host")
        moves = [tiers.promote(n) for n in tiers.trie.nodes()]
        rows.append(("page in host -> device", sum(m.seconds for m in moves)))
    print(f"{tokens} tokens, {nodes} nodes, {mib:.1f} MiB of KV")
    print(f"{'operation':28} {'ms':>9} {'ms/MiB':>8} {'GiB/s':>7}")
    for name, s in rows:
        print(f"{name:28} {s * 1e3:9.1f} {s * 1e3 / mib:8.2f} {mib / 1024 / s:7.2f}")


if __name__ == "__main__":
    main()
