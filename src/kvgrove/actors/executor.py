"""The executor actor: owns the model, the live caches and the one OS thread that runs MLX.

MLX streams belong to the thread that made them, and trio's thread cache does not promise the
same thread twice, so every MLX call (loading, each step) goes to one dedicated thread through
`MLXThread.call`. The trio side only passes messages; the caches and samplers are touched on the
MLX thread alone. A running step is never interrupted: the await on it is shielded, and
cancellation takes effect between steps.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from kvgrove.actors.messages import (
    Charge,
    ExecutorQuery,
    ItemResult,
    Step,
    StepItem,
    StepResult,
)
from kvgrove.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class MLXThread:
    """One OS thread that runs submitted functions in order; results come back into trio."""

    def __init__(self, name: str = "kvgrove-mlx") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.ident: int | None = None

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        self.ident = threading.get_ident()
        while (work := self._queue.get()) is not None:
            work()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the thread and return its result; shielded (work is never torn)."""
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:
                box["error"] = e
            token.run_sync_soon(finished.set)

        self._queue.put(work)
        with trio.CancelScope(shield=True):
            await finished.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


@attrs.frozen
class ExecutorStats:
    steps: int
    items: int
    live_sequences: int
    tokens_computed: int


@attrs.define
class _Live:
    cache: list[Any]
    sampler: Any


class Executor:
    """Loads the model, then runs `Step`s from its inbox on the MLX thread.

    `step_log` keeps (request_id, start, end) in time.monotonic() seconds for recent items, so
    tests can prove no work ran for a request after it was cancelled.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        accountant: trio.MemorySendChannel,
        loader: Callable[[str | None], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.executor_inbox_items)
        self._accountant = accountant
        self._loader = loader
        self._thread = MLXThread()
        self.loaded: Any = None  # kvgrove.models.loading.LoadedModel once started
        self._live: dict[int, _Live] = {}  # touched on the MLX thread only
        self.step_log: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=100_000
        )
        self._steps = 0
        self._items = 0
        self._tokens = 0

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the model on the MLX thread, report it through task_status, then serve steps."""
        self._thread.start()
        try:
            self.loaded = await self._thread.call(self._load)
            with self._accountant:
                await self._accountant.send(Charge("weights", "model", self.loaded.info.nbytes))
                task_status.started(self.loaded)
                async for msg in self._inbox:
                    await self._handle(msg)
        finally:
            self._thread.stop()

    def _load(self) -> Any:
        if self._loader is not None:
            return self._loader(self.settings.model)
        from kvgrove.models.loading import load

        return load(self.settings.model)

    async def _handle(self, msg: object) -> None:
        match msg:
            case Step():
                result = await self._thread.call(self._run_step, msg)
                for rid in msg.release:
                    await self._accountant.send(Charge("live", str(rid), 0))
                for r in result.results:
                    await self._accountant.send(Charge("live", str(r.request_id), r.cache_bytes))
                msg.reply.send_nowait(result)
            case ExecutorQuery(reply=reply):
                reply.send_nowait(self.statistics())
            case _:
                raise AssertionError(f"executor: unexpected message {msg!r}")

    # -- on the MLX thread ----------------------------------------------------------------

    def _run_step(self, step: Step) -> StepResult:
        import mlx.core as mx

        for rid in step.release:
            self._live.pop(rid, None)
        if step.release and not self._live:
            mx.clear_cache()
        self._steps += 1
        results = []
        try:
            for item in step.items:
                results.append(self._run_item(item))
        except Exception as e:  # the whole step fails; the scheduler ends its sequences
            log.exception("step failed")
            for item in step.items:
                self._live.pop(item.request_id, None)
            return StepResult((), error=f"generation failed: {e}")
        return StepResult(tuple(results))

    def _run_item(self, item: StepItem) -> ItemResult:
        import mlx.core as mx

        from kvgrove.models.caches import cache_nbytes, make_cache
        from kvgrove.models.generate import forward, prefill_chunks
        from kvgrove.sampling import SequenceSampler, sample_batch

        start = time.monotonic()
        model = self.loaded.model
        if item.start is not None:
            s = item.start
            sampler = SequenceSampler(s.params, s.prompt_tokens, context_limit=s.context_tokens)
            self._live[item.request_id] = _Live(make_cache(model), sampler)
        live = self._live[item.request_id]
        tokens = item.tokens
        feed = tokens[:-1] if item.sample else tokens
        if feed:
            for _ in prefill_chunks(model, live.cache, feed, chunk_tokens=len(feed)):
                pass
        token = logprob = top = None
        if item.sample:
            logits = forward(model, live.cache, mx.array(tokens[-1:], dtype=mx.uint32)[None])
            choice = sample_batch(logits, [live.sampler]).row(0)
            live.sampler.accept(choice.token)
            token, logprob, top = choice.token, choice.logprob, choice.top_logprobs
        end = time.monotonic()
        self._items += 1
        self._tokens += len(tokens)
        self.step_log.append((item.request_id, start, end))
        return ItemResult(
            item.request_id, token, logprob, top, end - start, cache_nbytes(live.cache)
        )

    def statistics(self) -> ExecutorStats:
        return ExecutorStats(
            steps=self._steps,
            items=self._items,
            live_sequences=len(self._live),
            tokens_computed=self._tokens,
        )
