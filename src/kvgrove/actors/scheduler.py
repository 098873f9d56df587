"""The scheduler actor: the trio shell around `SchedulerCore`.

It owns every sequence. Its loop: take all pending messages without blocking, deliver queued
tokens to reply channels with `send_nowait` (a full channel parks only that sequence), plan one
step (every decoding sequence in one batch, plus prefill chunks), hand it to the executor and
wait for the result. Messages that arrive while a step runs (cancellations above all) take
effect at the next step boundary.
"""

from __future__ import annotations

import collections
import math
import time

import trio

from kvgrove.actors.executor import ExecutorStats
from kvgrove.actors.messages import (
    Cancel,
    Done,
    ExecutorQuery,
    Failed,
    Follow,
    Match,
    Matched,
    Release,
    Resume,
    SchedulerQuery,
    Step,
    StepResult,
    Submit,
    continued,
)
from kvgrove.actors.plan import SchedulerCore, SeqState
from kvgrove.config import Settings

# While every sequence is parked the scheduler re-tries delivery at this interval, in case a
# Resume was lost to a full inbox.
PARKED_POLL_SECONDS = 0.05
# Handlers that are gone without a Cancel (lost to a full inbox) are looked for at most this
# often, not at every step: the look costs an allocation per sequence. A delivery to a gone
# handler notices it at once anyway.
ABANDONED_POLL_SECONDS = 0.05


