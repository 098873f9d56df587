"""The actors' one interface to the HTTP layer: the `Runtime` (a generation API and queries) and
the types a generation speaks in. http/ imports nothing else of actors/: it never builds an actor
message nor holds an inbox of its own.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from kvgrove.actors.accountant import MemoryStats
from kvgrove.actors.channels import ask
from kvgrove.actors.messages import CacheQuery, MemoryQuery
from kvgrove.actors.metrics import Metrics
from kvgrove.actors.registry import ModelLoadError
from kvgrove.actors.requests import (
    Finished,
    Generation,
    GenerationError,
    GenerationRequest,
    TextChunk,
)
from kvgrove.config import Settings

__all__ = [
    "Finished",
    "Generation",
    "GenerationError",
    "GenerationRequest",
    "MemoryStats",
    "ModelLoadError",
    "Runtime",
    "TextChunk",
    "current_lease",
]

# The model group the current HTTP request picked (a registry Lease), None = the server's own.
current_lease: contextvars.ContextVar[Any] = contextvars.ContextVar("kvgrove_lease", default=None)


@attrs.define
class LeasedGeneration(Generation):
    """A generation on a registry model: its lease ends when the stream does."""

    lease: Any = None

    async def stream(self) -> AsyncIterator[TextChunk | Finished]:
        try:
            async for event in Generation.stream(self):
                yield event
        finally:
            self.lease.release()


@attrs.define
class Runtime:
    settings: Settings
    metrics: Metrics = attrs.field(factory=Metrics)
    state: str = "loading"  # "loading" | "ready" | "stopping"
    default_loaded: Any = attrs.field(default=None, alias="loaded")  # the server's own model
    started_at: float = attrs.field(factory=time.time)
    # Set by serve.py (the composition root) as the actors start; the HTTP layer only reads.
    scheduler_inbox: trio.MemorySendChannel | None = None
    accountant_inbox: trio.MemorySendChannel | None = None
    pager_inbox: trio.MemorySendChannel | None = None
    # The actor objects (and the HTTP gate), for statistics() in tests and /metrics.
    actors: dict[str, Any] = attrs.field(factory=dict)
    registry: Any = None  # kvgrove.actors.registry.ModelRegistry: other models on demand

    @property
    def loaded(self) -> Any:
        """The LoadedModel of the request's model: the leased one, else the server's own."""
        lease = current_lease.get()
        return self.default_loaded if lease is None else lease.group.loaded

    @loaded.setter
    def loaded(self, value: Any) -> None:
        self.default_loaded = value

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def generation(self, request: GenerationRequest) -> Generation:
        lease = current_lease.get()
        if lease is not None:
            lease.transferred = True
            return LeasedGeneration(
                request=request,
                scheduler=lease.group.scheduler_inbox,
                tokenizer=lease.group.loaded.tokenizer,
                metrics=self.metrics,
                reply_channel_items=self.settings.reply_channel_items,
                lease=lease,
            )
        assert self.scheduler_inbox is not None and self.loaded is not None
        return Generation(
            request=request,
            scheduler=self.scheduler_inbox,
            tokenizer=self.loaded.tokenizer,
            metrics=self.metrics,
            reply_channel_items=self.settings.reply_channel_items,
        )

    async def lease(self, name: str, keep_alive_seconds: float | None) -> Any:
        """Lease model `name` from the registry for the current request (loading it on first
        use), so that `loaded` and `generation` use it; None when `name` is another name of the
        server's own model. Raises ModelLoadError."""
        lease = await self.registry.acquire(name, keep_alive_seconds)
        if lease is not None:
            current_lease.set(lease)
        return lease

    async def memory(self) -> MemoryStats:
        """The accountant's frozen snapshot (http turns it into the /api/memory body)."""
        return await ask(self.accountant_inbox, MemoryQuery)

    async def prefix_cache(self, *, check: bool = False) -> dict[str, Any]:
        """The prefix trie's summary (the /api/cache body); `check` runs check_integrity()."""
        return await ask(self.pager_inbox, lambda reply: CacheQuery(reply, check=check))
