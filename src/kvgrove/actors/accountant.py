"""The accountant actor: owns the byte ledger and answers /api/memory.

Others tell it what they hold (`Charge`); it answers `MemoryQuery` with the ledger plus MLX's
own allocator counters. When a tier is over budget it tells the pager (`Pressure`), which will
evict once the prefix cache exists.
"""

from __future__ import annotations

import mlx.core as mx
import trio

from kvgrove.actors.messages import Charge, Charges, MemoryQuery
from kvgrove.config import Settings
from kvgrove.memory.ledger import Budgets, Ledger


def mlx_memory() -> dict[str, int]:
    """MLX allocator counters (process-wide; cheap to read from any thread)."""
    return {
        "active_bytes": int(mx.get_active_memory()),
        "peak_bytes": int(mx.get_peak_memory()),
        "cache_bytes": int(mx.get_cache_memory()),
    }


class Accountant:
    """Holds the ledger; other actors hold only `inbox`."""

    def __init__(self, settings: Settings) -> None:
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.accountant_inbox_items)
        self.ledger = Ledger(
            Budgets(
                device_bytes=settings.device_budget_bytes,
                host_bytes=settings.host_budget_bytes,
                disk_bytes=settings.disk_budget_bytes,
            )
        )
        # The most device bytes (weights + live + reserved + cached KV) any reading has shown.
        self.peak_device_bytes = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ledger updates and queries until every sender is closed or cancelled."""
        task_status.started()
        async for msg in self._inbox:
            match msg:
                case Charge(category=category, owner=owner, nbytes=nbytes):
                    self.ledger.set(category, owner, nbytes)
                    self.peak_device_bytes = max(self.peak_device_bytes, self.ledger.device_bytes)
                case Charges(charges=charges):
                    for c in charges:
                        self.ledger.set(c.category, c.owner, c.nbytes)
                    self.peak_device_bytes = max(self.peak_device_bytes, self.ledger.device_bytes)
                case MemoryQuery(reply=reply):
                    reply.send_nowait(
                        {
                            **self.ledger.snapshot(),
                            "device_peak_bytes": self.peak_device_bytes,
                            "mlx": mlx_memory(),
                        }
                    )
                case _:
                    raise AssertionError(f"accountant: unexpected message {msg!r}")