class Scheduler:
    """Admission, batched step planning and token routing. Other actors hold only `inbox`.

    `kv_budget_bytes` bounds the live caches; None = their share of the device budget
    (`Settings.device_split`, with the weights asked of the executor when the scheduler starts).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        executor: trio.MemorySendChannel,
        pager: trio.MemorySendChannel | None = None,
        kv_budget_bytes: int | None = None,
    ) -> None:
        self._settings = settings
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.scheduler_inbox_items)
        self.core = SchedulerCore(
            chunk_tokens=settings.prefill_chunk_tokens,
            max_running=settings.max_running_sequences,
            kv_budget_bytes=kv_budget_bytes,
            share_prefills=pager is not None and settings.prefix_cache,
        )
        self._executor = executor
        self._pager = pager
        # Submitted requests waiting for the pager's Matched before admission.
        self._matching: dict[int, Submit] = {}
        # Releases the pager's full inbox refused; retried every loop.
        self._releases: list[int] = []
        # Admitted sequences matched again after waiting for another's prefill.
        self._rematching: set[int] = set()
        self._kv_budget_bytes = kv_budget_bytes
        # A following step replies twice (its continuation's result too).
        self._results_send, self._results = trio.open_memory_channel[StepResult](2)
        # Results still to come from the executor (2: a continuation runs after the one
        # running), and the items of the next one to come.
        self._in_flight = 0
        self._coming: tuple = ()
        # request id -> when its handler let go (for the cancellation tests), bounded.
        self.cancel_log: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._abandoned_checked_at = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Started by the supervisor after the executor."""
        with self._executor:
            if self._kv_budget_bytes is None:
                send, recv = trio.open_memory_channel[ExecutorStats](1)
                await self._executor.send(ExecutorQuery(send))
                weights = (await recv.receive()).weights_bytes
                self._kv_budget_bytes = self._settings.device_split(weights).live_bytes
            self.core.kv_budget_bytes = self._kv_budget_bytes
            task_status.started()
            while True:
                self._drain_inbox()
                self._send_releases()
                self._deliver_all()
                self._drop_abandoned()
                if self._in_flight:  # a continuation runs: ask for the next one, or hold
                    if self._in_flight == 1 and self._follow(self._coming):
                        await self._executor.send(Follow())
                        self._in_flight = 2
                    await self._take_result()
                    continue
                self._handle_stalls()
                items = self.core.plan_step()
                self._send_rematches()
                release = self.core.take_release()
                preempt = self.core.take_preempt()
                if not items and not release and not preempt:
                    if self._drop_abandoned(force=True):
                        continue  # before sleeping, every gone handler is noticed
                    await self._wait_for_message()
                    continue
                follow = not release and not preempt and self._follow(items)
                step = Step(items, release, self._results_send, preempt, follow=follow)
                await self._executor.send(step)
                self._in_flight, self._coming = (2 if follow else 1), items
                await self._take_result()

    def _follow(self, items: tuple) -> bool:
        """Whether the executor is to run the continuation of `items` unplanned (`Follow`)."""
        if not (self._settings.decode_follow and self.core.follows(items)):
            return False
        self.core.followed(len(items))
        return True

    async def _take_result(self) -> None:
        """The result of the step in flight; the continuation after it, if one runs, is fed
        each row's token (no continuation follows a step that failed as a whole)."""
        result = await self._results.receive()
        items, self._coming = self._coming, continued(result)
        self._in_flight = 0 if result.error is not None else self._in_flight - 1
        self._on_step_result(items, result)

    # -- messages -------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return
            self._handle(msg)

    async def _wait_for_message(self) -> None:
        parked = bool(self._releases) or any(s.parked for s in self.core.sequences())
        with trio.move_on_after(PARKED_POLL_SECONDS if parked else math.inf):
            self._handle(await self._inbox.receive())

    def _handle(self, msg: object) -> None:
        match msg:
            case Submit():
                self._submit(msg)
            case Matched(request_id=rid, cached_tokens=cached) if rid in self._rematching:
                self._rematching.discard(rid)
                if self.core.get(rid) is None:  # gone while the pager looked again
                    self._release(rid)
                else:
                    self.core.rematched(rid, cached)
            case Matched(request_id=rid, cached_tokens=cached):
                submit = self._matching.pop(rid, None)
                gone = submit is None or submit.reply.statistics().open_receive_channels == 0
                if gone:  # cancelled while the pager looked
                    self._release(rid)
                else:
                    self.core.admit(submit, cached_tokens=cached)
            case Cancel(request_id=rid, at_seconds=at):
                self.cancel_log[rid] = at
                while len(self.cancel_log) > 4096:
                    self.cancel_log.popitem(last=False)
                self._remove(rid, cancelled=True)
            case Resume(request_id=rid):
                seq = self.core.get(rid)
                if seq is not None:
                    self._deliver(seq)
            case SchedulerQuery(reply=reply):
                reply.send_nowait(self.core.statistics())
            case _:
                raise AssertionError(f"scheduler: unexpected message {msg!r}")

    def _submit(self, submit: Submit) -> None:
        """Ask the pager how much of the prompt is cached (it locks that much), then admit."""
        if self._pager is None or len(submit.prompt_tokens) < 2:
            self.core.admit(submit)
            return
        match = Match(submit.request_id, submit.namespace, submit.prompt_tokens, self.inbox)
        try:
            self._pager.send_nowait(match)
        except trio.WouldBlock:  # the pager is swamped: compute this prompt in full
            self.core.admit(submit)
            return
        self._matching[submit.request_id] = submit

    def _send_rematches(self) -> None:
        """Sequences that waited for another's prefill ask the pager for the longer match."""
        for rid in self.core.take_rematch():
            seq = self.core.get(rid)
            if seq is None:
                continue
            sub = seq.submit
            try:
                self._pager.send_nowait(Match(rid, sub.namespace, sub.prompt_tokens, self.inbox))
            except trio.WouldBlock:  # the pager is swamped: start from what it has
                self.core.rematched(rid, seq.cached_tokens)
                continue
            self._rematching.add(rid)

    def _remove(self, request_id: int, *, cancelled: bool) -> None:
        if self._matching.pop(request_id, None) is not None:
            self._release(request_id)  # the pager unlocks after its Match (FIFO)
            return
        seq = self.core.remove(request_id, cancelled=cancelled)
        if seq is not None and not seq.started:
            self._release(request_id)  # the executor never saw it: unlock its prefix here

    def _release(self, request_id: int) -> None:
        if self._pager is not None:
            self._releases.append(request_id)
            self._send_releases()

    def _send_releases(self) -> None:
        while self._releases:
            try:
                self._pager.send_nowait(Release(self._releases[0]))
            except trio.WouldBlock:
                return
            self._releases.pop(0)

    # -- delivery -------------------------------------------------------------------------

    def _deliver_all(self) -> None:
        for seq in list(self.core.sequences()):
            if seq.outbox:
                self._deliver(seq)

    def _deliver(self, seq: SeqState) -> None:
        """Move the outbox into the reply channel until it is full (then the sequence parks)."""
        reply = seq.submit.reply
        progressed = False
        while seq.outbox:
            try:
                reply.send_nowait(seq.outbox[0])
            except trio.WouldBlock:
                self.core.note_delivery(seq, progressed=progressed, blocked=True, now=_now())
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._remove(seq.request_id, cancelled=True)
                return
            msg = seq.outbox.popleft()
            progressed = True
            if isinstance(msg, Done | Failed):
                self._remove(seq.request_id, cancelled=False)
                reply.close()
        self.core.note_delivery(seq, progressed=progressed, blocked=False, now=_now())
        if seq.stall_parked:
            self.core.fill()  # drained: it may take a free slot again

    # -- stalled readers ------------------------------------------------------------------

    def _handle_stalls(self) -> None:
        """Stalled readers give their running slot back after stall_seconds; after
        stall_limit_seconds they are ended: the reply channel is closed, so the handler reads
        what is buffered and then ends its stream with an error."""
        now = _now()
        for seq in self.core.over_stall_limit(now, self._settings.stall_limit_seconds):
            self.core.stall_ended += 1
            self._remove(seq.request_id, cancelled=True)
            seq.submit.reply.close()
        self.core.park_stalled(now, self._settings.stall_seconds)

    def _drop_abandoned(self, *, force: bool = False) -> bool:
        """Drop sequences whose handler is gone (it closed its receive end): no need to wait
        for its Cancel. Returns whether any went."""
        now = _now()
        if not force and now - self._abandoned_checked_at < ABANDONED_POLL_SECONDS:
            return False
        self._abandoned_checked_at = now
        dropped = False
        for seq in list(self.core.sequences()):
            if seq.submit.reply.statistics().open_receive_channels == 0:
                self._remove(seq.request_id, cancelled=True)
                dropped = True
        return dropped

    def _on_step_result(self, items: tuple, result: StepResult) -> None:
        for rid, kept in result.kept:
            self.core.on_preempted(rid, kept)
        if result.error is not None:
            for seq in self.core.fail_items(items, result.error):
                self._deliver(seq)
            return
        for item, item_result in zip(items, result.results, strict=True):
            seq = self.core.on_result(item, item_result)
            if seq is not None:
                self._deliver(seq)

    def statistics(self):
        return self.core.statistics()


def _now() -> float:
    return time.monotonic()
