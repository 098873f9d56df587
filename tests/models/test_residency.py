"""Which on-demand models stay loaded: the registry's sync policy, on real ModelGroups."""

from __future__ import annotations

import types

from kvgrove.actors.registry import ModelGroup
from kvgrove.config import Settings
from kvgrove.models import residency


def group(key: str, *, nbytes: int = 100, leases: int = 0, ready: bool = True, **kw) -> ModelGroup:
    g = ModelGroup(key=key, name=key, leases=leases, **kw)
    g.loaded = types.SimpleNamespace(info=types.SimpleNamespace(nbytes=nbytes))
    if ready:
        g.ready.set()
    return g


def test_idle_groups_are_due_once_their_keep_alive_has_passed():
    a = group("a", keep_alive=5.0, idle_since=10.0)
    b = group("b", keep_alive=1.0, idle_since=10.0)
    leased = group("c", keep_alive=0.0, leases=1)
    forever = group("d", keep_alive=-1.0)
    loading = group("e", keep_alive=0.0, ready=False)
    due, next_due = residency.due([a, b, leased, forever, loading], now=12.0)
    assert due == [b] and next_due == 15.0
    assert residency.expires_at(a, wall_now=1000.0, clock_now=12.0) == 1003.0
    assert residency.expires_at(forever, wall_now=1000.0, clock_now=12.0) is None
    assert residency.expires_at(leased, wall_now=1000.0, clock_now=12.0) == 1000.0


def test_room_is_made_by_unloading_the_least_recently_used_idle_group():
    settings = Settings(max_loaded_models=2, device_budget_bytes=0)
    old = group("old", last_used=1.0)
    new = group("new", last_used=2.0)
    busy = group("busy", last_used=0.0, leases=1)
    assert residency.make_room([old], settings, 50) is None
    assert residency.make_room([new, old], settings, 50) is old
    assert residency.make_room([busy, new], settings, 50) is new
    assert residency.make_room([busy, group("busy2", leases=1)], settings, 50) is None
    by_bytes = Settings(max_loaded_models=9, device_budget_bytes=250)
    assert residency.make_room([old, new], by_bytes, 50) is None
    assert residency.make_room([old, new], by_bytes, 51) is old


def test_a_lease_keeps_the_keep_alive_it_asks_for_else_the_default_while_loading():
    settings = Settings(keep_alive_seconds=42.0)
    loading = group("a", ready=False, leases=1, keep_alive=7.0)
    assert residency.keep_alive(loading, None, settings) == 42.0
    assert residency.keep_alive(loading, 3.0, settings) == 3.0
    ready = group("b", leases=1, keep_alive=7.0)
    assert residency.keep_alive(ready, None, settings) == 7.0


def test_each_group_has_a_prefix_cache_folder_of_its_own(tmp_path):
    settings = Settings(kv_cache_dir=str(tmp_path))
    one = residency.group_settings(settings, "/models/one", "one")
    two = residency.group_settings(settings, "/models/two", "two")
    assert one.model == "one" and one.kv_cache_dir != two.kv_cache_dir
    assert one.kv_cache_dir.startswith(str(tmp_path / "models"))
