"""Which on-demand models stay loaded: the model registry's sync policy. No trio here.

A group (`kvgrove.actors.registry.ModelGroup`) is idle when it is ready and has no leases. An
idle group unloads once its `keep_alive` has passed (< 0 = never); before a load, the least
recently used idle groups unload while more than `max_loaded_models` would be loaded or the
weights would pass the device budget. Each group keeps its prefix cache's disk tier in a folder
of its own, so one model's cache never serves another.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from kvgrove.config import Settings
from kvgrove.paths import kv_dir


def due(groups: Iterable[Any], now: float) -> tuple[list[Any], float]:
    """The idle groups whose keep_alive has passed at `now`, and when the next one is due."""
    out, next_due = [], math.inf
    for group in groups:
        if not group.ready.is_set() or group.leases or group.keep_alive < 0:
            continue
        at = group.idle_since + group.keep_alive
        if at <= now:
            out.append(group)
        else:
            next_due = min(next_due, at)
    return out, next_due


def expires_at(group: Any, wall_now: float, clock_now: float) -> float | None:
    """Wall-clock time `group` unloads if nothing uses it (None = never); `clock_now` is the
    clock of its `idle_since`."""
    if group.keep_alive < 0:
        return None
    if group.leases:
        return wall_now + group.keep_alive
    return wall_now + max(0.0, group.idle_since + group.keep_alive - clock_now)


def keep_alive(group: Any, requested: float | None, settings: Settings) -> float:
    """A new lease's keep_alive for `group`: the one it asks for, else the server's default for
    the first request of a group still loading, else the group's own."""
    if requested is not None:
        return requested
    if group.leases == 1 and not group.ready.is_set():
        return settings.keep_alive_seconds
    return group.keep_alive


def make_room(groups: Iterable[Any], settings: Settings, incoming_bytes: int) -> Any | None:
    """The group to unload before a load of `incoming_bytes` of weights: the least recently
    used idle one while the new one would not fit; None when it fits (or all are in use: the
    device budget is advisory here). Ask again after each unload."""
    groups = list(groups)
    loaded = [g for g in groups if g.ready.is_set() and g.error is None]
    weights = sum(g.loaded.info.nbytes for g in loaded) + incoming_bytes
    budget = settings.device_budget_bytes
    if len(groups) < settings.max_loaded_models and (not budget or weights <= budget):
        return None
    idle = sorted((g for g in loaded if g.leases == 0), key=lambda g: g.last_used)
    return idle[0] if idle else None


def group_settings(settings: Settings, key: str, name: str) -> Settings:
    """A group's settings: its model, and a prefix-cache folder of its own (by its path)."""
    folder = settings.kv_cache_dir if settings.kv_cache_dir is not None else str(kv_dir())
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return attrs.evolve(settings, model=name, kv_cache_dir=str(Path(folder) / "models" / digest))


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))
