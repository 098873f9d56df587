"""What the HTTP layer holds of the running server: actor inboxes, the model, the metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from kvgrove.actors.metrics import Metrics
from kvgrove.actors.requests import Generation, GenerationRequest
from kvgrove.config import Settings


@attrs.define
class Runtime:
    settings: Settings
    metrics: Metrics = attrs.field(factory=Metrics)
    state: str = "loading"  # "loading" | "ready" | "stopping"
    loaded: Any = None  # LoadedModel once ready
    started_at: float = attrs.field(factory=time.time)
    ready_at: float | None = None
    scheduler_inbox: trio.MemorySendChannel | None = None
    accountant_inbox: trio.MemorySendChannel | None = None
    pager_inbox: trio.MemorySendChannel | None = None
    executor_inbox: trio.MemorySendChannel | None = None
    # The actor objects themselves, for statistics() in tests and /metrics; never mutated here.
    actors: dict[str, Any] = attrs.field(factory=dict)

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def generation(self, request: GenerationRequest) -> Generation:
        assert self.scheduler_inbox is not None and self.loaded is not None
        return Generation(
            request=request,
            scheduler=self.scheduler_inbox,
            tokenizer=self.loaded.tokenizer,
            metrics=self.metrics,
            reply_channel_items=self.settings.reply_channel_items,
        )

    async def ask(self, inbox: trio.MemorySendChannel, make: Callable[[Any], Any]) -> Any:
        """Send make(reply_channel) to an actor and wait for its one reply."""
        send, recv = trio.open_memory_channel[Any](1)
        with send, recv:
            await inbox.send(make(send))
            return await recv.receive()
