"""Operations: /health, /api/memory, /api/cache, /metrics."""

from __future__ import annotations

from typing import Any

import attrs
from quart import Blueprint, Response, request

from kvgrove.actors.api import MemoryStats
from kvgrove.http.common import require_ready, runtime

bp = Blueprint("ops", __name__)


@bp.get("/health")
async def health() -> Any:
    rt = runtime()
    if rt.ready:
        return {"status": "ok"}
    return {"status": rt.state}, 503


@bp.get("/api/memory")
async def memory() -> Any:
    rt = runtime()
    require_ready(rt)
    return memory_body(await rt.memory())


def memory_body(mem: MemoryStats) -> dict[str, Any]:
    """The /api/memory body: the ledger's snapshot, its peak and MLX's own counters."""
    body = attrs.asdict(mem.ledger)
    del body["consistent"]  # an invariant the tests check, not a reading
    over = attrs.asdict(mem.ledger.over_budget_bytes)
    body["over_budget_bytes"] = {tier: n for tier, n in over.items() if n}
    return {**body, "device_peak_bytes": mem.device_peak_bytes, "mlx": attrs.asdict(mem.mlx)}


@bp.get("/api/cache")
async def cache() -> Any:
    rt = runtime()
    require_ready(rt)
    check = request.args.get("check", "") in ("1", "true")
    return await rt.prefix_cache(check=check)


@bp.get("/metrics")
async def metrics() -> Any:
    rt = runtime()
    gauges: dict[str, Any] = {}
    if rt.ready:
        mem = (await rt.memory()).ledger
        tiers = {
            "weights": mem.weights_bytes,
            "live": mem.live_cache_bytes,
            **attrs.asdict(mem.cached_kv_bytes),
        }
        gauges["kvgrove_memory_bytes"] = ("Bytes held, by tier.", tiers)
        executor = rt.actors.get("executor")
        if executor is not None:  # whether the decode runs ahead, and what that wastes
            stats = executor.statistics()
            gauges["kvgrove_executor_steps"] = (
                "Executor steps; batched decodes run ahead (the overlap); rows run ahead and "
                "not taken; decodes run ahead and sampled in the same graph; continuations "
                "queued on the MLX thread behind their step.",
                {
                    "all": stats.steps,
                    "overlapped": stats.overlapped_steps,
                    "wasted_rows": stats.wasted_row_steps,
                    "fused": stats.fused_steps,
                    "queued": stats.queued_steps,
                },
                "kind",
            )
            gauges["kvgrove_mlx_thread_busy_seconds"] = (
                "Seconds the MLX thread spent running work (steps, prefix-cache copies) since "
                "start: against the wall time, whether it sets the server's pace.",
                {"all": round(stats.mlx_busy_seconds, 6)},
            )
        cache = await rt.prefix_cache()
        if cache.get("enabled"):
            gauges["kvgrove_prefix_cache_hit_ratio"] = (
                "Prompt tokens served from the prefix cache / prompt tokens looked up.",
                {"all": cache["hit_ratio"]},
            )
            gauges["kvgrove_prefix_cache_moved_bytes"] = (
                "Bytes moved between prefix-cache tiers, by move.",
                cache["moved_bytes"],
            )
            gauges["kvgrove_prefix_cache_nodes"] = (
                "Prefix-trie nodes, by tier.",
                cache["nodes_by_tier"],
            )
            gauges["kvgrove_prefix_cache_disk_degraded"] = (
                "1 while the disk tier fails to write (nodes are dropped instead), else 0.",
                {"disk": int(cache.get("disk_degraded", False))},
            )
            gauges["kvgrove_prefix_cache_disk_errors"] = (
                "Disk-tier errors since start, by operation.",
                {
                    "write": cache.get("disk_write_errors", 0),
                    "read": cache.get("disk_read_errors", 0),
                },
            )
    text = rt.metrics.render(gauges)
    return Response(text, mimetype="text/plain; version=0.0.4")
