"""The accountant actor: owns the byte ledger and answers /api/memory.

Others tell it what they hold (`Charge`); it answers `MemoryQuery` with a frozen snapshot
(`MemoryStats`: the ledger's `statistics()`, the peak it has seen and MLX's own allocator
counters). It is the ledger's only writer and nobody else holds the ledger. Nothing is evicted
on its word: the prefix cache keeps its tiers within their budgets itself (it rebalances after
every store).
"""

from __future__ import annotations

import attrs
import mlx.core as mx
import trio

from kvgrove.actors.messages import Charge, Charges, MemoryQuery
from kvgrove.config import Settings
from kvgrove.memory.ledger import Budgets, Ledger, LedgerStats


@attrs.frozen
class MLXMemory:
    """MLX allocator counters (process-wide; cheap to read from any thread)."""

    active_bytes: int
    peak_bytes: int
    cache_bytes: int

    @classmethod
    def now(cls) -> MLXMemory:
        return cls(
            active_bytes=int(mx.get_active_memory()),
            peak_bytes=int(mx.get_peak_memory()),
            cache_bytes=int(mx.get_cache_memory()),
        )


@attrs.frozen
class MemoryStats:
    """What /api/memory shows: the ledger now, the most device bytes (weights + live + cached
    KV) any reading has shown, and MLX's own counters."""

    ledger: LedgerStats
    device_peak_bytes: int
    mlx: MLXMemory


class Accountant:
    """Holds the ledger; other actors hold only `inbox`."""

    def __init__(self, settings: Settings) -> None:
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.accountant_inbox_items)
        self._ledger = Ledger(
            Budgets(
                device_bytes=settings.device_budget_bytes,
                host_bytes=settings.host_budget_bytes,
                disk_bytes=settings.disk_budget_bytes,
            )
        )
        self._peak_device_bytes = 0

    def statistics(self) -> MemoryStats:
        return MemoryStats(self._ledger.statistics(), self._peak_device_bytes, MLXMemory.now())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ledger updates and queries until every sender is closed or cancelled."""
        task_status.started()
        async for msg in self._inbox:
            match msg:
                case Charge():
                    self._charge((msg,))
                case Charges(charges=charges):
                    self._charge(charges)
                case MemoryQuery(reply=reply):
                    reply.send_nowait(self.statistics())
                case _:
                    raise AssertionError(f"accountant: unexpected message {msg!r}")

    def _charge(self, charges: tuple[Charge, ...]) -> None:
        for c in charges:
            self._ledger.set(c.category, c.owner, c.nbytes)
        self._peak_device_bytes = max(self._peak_device_bytes, self._ledger.device_bytes)
