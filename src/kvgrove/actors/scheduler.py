"""The scheduler actor: the trio shell around `SchedulerCore`.

It owns every sequence. Its loop: take all pending messages without blocking, deliver queued
tokens to reply channels with `send_nowait` (a full channel parks only that sequence), plan one
step (every decoding sequence in one batch, plus prefill chunks), hand it to the executor and
wait for the result. Submissions and the pager's answers that arrive while a step runs are
handled at once (a prompt's prefix lookup starts then); other messages (cancellations above
all) take effect at the next step boundary. A plain decode step is followed by its
continuation without waiting for this loop (`kvgrove.scheduling.follow`): its tokens are
routed while the next runs.
"""

from __future__ import annotations

import collections
import math
import time

import trio

from kvgrove import timeline
from kvgrove.actors.channels import ask, sender
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
)
from kvgrove.config import Settings
from kvgrove.models.loading import on_gpu
from kvgrove.models.steps import ExecutorStats
from kvgrove.scheduling.core import SchedulerCore
from kvgrove.scheduling.follow import InFlight
from kvgrove.scheduling.prefix_locks import PrefixLocks
from kvgrove.scheduling.sequence import SeqState

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
        gpu = on_gpu()
        self.core = SchedulerCore(
            chunk_tokens=settings.prefill_chunk_tokens,
            max_running=settings.max_running_sequences,
            kv_budget_bytes=kv_budget_bytes,
            share_prefills=pager is not None and settings.prefix_cache,
            min_prefix_tokens=settings.min_prefix_tokens,
            step_tokens=settings.prefill_step_tokens_for(gpu),
            share_min_tokens=settings.share_prefill_min_tokens_for(gpu),
        )
        self._executor = executor
        match = release = None
        if pager is not None:
            match = sender(pager, lambda rid, ns, tokens: Match(rid, ns, tokens, self.inbox))
            release = sender(pager, Release)
        self.locks = PrefixLocks(self.core, match=match, release=release)
        # The same objects, under the names the oracle's driver reads.
        self._matching, self._releases = self.locks.matching, self.locks.releases
        self._kv_budget_bytes = kv_budget_bytes
        # Results to come: a followed step replies twice (`kvgrove.scheduling.follow`).
        self.in_flight = InFlight(self.core, enabled=settings.decode_follow)
        self._results_send, self._results = trio.open_memory_channel[StepResult](2)
        # request id -> when its handler let go (for the cancellation tests), bounded.
        self.cancel_log: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._abandoned_checked_at = -math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled. Started by the supervisor after the executor."""
        with self._executor:
            if self._kv_budget_bytes is None:
                stats: ExecutorStats = await ask(self._executor, ExecutorQuery)
                self._kv_budget_bytes = self._settings.device_split(stats.weights_bytes).live_bytes
            self.core.kv_budget_bytes = self._kv_budget_bytes
            task_status.started()
            while True:
                self._drain_inbox()
                self.locks.send_releases()
                self._deliver_all()
                self._drop_abandoned()
                if self.in_flight.following:  # a continuation runs: one more, or hold
                    granted, ahead = self.in_flight.grant()
                    if granted:
                        await self._executor.send(Follow(ahead))
                    await self._take_result()
                    continue
                self._handle_stalls()
                await self._gather_matches()
                items = self.core.plan_step()
                self.locks.send_rematches()
                release = self.core.take_release()
                preempt = self.core.take_preempt()
                if not items and not release and not preempt:
                    if self._drop_abandoned(force=True):
                        continue  # before sleeping, every gone handler is noticed
                    await self._wait_for_message()
                    continue
                follow, ahead = self.in_flight.sent(items, release=release, preempt=preempt)
                step = Step(items, release, self._results_send, preempt, follow, ahead)
                if (rec := timeline.recorder) is not None:
                    starts = sum(1 for it in items if it.start is not None)
                    rec.add("plan", items=len(items), starts=starts, release=len(release))
                await self._executor.send(step)
                await self._take_result()

    async def _take_result(self) -> None:
        later: list[object] = []
        try:
            result = self._results.receive_nowait()
        except trio.WouldBlock:
            result = await self._result_taking_submissions(later)
        for seq in self.core.on_step(self.in_flight.took(result), result):
            self._deliver(seq)
        for msg in later:
            self._handle(msg)

    async def _result_taking_submissions(self, later: list[object]) -> StepResult:
        """The running step's result. Meanwhile submissions and the pager's answers are handled
        as they come, so a prompt that arrives during a step has its prefix looked up then and
        can start in the next step; every other message goes to `later`, for after the result
        (a cancellation takes effect at the step boundary). On the H200 (8B bf16) the 30
        prompts of a burst of 64 that arrived during the first prefill step waited 80 ms in the
        inbox, were looked up only after it, and took a prefill step of their own."""
        result: list[StepResult] = []
        async with trio.open_nursery() as nursery:

            async def take() -> None:
                result.append(await self._results.receive())
                nursery.cancel_scope.cancel()

            nursery.start_soon(take)
            while True:
                msg = await self._inbox.receive()
                if isinstance(msg, Submit | Matched):
                    self._handle(msg)
                else:
                    later.append(msg)
        return result[0]

    # -- messages -------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.receive_nowait()
            except trio.WouldBlock:
                return
            self._handle(msg)

    async def _gather_matches(self) -> None:
        """With no row decoding, wait (`admission_wait_seconds` at most) for the pager's answers
        to the prompts already submitted: a burst then starts in one prefill step. Measured on
        the H200 (8B bf16), a burst of 64 at an idle server planned its first prompt alone, the
        other lookups queued behind that step, and the wave took 4 prefill steps."""
        wait = self._settings.admission_wait_seconds
        if not wait or not self.locks.matching or self.core.decoding:
            return
        with trio.move_on_after(wait):
            while self.locks.matching:
                self._handle(await self._inbox.receive())
                self._drain_inbox()

    async def _wait_for_message(self) -> None:
        parked = bool(self._releases) or any(s.parked for s in self.core.sequences())
        with trio.move_on_after(PARKED_POLL_SECONDS if parked else math.inf):
            self._handle(await self._inbox.receive())

    def _handle(self, msg: object) -> None:
        match msg:
            case Submit():
                if (rec := timeline.recorder) is not None:
                    rec.add("submit", rid=msg.request_id)
                self.locks.submit(msg)
            case Matched(request_id=rid, cached_tokens=cached):
                self.locks.matched(rid, cached)
            case Cancel(request_id=rid, at_seconds=at):
                self.cancel_log[rid] = at
                while len(self.cancel_log) > 4096:
                    self.cancel_log.popitem(last=False)
                self.locks.remove(rid, cancelled=True)
            case Resume(request_id=rid):
                seq = self.core.get(rid)
                if seq is not None:
                    self._deliver(seq)
            case SchedulerQuery(reply=reply):
                reply.send_nowait(self.core.statistics())
            case _:
                raise AssertionError(f"scheduler: unexpected message {msg!r}")

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
                self.core.note_delivery(
                    seq, progressed=progressed, blocked=True, now=time.monotonic()
                )
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.locks.remove(seq.request_id, cancelled=True)
                return
            msg = seq.outbox.popleft()
            progressed = True
            if isinstance(msg, Done | Failed):
                self.locks.remove(seq.request_id, cancelled=False)
                reply.close()
        self.core.note_delivery(seq, progressed=progressed, blocked=False, now=time.monotonic())
        if seq.stall_parked:
            self.core.fill()  # drained: it may take a free slot again

    # -- stalled readers ------------------------------------------------------------------

    def _handle_stalls(self) -> None:
        """Stalled readers leave the batch after stall_seconds; after stall_limit_seconds they
        end: their reply channel is closed, the handler reads what is buffered, then errs."""
        now = time.monotonic()
        for seq in self.core.over_stall_limit(now, self._settings.stall_limit_seconds):
            self.core.stall_ended += 1
            self.locks.remove(seq.request_id, cancelled=True)
            seq.submit.reply.close()
        self.core.park_stalled(now, self._settings.stall_seconds)

    def _drop_abandoned(self, *, force: bool = False) -> bool:
        """Drop sequences whose handler is gone (it closed its receive end): no need to wait
        for its Cancel. Returns whether any went."""
        now = time.monotonic()
        if not force and now - self._abandoned_checked_at < ABANDONED_POLL_SECONDS:
            return False
        self._abandoned_checked_at = now
        gone = [s.request_id for s in self.core.sequences() if s.submit.handler_gone]
        for rid in gone:
            self.locks.remove(rid, cancelled=True)
        return bool(gone)

    def statistics(self):
        return self.core.statistics()
