"""/api/memory's body from the accountant's frozen snapshot: the same JSON as before the
snapshot was an object (the keys and nesting clients read)."""

from __future__ import annotations

from kvgrove.actors.accountant import MemoryStats, MLXMemory
from kvgrove.http.ops import memory_body
from kvgrove.memory.ledger import Budgets, Ledger


def test_memory_body_is_the_ledger_json():
    ledger = Ledger(Budgets(device_bytes=1000, host_bytes=500, disk_bytes=100))
    ledger.set("weights", "model", 600)
    ledger.set("live", "7", 50)
    ledger.set("device", "prefix", 100)
    ledger.set("host", "prefix", 700)
    stats = MemoryStats(ledger.statistics(), 900, MLXMemory(1, 2, 3))
    assert memory_body(stats) == {
        "weights_bytes": 600,
        "live_cache_bytes": 50,
        "live_sequences": 1,
        "cached_kv_bytes": {"device": 100, "host": 700, "disk": 0},
        "device_used_bytes": 750,
        "budgets_bytes": {"device": 1000, "host": 500, "disk": 100},
        "headroom_bytes": {"device": 250, "host": -200, "disk": 100},
        "over_budget_bytes": {"host": 200},
        "device_peak_bytes": 900,
        "mlx": {"active_bytes": 1, "peak_bytes": 2, "cache_bytes": 3},
    }
