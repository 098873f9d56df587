"""The scheduler's sync core: admission, the step plan, stop and length checks. No trio here.

Each step (`plan_step`) decodes every running sequence that has its prompt in the executor's
cache, all in one batched forward pass, and spends at most `step_tokens` prompt tokens on
prefill, at most `chunk_tokens` of them on one prompt: the next chunk of sequences whose prefill
is under way first, then new ones. So a long new prompt delays the running streams by at most
one chunk per step, and a cancelled sequence is dropped at the next step boundary.

Admission: at most `max_running` sequences run (the batch); the rest wait. Among the waiting,
the one with the longest cached prefix goes first, aged by `aging_tokens_per_step` per step
waited so nothing starves (`priority`). A sequence only starts its prefill while the live
caches fit `kv_budget_bytes`; when they outgrow it, the newest sequence is preempted: its cache
is dropped (the prefix cache keeps it as a snapshot) and it later resumes from what the prefix
cache kept, re-feeding only the tokens after it, with its sampler (penalty history, random
stream) kept.

A sequence whose outbox is not empty is *parked*: its reply channel was full (a slow reader)
and it is not planned until the outbox drains. Outboxes hold at most the messages of one step.
A sequence whose delivery has made no progress for `stall_seconds` (its client stopped reading)
is *stall-parked* (`park_stalled`): preempted (its KV goes to the prefix cache), it gives its
running slot back and waits like a queued request, re-admitted once its outbox drains; one stalled
for `stall_limit_seconds` is ended by the shell (`over_stall_limit`). A slow but steady reader
makes progress and is never parked; a long prefill has an empty outbox.
"""

from __future__ import annotations

import attrs

from kvgrove.models.steps import ItemResult, StepItem, StepResult
from kvgrove.scheduling.messages import Failed
from kvgrove.scheduling.queue import SeqQueue
from kvgrove.scheduling.sequence import SeqState


@attrs.frozen
class SchedulerStats:
    waiting: int
    running: int
    parked: int
    steps_planned: int
    cancelled: int
    completed: int
    preempted: int = 0
    max_decode_rows: int = 0  # the most sequences decoded in one step so far
    prefill_waits: int = 0  # sequences that waited for another's prefill of their prefix
    short_prefixes: int = 0  # matched prefixes under min_prefix_tokens, computed instead
    stall_parked: int = 0  # now out of the batch because their client stopped reading
    stall_parks: int = 0  # times a sequence left the batch for that, in all
    stall_ended: int = 0  # sequences ended at the stall limit, in all


# Aging: each step waited counts as this many cached tokens, so a request with nothing cached
# overtakes one with a 1,024-token cached prefix after 64 steps at most.
DEFAULT_AGING_TOKENS_PER_STEP = 16
# Attention caches (mlx-lm's, kvgrove's batch slots) grow their buffers by this many positions.
CACHE_STEP_TOKENS = 256


