"""The byte ledger: entries, budgets, reservations released on every exit."""

from __future__ import annotations

import pytest

from kvgrove.memory.ledger import Budgets, Ledger, OverBudget


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


def test_reserve_releases_on_exit_and_on_error():
    ledger = make()
    ledger.set("weights", "model", 600)
    baseline = ledger.totals()
    with ledger.reserve(400, owner="seq-1") as r:
        assert r.nbytes == 400 and ledger.total("reserved") == 400
        assert not ledger.can_reserve(1)
        with pytest.raises(OverBudget):
            ledger.acquire(1)
        ledger.check_integrity()
    assert ledger.totals() == baseline
    with pytest.raises(RuntimeError), ledger.reserve(100):
        raise RuntimeError("boom")
    assert ledger.totals() == baseline
    forced = ledger.acquire(10_000, force=True)
    assert ledger.over_budget() == {"device": 9_600}
    ledger.release(forced)
    with pytest.raises(ValueError):
        ledger.release(forced)
    assert ledger.totals() == baseline
    ledger.check_integrity()
