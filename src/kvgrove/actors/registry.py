"""Several models on demand: one actor group (executor, pager, scheduler) per loaded model.

The server's own model (`--model`) is composed by serve.py and stays loaded; this registry owns
the others. A request naming another model `acquire`s a lease on its group: the first request
starts the group (the load runs on the group's own MLX thread, so requests to models already
loaded keep running), later ones wait for it for as long as the load keeps making progress (a
request fails once `model_load_timeout_seconds` pass with none). Which groups unload, and when,
is `kvgrove.models.residency`'s policy. Each group has its own accountant too: the server's
ledger (/api/memory) keeps describing the server's own model.

The registry is the only owner of its groups; the HTTP layer holds leases (see Runtime).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio

from kvgrove.actors.engine import start_engine
from kvgrove.config import Settings
from kvgrove.models import residency
from kvgrove.models.loading import find, load

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """The model could not be loaded (unknown name, unsupported file, or the load timed out)."""


@attrs.define(eq=False)
class ModelGroup:
    key: str
    name: str
    ready: trio.Event = attrs.field(factory=trio.Event)
    stopped: trio.Event = attrs.field(factory=trio.Event)
    loaded: Any = None
    scheduler_inbox: trio.MemorySendChannel | None = None
    actors: dict[str, Any] = attrs.field(factory=dict)
    error: BaseException | None = None
    leases: int = 0
    keep_alive: float = 300.0  # seconds; < 0 = forever
    idle_since: float = 0.0  # trio clock
    last_used: float = attrs.field(factory=time.monotonic)
    load_started: float = attrs.field(factory=time.time)
    cancel: trio.CancelScope | None = None
    progress: float = 0.0  # fraction of the load done, as the loader reports it

    def expires_at(self) -> float | None:
        """Wall-clock time it unloads if nothing uses it (None = never, or in use)."""
        return residency.expires_at(self, time.time(), trio.current_time())


@attrs.define(eq=False)
class Lease:
    """One request's hold on a group; `release` exactly once (idempotent)."""

    group: ModelGroup
    registry: ModelRegistry
    transferred: bool = False  # a Generation now releases it when its stream ends
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.registry._release(self.group)


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        *,
        loader: Callable[[str], Any] | None = None,
        own_path: str | None = None,
    ) -> None:
        self.settings = settings
        self._own_path = own_path  # the server's own model: never loaded twice
        self.own_aliases: set[str] = set()  # other names that led to it (accepted as its names)
        self._loader = loader
        self._groups: dict[str, ModelGroup] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self.loads = 0
        self.unloads = 0

    @property
    def groups(self) -> list[ModelGroup]:
        return list(self._groups.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._reap()

    async def _reap(self) -> None:
        """Unload idle groups whose keep_alive has passed; sleep until the next one is due."""
        while True:
            expired, next_due = residency.due(list(self._groups.values()), trio.current_time())
            for group in expired:
                self._unload(group, "keep_alive passed")
            self._wake = trio.Event()
            with trio.move_on_at(next_due):
                await self._wake.wait()

    def _release(self, group: ModelGroup) -> None:
        group.leases -= 1
        if group.leases == 0:
            group.idle_since = trio.current_time()
            self._wake.set()

    def _unload(self, group: ModelGroup, why: str) -> None:
        if self._groups.get(group.key) is group:
            del self._groups[group.key]
        if group.cancel is not None:
            log.info("unloading %s (%s)", group.name, why)
            self.unloads += 1
            group.cancel.cancel()

    def _make_room(self, incoming_bytes: int) -> None:
        """Unload least recently used idle groups while the new one would not fit."""
        while group := residency.make_room(self._groups.values(), self.settings, incoming_bytes):
            self._unload(group, "least recently used, making room")

    async def acquire(self, name: str, keep_alive: float | None = None) -> Lease | None:
        """A lease on `name`'s group, loading it first if needed (ModelLoadError if it can't).
        Names only: a request never makes the server open a file path of its choosing.
        None when the name leads to the server's own model (another alias of it)."""
        try:
            found = await trio.to_thread.run_sync(partial(find, name, paths=False))
        except (FileNotFoundError, ValueError) as e:
            raise ModelLoadError(str(e)) from None
        key = str(found.path)
        if key == self._own_path:
            self.own_aliases.add(name)
            return None
        group = self._groups.get(key)
        if group is None:
            self._make_room(residency.size_on_disk(found.path))
            group = ModelGroup(key=key, name=found.name)
            self._groups[key] = group
            assert self._nursery is not None
            self._nursery.start_soon(self._run_group, group, name)
        group.leases += 1
        group.keep_alive = residency.keep_alive(group, keep_alive, self.settings)
        lease = Lease(group, self)
        try:
            await self._wait_loaded(group)
        except BaseException as e:
            lease.release()
            if isinstance(e, trio.TooSlowError):
                raise ModelLoadError(
                    f"model {name!r} made no loading progress for "
                    f"{self.settings.model_load_timeout_seconds:g} seconds "
                    f"({group.progress:.0%} read)"
                ) from None
            raise
        if group.error is not None:
            lease.release()
            raise ModelLoadError(f"model {name!r} failed to load: {group.error}")
        group.last_used = time.monotonic()
        return lease

    async def _wait_loaded(self, group: ModelGroup) -> None:
        """Wait for the group to be ready; TooSlowError once a whole timeout passes with no
        loading progress (a big model that keeps reading is waited for)."""
        seen = -1.0
        while not group.ready.is_set():
            if group.progress <= seen:
                raise trio.TooSlowError
            seen = group.progress
            with trio.move_on_after(self.settings.model_load_timeout_seconds):
                await group.ready.wait()

    async def _run_group(self, group: ModelGroup, name: str) -> None:
        settings = residency.group_settings(self.settings, group.key, name)

        def loader(_: str) -> Any:
            if self._loader is not None:
                return self._loader(name)
            # The progress is read on the trio thread: one float, no lock.
            return load(name, progress=lambda fraction: setattr(group, "progress", fraction))

        try:
            with trio.CancelScope() as scope:
                group.cancel = scope
                async with trio.open_nursery() as actors:
                    # A ledger of its own: the server's ledger keeps describing its own model.
                    engine = await start_engine(actors, settings, loader=loader)
                    group.loaded = engine.loaded
                    group.scheduler_inbox = engine.scheduler.inbox
                    group.actors.update(engine.actors)
                    group.idle_since = trio.current_time()
                    self.loads += 1
                    log.info("loaded %s on demand", group.name)
                    group.ready.set()
                    await trio.sleep_forever()
        except Exception as e:  # the load failed: requests waiting for it get the error
            while isinstance(e, ExceptionGroup) and len(e.exceptions) == 1:
                e = e.exceptions[0]  # the actor's own error, not the nursery's wrapper
            log.warning("loading %s failed: %s", name, e)
            group.error = e
        finally:
            if group.loaded is None and group.error is None:
                group.error = ModelLoadError("unloaded before it finished loading")
            if self._groups.get(group.key) is group and group.error is not None:
                del self._groups[group.key]
            group.ready.set()
            group.stopped.set()
