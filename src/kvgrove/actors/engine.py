"""The engine: the four actors behind every generation, composed in one place.

`start_engine` starts, in order and each with `nursery.start` (so each runs before the next
needs it), the accountant, the executor (which loads the model on its MLX thread), the pager
(given that thread) and the scheduler. serve.py composes the server's own model with it, the
registry each model it loads on demand, `kvgrove run` its one generation, and the tests their
actors: one wiring, so what is tested is what serves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import trio

from kvgrove.actors.accountant import Accountant
from kvgrove.actors.executor import Executor
from kvgrove.actors.messages import Charge, Charges
from kvgrove.actors.pager import Pager
from kvgrove.actors.scheduler import Scheduler
from kvgrove.config import Settings


@attrs.frozen
class Engine:
    """The running actors of one model and the model they loaded."""

    loaded: Any  # kvgrove.models.loading.LoadedModel
    accountant: Accountant
    executor: Executor
    pager: Pager
    scheduler: Scheduler

    @property
    def actors(self) -> dict[str, Any]:
        """By name, for statistics() (tests, /metrics)."""
        return {
            "accountant": self.accountant,
            "executor": self.executor,
            "pager": self.pager,
            "scheduler": self.scheduler,
        }


async def start_engine(
    nursery: trio.Nursery,
    settings: Settings,
    *,
    loader: Callable[[str | None], Any] | None = None,
    executor_factory: Callable[..., Executor] = Executor,
    kv_budget_bytes: int | None = None,
    watch_charges: Callable[[Charge], None] | None = None,
) -> Engine:
    """Start the actors in `nursery` (they run until it is cancelled); return once the model is
    loaded and every actor is running. `loader` replaces kvgrove.models.loading.load;
    `executor_factory` makes the executor (tensor parallel passes rank 0's); `kv_budget_bytes`
    bounds the live caches (None = their share of the device budget, as served).

    `watch_charges` (the cache oracle's budget check) is called with every `Charge` on its way
    to the accountant, before the accountant applies it, through an unbuffered relay: a sender
    is never more than one message ahead of the watcher, and the executor charges after every
    step, so the watcher sees every step's figures."""
    accountant = Accountant(settings)
    await nursery.start(accountant.run)
    charges = accountant.inbox
    if watch_charges is not None:
        charges = await nursery.start(_watch, accountant.inbox.clone(), watch_charges)
    executor = executor_factory(settings, accountant=charges.clone(), loader=loader)
    loaded = await nursery.start(executor.run)
    pager = Pager(
        settings,
        mlx=executor.mlx,
        loaded=loaded,
        executor=executor.inbox.clone(),
        accountant=charges.clone(),
    )
    await nursery.start(pager.run)
    scheduler = Scheduler(
        settings,
        executor=executor.inbox.clone(),
        pager=pager.inbox.clone(),
        kv_budget_bytes=kv_budget_bytes,
    )
    await nursery.start(scheduler.run)
    return Engine(loaded, accountant, executor, pager, scheduler)


async def _watch(
    accountant: trio.MemorySendChannel,
    watch: Callable[[Charge], None],
    *,
    task_status: trio.TaskStatus[trio.MemorySendChannel] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Relay every message to the accountant unchanged, showing `watch` its charges first."""
    send, recv = trio.open_memory_channel[object](0)
    async with accountant, recv:
        task_status.started(send)
        async for msg in recv:
            for charge in msg.charges if isinstance(msg, Charges) else (msg,):
                if isinstance(charge, Charge):
                    watch(charge)
            await accountant.send(msg)
