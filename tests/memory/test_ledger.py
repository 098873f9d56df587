"""The byte ledger: entries, totals and budgets."""

from __future__ import annotations

import pytest

from kvgrove.memory.ledger import Budgets, Ledger


def make() -> Ledger:
    return Ledger(Budgets(device_bytes=1000, host_bytes=500, disk_bytes=100))


def test_entries_totals_and_snapshot():
    ledger = make()
    ledger.set("weights", "model", 600)
    ledger.set("device", "prefix", 100)
    ledger.set("host", "prefix", 700)
    assert ledger.device_bytes == 700 and ledger.headroom("device") == 300
    assert ledger.over_budget() == {"host": 200}
    snap = ledger.snapshot()
    assert snap["cached_kv_bytes"] == {"device": 100, "host": 700, "disk": 0}
    assert snap["headroom_bytes"]["device"] == 300
    ledger.set("host", "prefix", 0)
    assert ledger.owners("host") == [] and ledger.total("host") == 0
    ledger.check_integrity()
    with pytest.raises(ValueError):
        ledger.set("nonsense", "x", 1)
    with pytest.raises(ValueError):
        ledger.set("live", "x", -1)
