"""The executor actor: owns the model, the step runner and the one MLX thread.

Each `Step` from the scheduler runs on the MLX thread (`kvgrove.actors.mlx_thread`) through the
sync `StepRunner` (`kvgrove.models.runner`), which owns the live caches and samplers. The trio
side only passes messages: with the prefix cache on, it asks the pager (`RestorePrefixes`) for
the prefixes a step starts from, and after the step hands it what to keep (`StorePrefixes`),
before the scheduler hears the result, so a request matched after it sees what was stored. A
running step is never interrupted: the await on it is shielded, and cancellation takes effect
between steps.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from kvgrove import timeline
from kvgrove.actors.messages import (
    Charge,
    Charges,
    ExecutorQuery,
    Follow,
    RestorePrefixes,
    Step,
    StepResult,
    StorePrefixes,
    UsePager,
    continued,
)
from kvgrove.actors.mlx_thread import MLXHandle, MLXThread, Queued
from kvgrove.config import Settings
from kvgrove.models.loading import load, on_gpu
from kvgrove.models.runner import StepRunner, overlap_on, str_error, wants_restore
from kvgrove.models.steps import ExecutorStats

log = logging.getLogger(__name__)

# At most this long between the pager's tier figures reaching the accountant while steps run.
STORE_REFRESH_SECONDS = 0.25

__all__ = ["Executor", "ExecutorStats", "MLXThread", "str_error"]

_CLOSED = object()  # held in place of a message: the inbox ended while a step ran


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
        self.runner = StepRunner(
            chunk_tokens=settings.prefill_chunk_tokens,
            batch_prefill=settings.batch_prefill,
            overlap=overlap_on(settings),
            ragged_attention=settings.ragged_attention,
            host_exp=settings.host_exp,
        )
        self.runner.share_min_tokens = settings.share_prefill_min_tokens_for(on_gpu())
        self.settings = settings
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.executor_inbox_items)
        self._accountant = accountant
        self._loader = loader
        self._thread = MLXThread()
        self.loaded: Any = None  # kvgrove.models.loading.LoadedModel once started
        self._pager: trio.MemorySendChannel | None = None  # set by the pager's UsePager
        self._charged: dict[tuple[str, str], int] = {}  # what the accountant was last told
        self._last: tuple[Step, StepResult] | None = None  # what a `Follow` continues
        self._stored_live: int | None = None  # the live bytes the pager was last told
        self._stored_at = -math.inf  # when (time.monotonic())
        # Messages taken from the inbox while a step ran (`_watch`), handled first.
        self._held: collections.deque[object] = collections.deque()
        # A continuation queued on the MLX thread behind the step that runs (`_watch`).
        self._queued: Queued | None = None
        self._ran: StepResult | None = None  # the MLX thread's last step's (`_run_step`)
        self.queued_steps = 0  # continuations that ran so (`_run_continuation`)

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """New settings take effect at the next step (the runner's chunk size, batch prefill)."""
        self._settings = settings
        self.runner.chunk_tokens = settings.prefill_chunk_tokens
        self.runner.batch_prefill = settings.batch_prefill
        self.runner.overlap = overlap_on(settings)

    @property
    def mlx(self) -> MLXHandle:
        """The pager's handle to the one MLX thread."""
        return MLXHandle(self._thread, self.runner.own_caches)

    @property
    def step_log(self) -> Any:
        return self.runner.step_log

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the model on the MLX thread, report it through task_status, then serve steps."""
        self._thread.start()
        try:
            self.loaded = await self._thread.call(self._load)
            with self._accountant:
                await self._accountant.send(Charge("weights", "model", self.loaded.info.nbytes))
                task_status.started(self.loaded)
                while True:
                    # What is already queued runs without a checkpoint first: a `Follow` sent
                    # while the last continuation ran goes to the MLX thread before the
                    # scheduler takes that one's result, so the device gets its next step first.
                    if self._held:
                        msg = self._held.popleft()
                    else:
                        try:
                            msg = self._inbox.receive_nowait()
                        except trio.WouldBlock:
                            try:
                                msg = await self._inbox.receive()
                            except trio.EndOfChannel:
                                break
                        except trio.EndOfChannel:
                            break
                    if msg is _CLOSED:
                        break
                    await self._handle(msg)
        finally:
            # Graceful or not, the pager's at-stop work (the prefix cache to disk) runs first.
            with trio.CancelScope(shield=True):
                try:
                    await self._thread.close()
                except Exception:
                    log.exception("writing the prefix cache to disk failed")

    def _load(self) -> Any:
        loaded = (self._loader or load)(self.settings.model)
        self.runner.use_model(loaded.model, loaded.tokenizer)
        return loaded

    async def _handle(self, msg: object) -> None:
        match msg:
            case Step():
                # A followed step runs ahead (its continuation is certain); its `ahead` is the
                # continuation's.
                step = attrs.evolve(msg, ahead=True) if msg.follow else msg
                if msg.follow and self.settings.queued_continuations:
                    await self._answer(step, follow_ahead=msg.ahead)
                else:
                    await self._answer(step)
                if msg.follow:  # its continuation runs now, not after the scheduler's word
                    await self._handle(Follow(msg.ahead))
            case Follow(ahead=ahead):
                queued, self._queued = self._queued, None
                if self._last is not None and self._last[1].error is None:
                    step, result = self._last
                    # The same continuation `_run_continuation` builds on the MLX thread.
                    follow = Step(continued(result), (), step.reply, ahead=ahead)
                    if queued is None and self.settings.queued_continuations:  # came after its step
                        queued = self._thread.submit(self._run_step, follow)
                    if queued is None:  # as any step (tensor parallel answers a lost rank)
                        await self._handle(follow)
                    else:
                        await self._answer(follow, queued=queued)
                elif queued is not None:
                    await queued.result()  # it found the step failed: it ran nothing
            case UsePager(channel=channel, charged=charged):
                self._pager = channel
                self.runner.keeping = True
                for tier, nbytes in charged:  # the accountant holds these already
                    if nbytes:
                        self._charged[(tier, "prefix")] = nbytes
            case ExecutorQuery(reply=reply):
                reply.send_nowait(self.statistics())
            case _:
                raise AssertionError(f"executor: unexpected message {msg!r}")

    async def _answer(self, step: Step, **how: Any) -> None:
        """Run `step` (`how`: see `_step`) and send its result; a `Follow` continues it."""
        self._last = None  # a step that fails on its way leaves nothing to continue
        start = time.perf_counter()
        result = await self._step(step, **how)
        step.reply.send_nowait(result)
        if (rec := timeline.recorder) is not None:
            rec.add("exec", start, end=time.perf_counter(), items=len(step.items))
        self._last = (step, result)

    def _run_step(self, step: Step) -> StepResult:
        """On the MLX thread: the whole step (the seam tensor parallel wraps)."""
        self._ran = None
        result = self.runner.run(step)
        self._ran = result
        return result

    def _run_continuation(self, ahead: bool) -> StepResult | None:
        """On the MLX thread, right after the step before it: its continuation (`Follow`), or
        nothing if that step failed as a whole."""
        last = self._ran
        if last is None or last.error is not None:
            return None
        self.queued_steps += 1
        return self._run_step(Step(continued(last), (), None, ahead=ahead))

    async def _watch(self) -> None:
        """While a continuation runs: take the next message; a `Follow`
        queues its continuation on the MLX thread at once, behind the running step, so it starts
        the moment that one ends (on the H200 the MLX thread otherwise waited 1.5-3.4 ms for
        the GIL before each step, while the trio thread streamed the last step's tokens)."""
        try:
            msg = await self._inbox.receive()
        except trio.EndOfChannel:
            msg = _CLOSED
        if isinstance(msg, Follow) and self._queued is None:
            self._queued = self._thread.submit(self._run_continuation, msg.ahead)
        self._held.append(msg)

    async def _step(
        self, step: Step, queued: Queued | None = None, follow_ahead: bool | None = None
    ) -> StepResult:
        """Run `step` (or await `queued`, the same already on its way); `follow_ahead`: the
        step is followed, its continuation (with that `ahead`) is queued behind it at once."""
        kept: dict[int, int] = {}
        if queued is not None:  # already on its way: `_run_continuation`
            result = await self._watching(queued)
            if result is None:  # cannot be: the step before it did not fail
                raise AssertionError("a queued continuation found its step failed")
        elif follow_ahead is not None:
            running = self._thread.submit(self._run_step, step)
            self._queued = self._thread.submit(self._run_continuation, follow_ahead)
            result = await running.result()
        elif self._pager is not None and wants_restore(step.items):
            # What the step releases is stored first, then the pager restores what it starts
            # from, then the items run: the order of one step without the prefix cache.
            result = await self._thread.call(self.runner.begin, step)
            if result is None:
                stored = await self._store(None)
                kept.update(stored.kept)
                requests = await self._thread.call(self.runner.restore_requests, step.items)
                start = time.perf_counter()
                restored = await self._ask_pager(lambda r: RestorePrefixes(tuple(requests), r))
                if (rec := timeline.recorder) is not None:
                    rec.add("restore", start, end=time.perf_counter(), requests=len(requests))
                result = await self._thread.call(self.runner.run_items, step, restored.caches)
        else:
            result = await self._thread.call(self._run_step, step)
        return await self._after_step(step, result, kept)

    async def _watching(self, running: Queued) -> StepResult:
        """The result of the running step, the inbox watched meanwhile (`_watch`): only while
        no message is held and no continuation is queued yet."""
        if self._held or self._queued is not None:
            return await running.result()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            result = await running.result()
            nursery.cancel_scope.cancel()
        return result

    async def _after_step(self, step: Step, result: StepResult, kept: dict[int, int]):
        charges = {("live", str(rid)): 0 for rid in (*step.release, *step.preempt)}
        for r in result.results:
            charges[("live", str(r.request_id))] = r.cache_bytes
        if self._pager is not None and self._store_due(charges):
            live = {**{k: n for k, n in self._charged.items() if k[0] == "live"}, **charges}
            stored = await self._store(sum(live.values()))
            kept.update(stored.kept)
            for tier, nbytes in stored.tier_bytes:
                charges[(tier, "prefix")] = nbytes
            result = attrs.evolve(
                result, kept=tuple((rid, kept.get(rid, n)) for rid, n in result.kept)
            )
        await self._send_charges(charges)
        return result

    def _store_due(self, charges: dict[tuple[str, str], int]) -> bool:
        """Whether the pager hears of this step: something to store, live bytes it was not told
        (it fits the device tier beside them), or its tier figures last read STORE_REFRESH_SECONDS
        ago (Match/Release move nodes between tiers too). A plain decode step mostly changes
        none of them, and its round trip (a message, a call on the MLX thread, the answer) cost
        a steady single stream on the H200 ~25% of its speed (148 tok/s with the prefix cache
        off, 109 with it on, in one run of benchmarks/gpu_server.py)."""
        if self.runner.has_keeps or self.runner.live_sequences == 0:
            return True
        live = {**{k: n for k, n in self._charged.items() if k[0] == "live"}, **charges}
        if sum(live.values()) != self._stored_live:
            return True
        return time.monotonic() - self._stored_at >= STORE_REFRESH_SECONDS

    async def _store(self, live_bytes: int | None) -> Any:
        keeps = tuple(self.runner.take_keeps())  # the thread is idle: the step returned
        start = time.perf_counter()
        stored = await self._ask_pager(lambda r: StorePrefixes(keeps, live_bytes, r))
        if (rec := timeline.recorder) is not None:
            rec.add("store", start, end=time.perf_counter(), keeps=len(keeps))
        if live_bytes is not None:
            self._stored_live, self._stored_at = live_bytes, time.monotonic()
        return stored

    async def _ask_pager(self, make: Callable[[trio.MemorySendChannel], object]) -> Any:
        send, recv = trio.open_memory_channel[Any](1)
        await self._pager.send(make(send))
        return await recv.receive()

    async def _send_charges(self, charges: dict[tuple[str, str], int]) -> None:
        """Tell the accountant in one message: no reading ever shows half a step's update. Only
        what changed goes (a decode step mostly changes nothing: the batch grows in blocks), and
        nothing when nothing did: no message, no yield between a step and the next."""
        charges = {k: n for k, n in charges.items() if self._charged.get(k, 0) != n}
        if not charges:
            return
        batch = tuple(Charge(category, owner, n) for (category, owner), n in charges.items())
        await self._accountant.send(Charges(batch))
        for key, nbytes in charges.items():
            if nbytes:
                self._charged[key] = nbytes
            else:
                self._charged.pop(key, None)

    def statistics(self) -> ExecutorStats:
        r = self.runner
        return ExecutorStats(
            steps=r.steps,
            items=r.items,
            live_sequences=r.live_sequences,
            tokens_computed=r.tokens,
            weights_bytes=self.loaded.info.nbytes if self.loaded is not None else 0,
            batch_rows=r.batch_rows,
            max_batch_rows=r.max_batch_rows,
            batched=r.batched,
            overlapped_steps=r.overlapped_steps,
            wasted_row_steps=r.wasted_row_steps,
            fused_steps=r.fused_steps,
            queued_steps=self.queued_steps,
            mlx_busy_seconds=self._thread.busy_seconds,
        )