class SchedulerCore(SeqQueue):
    """Owns the sequences; decides what the executor does next."""

    def __init__(
        self,
        *,
        chunk_tokens: int,
        max_running: int,
        kv_budget_bytes: int | None = None,
        aging_tokens_per_step: int = DEFAULT_AGING_TOKENS_PER_STEP,
        share_prefills: bool = False,
        min_prefix_tokens: int = 0,
        step_tokens: int | None = None,
        share_min_tokens: int = 0,
    ) -> None:
        assert chunk_tokens > 0 and (step_tokens is None or step_tokens > 0)
        super().__init__(
            max_running=max_running,
            aging_tokens_per_step=aging_tokens_per_step,
            share_prefills=share_prefills,
            min_prefix_tokens=min_prefix_tokens,
            share_min_tokens=share_min_tokens,
        )
        self.chunk_tokens = chunk_tokens
        self.step_tokens = chunk_tokens if step_tokens is None else step_tokens
        self.kv_budget_bytes = kv_budget_bytes  # None = unbounded
        self._bytes_per_token = 0.0  # the largest seen: estimates a new sequence's cache
        self.max_decode_rows = 0

    # -- planning -------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not any(s.runnable for s in self._running.values())

    @property
    def decoding(self) -> bool:
        """Whether any runnable sequence decodes at the next step."""
        return any(s.runnable and s.decoding for s in self._running.values())

    @property
    def live_bytes(self) -> int:
        return sum(s.cache_bytes for s in self._running.values() if s.has_cache)

    def plan_step(self) -> tuple[StepItem, ...]:
        """This step's items: every decoding sequence, then prefill chunks up to `step_tokens`
        (each at most `chunk_tokens`)."""
        self._check_waits()
        self._preempt_over_budget()
        runnable = [s for s in self._running.values() if s.runnable]
        items = [s.next_item(1) for s in runnable if s.decoding]
        self.max_decode_rows = max(self.max_decode_rows, len(items))
        # Prefills under way first (in admission order), then new ones by priority.
        prefilling = [s for s in runnable if not s.decoding]
        prefilling.sort(key=lambda s: (not s.has_cache, -self.priority(s), s.order))
        budget = self.step_tokens
        planned = 0.0  # the estimated bytes of the caches this step starts
        longest = 0  # the longest running row, which only a budget needs
        if self.kv_budget_bytes is not None:
            held = [len(s.history) for s in self._running.values() if s.has_cache]
            longest = max(held, default=0)
        for seq in prefilling:
            if budget <= 0:
                break
            if not seq.has_cache:
                if not self._fits(seq, running=bool(items), planned=planned, longest=longest):
                    break
                planned += self._estimate(seq, longest)
            item = seq.next_item(min(budget, self.chunk_tokens))
            budget -= len(item.tokens)
            items.append(item)
        if items:
            self.steps_planned += 1
        return tuple(items)

    def plan_follow(self, items: tuple[StepItem, ...]) -> bool:
        """Whether the step after the one decoding `items` (in flight or about to be sent) is
        its continuation (`kvgrove.scheduling.follow`), as far as is known now: every running
        sequence decodes in it, nothing waits, leaves or is preempted, no reply channel is full,
        the live caches stay within budget, and no row reaches its token or context limit with
        the token coming now. If so it counts as a planned step."""
        if not items or len(items) != len(self._running):
            return False
        if self._waiting or self._release or self._preempt or self._rematch:
            return False
        for it in items:
            seq = self._running.get(it.request_id)
            if seq is None or not seq.runnable or not seq.decoding or it.start is not None:
                return False
            if not self._within_limits(seq, 1):
                return False
        if self.kv_budget_bytes is not None:
            growth = 2 * self._bytes_per_token * len(items)
            if self.live_bytes + growth > self.kv_budget_bytes:
                return False
        self.steps_planned += 1
        self.max_decode_rows = max(self.max_decode_rows, len(items))
        return True

    def decodes_again(self, items: tuple[StepItem, ...], *, tokens: int = 1) -> bool:
        """Whether the plan after the one `tokens` steps on from a step decoding `items` is
        expected to decode some of the same rows in the same batch (`Step.ahead`): every running
        sequence decodes in it (no row prefilled or parked now joins then, which would take the
        step run ahead off the whole batch), and some row stays runnable and within its limits.
        Rows that end meanwhile, or leave as sequences join or are preempted, cost one row-step
        each; counts nothing."""
        if not items or len(items) != len(self._running):
            return False
        seqs = [self._running.get(it.request_id) for it in items]
        for it, seq in zip(items, seqs, strict=True):
            if seq is None or not seq.decoding or it.start is not None:
                return False
        return any(seq.runnable and self._within_limits(seq, tokens) for seq in seqs)

    @staticmethod
    def _within_limits(seq: SeqState, tokens: int) -> bool:
        """Whether seq stays below its token and context limits with `tokens` more."""
        sub, after = seq.submit, seq.generated + tokens
        if sub.max_tokens is not None and after >= sub.max_tokens:
            return False
        return len(seq.prompt) + after < sub.context_tokens

    def _fits(
        self, seq: SeqState, *, running: bool, planned: float = 0.0, longest: int = 0
    ) -> bool:
        """Whether seq's cache can be built now without outgrowing the budget, beside the live
        caches and the `planned` bytes of those this step starts."""
        if self.kv_budget_bytes is None:
            return True
        holders = [s for s in self._running.values() if s.has_cache]
        if not holders and not running:
            return True  # alone it always runs: one sequence over budget is not refused
        estimate = self._estimate(seq, longest)
        return self.live_bytes + planned + estimate <= self.kv_budget_bytes

    def _estimate(self, seq: SeqState, longest: int) -> float:
        """The bytes seq's cache will hold with its next token: its positions (as many as the
        `longest` running sequence's in a left-padded batch) in buffers that grow in steps of
        CACHE_STEP_TOKENS. A sequence preempted as its buffers grew so does not come straight
        back into the room it just left."""
        positions = max(len(seq.history) + 1, longest)
        steps = -(-positions // CACHE_STEP_TOKENS)
        return self._bytes_per_token * steps * CACHE_STEP_TOKENS

    def _preempt_over_budget(self) -> None:
        if self.kv_budget_bytes is None:
            return
        while self.live_bytes > self.kv_budget_bytes:
            holders = [s for s in self._running.values() if s.has_cache and not s.finished]
            if len(holders) <= 1:
                return
            self.preempt(max(holders, key=lambda s: s.order))

    # -- results --------------------------------------------------------------------------

    def on_step(self, items: tuple[StepItem, ...], result: StepResult) -> list[SeqState]:
        """Account a finished step; returns the sequences with new messages to deliver."""
        for rid, kept in result.kept:
            self.on_preempted(rid, kept)
        if result.error is not None:
            return self.fail_items(items, result.error)
        out = []
        for item, item_result in zip(items, result.results, strict=True):
            seq = self.on_result(item, item_result)
            if seq is not None:
                out.append(seq)
        return out

    def on_result(self, item: StepItem, result: ItemResult) -> SeqState | None:
        """Account a finished item; queue Token / Done / Failed in the sequence's outbox."""
        seq = self._running.get(result.request_id)
        if seq is None or seq.finished or not seq.has_cache:
            return None  # cancelled or preempted while the step ran
        seq.apply(item, result)
        if result.error is None and seq.fed:
            # A row's share of a batch's buffers counts their spare rows and positions: the
            # last row of a 64-row batch estimated each new prompt's cache at ~140 times its
            # size, and on the H200 (8B bf16) a burst of 64 was then admitted 16-25 a step.
            per_token = result.token_bytes or result.cache_bytes / seq.fed
            self._bytes_per_token = max(self._bytes_per_token, per_token)
        return seq

    def fail_items(self, items: tuple[StepItem, ...], message: str) -> list[SeqState]:
        """A step failed as a whole: the sequences in it end with `message`, no others."""
        out = []
        for item in items:
            seq = self._running.get(item.request_id)
            if seq is not None and not seq.finished:
                seq.finished = True
                seq.outbox.append(Failed(message))
                out.append(seq)
        return out

    def statistics(self) -> SchedulerStats:
        running = list(self._running.values())
        return SchedulerStats(
            waiting=len(self._waiting),
            running=len(running),
            parked=sum(1 for s in running if s.parked),
            steps_planned=self.steps_planned,
            cancelled=self.cancelled,
            completed=self.completed,
            preempted=self.preempted,
            max_decode_rows=self.max_decode_rows,
            prefill_waits=self.prefill_waits,
            short_prefixes=self.short_prefixes,
            stall_parked=sum(1 for s in self._waiting if s.stall_parked),
            stall_parks=self.stall_parks,
            stall_ended=self.stall_ended,
        )
