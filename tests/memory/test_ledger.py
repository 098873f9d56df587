"""The byte ledger: entries, totals, budgets and its frozen statistics() snapshot."""

from __future__ import annotations

import attrs
import pytest

from kvgrove.memory.ledger import Budgets, Ledger, TierBytes


def make() -> Ledger:
    return Ledger(Budgets(device_bytes=1000, host_bytes=500, disk_bytes=100))


def test_entries_totals_and_statistics():
    ledger = make()
    ledger.set("weights", "model", 600)
    ledger.set("device", "prefix", 100)
    ledger.set("host", "prefix", 700)
    assert ledger.device_bytes == 700 and ledger.headroom("device") == 300
    stats = ledger.statistics()
    assert stats.cached_kv_bytes == TierBytes(device=100, host=700, disk=0)
    assert stats.headroom_bytes == TierBytes(device=300, host=-200, disk=100)
    assert stats.over_budget_bytes == TierBytes(device=0, host=200, disk=0)
    assert stats.budgets_bytes == TierBytes(device=1000, host=500, disk=100)
    assert stats.device_used_bytes == 700 and stats.weights_bytes == 600 and stats.consistent
    ledger.set("host", "prefix", 0)
    assert ledger.owners("host") == [] and ledger.total("host") == 0
    assert stats.cached_kv_bytes.host == 700, "a snapshot does not follow the ledger"
    ledger.check_integrity()
    with pytest.raises(ValueError):
        ledger.set("nonsense", "x", 1)
    with pytest.raises(ValueError):
        ledger.set("live", "x", -1)


def test_live_entries_come_and_go():
    ledger = Ledger(Budgets(device_bytes=100, host_bytes=10, disk_bytes=10))
    ledger.set("weights", "model", 60)
    ledger.set("live", "1", 30)
    ledger.set("live", "2", 30)
    stats = ledger.statistics()
    assert (stats.live_cache_bytes, stats.live_sequences) == (60, 2)
    assert stats.over_budget_bytes.device == 20
    ledger.set("live", "1", 0)
    ledger.set("live", "2", 0)
    ledger.check_integrity()
    stats = ledger.statistics()
    assert (stats.live_cache_bytes, stats.live_sequences) == (0, 0)


def test_statistics_are_frozen_and_say_whether_the_totals_hold():
    ledger = make()
    ledger.set("live", "1", 5)
    stats = ledger.statistics()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.live_cache_bytes = 0
    # Break the invariant from inside (the ledger's own test may): the snapshot says so.
    ledger._totals["live"] += 1
    assert not ledger.statistics().consistent
    with pytest.raises(AssertionError):
        ledger.check_integrity()
