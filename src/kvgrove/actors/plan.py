"""The scheduler's sync core: admission, the step plan, stop and length checks. No trio here.

Each step (`plan_step`) decodes every running sequence that has its prompt in the executor's
cache, all in one batched forward pass, and spends at most `chunk_tokens` prompt tokens on
prefill: the next chunk of sequences whose prefill is under way first, then new ones. So a long
new prompt delays the running streams by at most one chunk per step, and a cancelled sequence is
dropped at the next step boundary.

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

import collections
import time
from collections.abc import Iterator

import attrs

from kvgrove.actors.messages import (
    Done,
    Failed,
    ItemResult,
    Start,
    StepItem,
    Submit,
    Token,
)


@attrs.define(eq=False)
class SeqState:
    """One request's generation state as the scheduler sees it."""

    submit: Submit
    cached_tokens: int = 0
    fed: int = 0  # tokens of `history` now in the executor's cache
    generated: int = 0
    started: bool = False  # the executor knows it (holds its sampler)
    has_cache: bool = False  # the executor holds a cache for it
    finished: bool = False
    history: list[int] = attrs.field(factory=list)  # the prompt, then each token generated
    outbox: collections.deque = attrs.field(factory=collections.deque)
    submitted_at: float = attrs.field(factory=time.monotonic)
    submitted_step: int = 0
    order: int = 0  # admission order: the newest is preempted first
    first_step_at: float | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_bytes: int = 0
    preemptions: int = 0
    resume_tokens: int = 0  # preempted: the prefix cache kept this much of its history
    # Not started yet, and another running sequence is prefilling the prefix it lacks: wait
    # until that one has fed `wait_until` tokens (they are in the trie then), then match again.
    waits_for: int | None = None
    wait_until: int = 0
    rematching: bool = False  # asked the pager again; not planned until it answers
    waited: bool = False  # waits at most once
    # Stalled readers: when delivery last stopped making progress (None = it is making
    # progress or has nothing to deliver), and whether it left the batch for it.
    stalled_since: float | None = None
    stall_parked: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.history:
            self.history = list(self.submit.prompt_tokens)

    @property
    def request_id(self) -> int:
        return self.submit.request_id

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.submit.prompt_tokens

    @property
    def parked(self) -> bool:
        return bool(self.outbox)

    @property
    def runnable(self) -> bool:
        return not self.finished and not self.outbox and not self.waiting_for_prefill

    @property
    def waiting_for_prefill(self) -> bool:
        return self.waits_for is not None or self.rematching

    @property
    def pending(self) -> int:
        """Tokens of the history not yet in the executor's cache (the last one is to sample)."""
        return len(self.history) - self.fed

    @property
    def decoding(self) -> bool:
        """Its next item is one decode token (it then joins the batched forward pass)."""
        return self.has_cache and self.pending == 1

    def done(self, reason: str) -> Done:
        self.finished = True
        queued = (self.first_step_at or time.monotonic()) - self.submitted_at
        return Done(
            reason=reason,
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached_tokens,
            generated_tokens=self.generated,
            prefill_seconds=self.prefill_seconds,
            decode_seconds=self.decode_seconds,
            queued_seconds=queued,
        )


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
    stall_parked: int = 0  # now out of the batch because their client stopped reading
    stall_parks: int = 0  # times a sequence left the batch for that, in all
    stall_ended: int = 0  # sequences ended at the stall limit, in all


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# Aging: each step waited counts as this many cached tokens, so a request with nothing cached
# overtakes one with a 1,024-token cached prefix after 64 steps at most.
DEFAULT_AGING_TOKENS_PER_STEP = 16


class SchedulerCore:
    """Owns the sequences; decides what the executor does next."""

    def __init__(
        self,
        *,
        chunk_tokens: int,
        max_running: int,
        kv_budget_bytes: int | None = None,
        aging_tokens_per_step: int = DEFAULT_AGING_TOKENS_PER_STEP,
        share_prefills: bool = False,
    ) -> None:
        assert chunk_tokens > 0 and max_running > 0 and aging_tokens_per_step >= 0
        self.chunk_tokens = chunk_tokens
        self.max_running = max_running
        self.kv_budget_bytes = kv_budget_bytes  # None = unbounded
        self.aging_tokens_per_step = aging_tokens_per_step
        # A prompt's KV enters the prefix cache as it is prefilled: a sequence whose uncached
        # prefix another is prefilling waits for it rather than compute it too.
        self.share_prefills = share_prefills
        self._rematch: list[int] = []
        self.prefill_waits = 0
        self._waiting: list[SeqState] = []
        self._running: dict[int, SeqState] = {}  # insertion order = round-robin order
        self._release: list[int] = []
        self._preempt: list[int] = []
        self._admitted = 0
        self._bytes_per_token = 0.0  # the largest seen: estimates a new sequence's cache
        self.steps_planned = 0
        self.cancelled = 0
        self.completed = 0
        self.preempted = 0
        self.max_decode_rows = 0
        self.stall_parks = 0
        self.stall_ended = 0

    # -- admission and removal ------------------------------------------------------------

    def admit(self, submit: Submit, *, cached_tokens: int = 0) -> SeqState:
        assert submit.prompt_tokens, "empty prompts are rejected before the scheduler"
        assert 0 <= cached_tokens < len(submit.prompt_tokens)
        seq = SeqState(
            submit,
            cached_tokens=cached_tokens,
            fed=cached_tokens,
            submitted_step=self.steps_planned,
        )
        if submit.max_tokens == 0:
            seq.cached_tokens = 0  # nothing is restored for it
            seq.outbox.append(seq.done("length"))
        self._waiting.append(seq)
        self._fill()
        return seq

    def priority(self, seq: SeqState) -> int:
        """Cache-aware order with aging: cached prefix tokens plus credit for steps waited."""
        waited = self.steps_planned - seq.submitted_step
        return seq.cached_tokens + self.aging_tokens_per_step * waited

    def _best_waiting(self) -> SeqState:
        # max() keeps the first of equals: ties go to the earliest arrival.
        return max(self._waiting, key=self.priority)

    def _fill(self) -> None:
        while self._waiting and len(self._running) < self.max_running:
            seq = self._best_waiting()
            if seq.stall_parked and seq.outbox:  # still stalled: others go first
                eligible = [s for s in self._waiting if not (s.stall_parked and s.outbox)]
                if not eligible:
                    return
                seq = max(eligible, key=self.priority)
            seq.stall_parked = False
            self._waiting.remove(seq)
            self._admitted += 1
            seq.order = self._admitted
            self._running[seq.request_id] = seq
            self._find_leader(seq)

    def _find_leader(self, seq: SeqState) -> None:
        """If a running sequence is prefilling (or about to) more of seq's prompt than seq has
        cached, seq waits for it: the longest such shared prefix wins."""
        if not self.share_prefills or seq.started or seq.waited or seq.finished:
            return
        usable = len(seq.prompt) - 1  # at least one prompt token is always fed
        best, best_common = None, seq.cached_tokens
        for other in self._running.values():
            if other is seq or other.finished or other.waiting_for_prefill:
                continue
            if other.submit.namespace != seq.submit.namespace:
                continue
            common = min(_common_prefix(seq.prompt, other.prompt), usable)
            if common > best_common and other.fed < common:
                best, best_common = other, common
        if best is not None:
            seq.waits_for, seq.wait_until, seq.waited = best.request_id, best_common, True
            self.prefill_waits += 1

    def _check_waits(self) -> None:
        """Sequences whose leader has fed the shared prefix (or is gone) ask the pager again."""
        for seq in self._running.values():
            if seq.waits_for is None:
                continue
            leader = self._running.get(seq.waits_for)
            if (
                leader is None
                or leader.finished
                or leader.fed >= seq.wait_until
                or (leader.started and not leader.has_cache)  # preempted: don't wait on it
            ):
                seq.waits_for = None
                seq.rematching = True
                self._rematch.append(seq.request_id)

    def take_rematch(self) -> tuple[int, ...]:
        """Sequences to match against the prefix cache again (send `Match`, then `rematched`)."""
        out, self._rematch = tuple(self._rematch), []
        return out

    def rematched(self, request_id: int, cached_tokens: int) -> None:
        """The pager's new answer for a sequence that waited: it starts from there."""
        seq = self._running.get(request_id)
        if seq is None or not seq.rematching:
            return
        seq.rematching = False
        if not seq.started and 0 <= cached_tokens < len(seq.prompt):
            seq.cached_tokens = seq.fed = cached_tokens

    def get(self, request_id: int) -> SeqState | None:
        seq = self._running.get(request_id)
        if seq is not None:
            return seq
        return next((s for s in self._waiting if s.request_id == request_id), None)

    def remove(self, request_id: int, *, cancelled: bool) -> SeqState | None:
        """Forget a sequence (delivered or cancelled); its executor state is released next step."""
        seq = self._running.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self._waiting if s.request_id == request_id), None)
            if seq is None:
                return None
            self._waiting.remove(seq)
        if seq.started:
            self._release.append(request_id)
            if request_id in self._preempt:
                self._preempt.remove(request_id)
        if cancelled:
            self.cancelled += 1
        else:
            self.completed += 1
        self._fill()
        return seq

    def fill(self) -> None:
        """Admit waiting sequences into free running slots (a stall-parked one that drained)."""
        self._fill()

    # -- stalled readers ------------------------------------------------------------------

    def note_delivery(self, seq: SeqState, *, progressed: bool, blocked: bool, now: float) -> None:
        """Delivery to seq's reply channel: progress clears its stall; a block starts one."""
        if progressed or not seq.outbox:
            seq.stalled_since = None
        if blocked and seq.stalled_since is None:
            seq.stalled_since = now

    def park_stalled(self, now: float, stall_seconds: float) -> list[SeqState]:
        """Running sequences stalled for `stall_seconds` leave the batch: preempted (the
        executor keeps their KV in the prefix cache, their sampler), slot given back, waiting
        like a queued request until their outbox drains."""
        out = []
        for seq in list(self._running.values()):
            since = seq.stalled_since
            if since is None or now - since < stall_seconds:
                continue
            if seq.has_cache:
                self.preempt(seq)
            del self._running[seq.request_id]
            seq.stall_parked = True
            self._waiting.append(seq)
            self.stall_parks += 1
            out.append(seq)
        if out:
            self._fill()
        return out

    def over_stall_limit(self, now: float, limit_seconds: float) -> list[SeqState]:
        """Sequences whose delivery has made no progress for `limit_seconds` (to be ended)."""
        return [
            s
            for s in self.sequences()
            if s.stalled_since is not None and now - s.stalled_since >= limit_seconds
        ]

    def sequences(self) -> Iterator[SeqState]:
        yield from self._running.values()
        yield from self._waiting

    # -- planning -------------------------------------------------------------------------

    def take_release(self) -> tuple[int, ...]:
        out, self._release = tuple(self._release), []
        return out

    def take_preempt(self) -> tuple[int, ...]:
        out, self._preempt = tuple(self._preempt), []
        return out

    @property
    def idle(self) -> bool:
        return not any(s.runnable for s in self._running.values())

    @property
    def live_bytes(self) -> int:
        return sum(s.cache_bytes for s in self._running.values() if s.has_cache)

    def plan_step(self) -> tuple[StepItem, ...]:
        """This step's items: every decoding sequence, then prefill chunks up to `chunk_tokens`."""
        self._check_waits()
        self._preempt_over_budget()
        runnable = [s for s in self._running.values() if s.runnable]
        items = [self._item_for(s, 1) for s in runnable if s.decoding]
        self.max_decode_rows = max(self.max_decode_rows, len(items))
        # Prefills under way first (in admission order), then new ones by priority.
        prefilling = [s for s in runnable if not s.decoding]
        prefilling.sort(key=lambda s: (not s.has_cache, -self.priority(s), s.order))
        budget = self.chunk_tokens
        planned = 0.0  # the estimated bytes of the caches this step starts
        for seq in prefilling:
            if budget <= 0:
                break
            if not seq.has_cache:
                if not self._fits(seq, running=bool(items), planned=planned):
                    break
                planned += self._bytes_per_token * len(seq.history)
            item = self._item_for(seq, budget)
            budget -= len(item.tokens)
            items.append(item)
        if items:
            self.steps_planned += 1
        return tuple(items)

    def follows(self, items: tuple[StepItem, ...]) -> bool:
        """Whether the step after the one decoding `items` (in flight or about to be) would be
        its continuation, as far as is known now: every running sequence decodes in it, nothing
        waits, leaves or is preempted, no reply channel is full, the live caches stay within
        budget, and no row reaches its token or context limit with the token coming now (those
        end without a wasted row-step; a stop token, stop string or cancel costs one)."""
        if not items or len(items) != len(self._running):
            return False
        if self._waiting or self._release or self._preempt or self._rematch:
            return False
        for it in items:
            seq = self._running.get(it.request_id)
            if seq is None or not seq.runnable or not seq.decoding or it.start is not None:
                return False
            sub, after = seq.submit, seq.generated + 1
            if sub.max_tokens is not None and after >= sub.max_tokens:
                return False
            if len(seq.prompt) + after >= sub.context_tokens:
                return False
        if self.kv_budget_bytes is not None:
            growth = 2 * self._bytes_per_token * len(items)
            if self.live_bytes + growth > self.kv_budget_bytes:
                return False
        return True

    def followed(self, rows: int) -> None:
        """The executor runs a continuation of `rows` rows the scheduler did not plan."""
        self.steps_planned += 1
        self.max_decode_rows = max(self.max_decode_rows, rows)

    def _fits(self, seq: SeqState, *, running: bool, planned: float = 0.0) -> bool:
        """Whether seq's cache can be built now without outgrowing the budget, beside the live
        caches and the `planned` bytes of those this step starts."""
        if self.kv_budget_bytes is None:
            return True
        holders = [s for s in self._running.values() if s.has_cache]
        if not holders and not running:
            return True  # alone it always runs: one sequence over budget is not refused
        estimate = self._bytes_per_token * len(seq.history)
        return self.live_bytes + planned + estimate <= self.kv_budget_bytes

    def _preempt_over_budget(self) -> None:
        if self.kv_budget_bytes is None:
            return
        while self.live_bytes > self.kv_budget_bytes:
            holders = [s for s in self._running.values() if s.has_cache and not s.finished]
            if len(holders) <= 1:
                return
            self.preempt(max(holders, key=lambda s: s.order))

    def preempt(self, seq: SeqState) -> None:
        """Drop seq's cache (sampler kept). Its KV goes into the prefix cache; once the executor
        says how much it kept (`on_preempted`), it resumes from there, else from token 0."""
        assert seq.has_cache
        seq.has_cache = False
        seq.fed = 0
        seq.resume_tokens = 0
        seq.cache_bytes = 0
        seq.preemptions += 1
        self.preempted += 1
        self._preempt.append(seq.request_id)

    def on_preempted(self, request_id: int, kept_tokens: int) -> None:
        """The prefix cache holds the first `kept_tokens` of a preempted sequence's history: its
        next item restores them (`StepItem.resume_tokens`) and feeds only the rest."""
        seq = self._running.get(request_id)
        if seq is None:  # a stalled reader's sequence waits out of the batch
            seq = next((s for s in self._waiting if s.request_id == request_id), None)
        if seq is None or seq.has_cache or seq.finished:
            return  # gone, or already resuming from token 0
        seq.fed = seq.resume_tokens = max(0, min(kept_tokens, len(seq.history) - 1))

    def _item_for(self, seq: SeqState, budget: int) -> StepItem:
        start = None
        if not seq.started:
            seq.started = True
            seq.first_step_at = time.monotonic()
            sub = seq.submit
            start = Start(
                sub.params,
                sub.prompt_tokens,
                sub.context_tokens,
                namespace=sub.namespace,
                cached_tokens=seq.fed,
            )
        resume = 0
        if seq.started and not seq.has_cache:
            resume, seq.resume_tokens = seq.resume_tokens, 0
        seq.has_cache = True
        remaining = seq.pending
        assert remaining >= 1
        if remaining <= budget:
            tokens, sample = tuple(seq.history[seq.fed :]), True
        else:
            # Stop one short of the end so the last token is fed with sampling.
            n = min(budget, remaining - 1)
            tokens, sample = tuple(seq.history[seq.fed : seq.fed + n]), False
        return StepItem(seq.request_id, tokens, sample, start, resume)

    # -- results --------------------------------------------------------------------------

    def on_result(self, item: StepItem, result: ItemResult) -> SeqState | None:
        """Account a finished item; queue Token / Done / Failed in the sequence's outbox."""
        seq = self._running.get(result.request_id)
        if seq is None or seq.finished or not seq.has_cache:
            return None  # cancelled or preempted while the step ran
        if result.error is not None:
            seq.finished = True
            seq.outbox.append(Failed(result.error))
            return seq
        seq.fed += len(item.tokens)
        seq.cache_bytes = result.cache_bytes
        if result.cached_tokens is not None:  # what the executor actually restored
            seq.cached_tokens = result.cached_tokens
        if seq.fed:
            self._bytes_per_token = max(self._bytes_per_token, result.cache_bytes / seq.fed)
        if result.token is None:
            seq.prefill_seconds += result.seconds
            return seq
        if seq.generated == 0:
            seq.prefill_seconds += result.seconds
        else:
            seq.decode_seconds += result.seconds
        sub = seq.submit
        if result.token in sub.stop_ids:
            seq.outbox.append(seq.done("stop"))
            return seq
        seq.generated += 1
        seq.history.append(result.token)
        cached = seq.cached_tokens if seq.generated == 1 else None
        seq.outbox.append(Token(result.token, result.logprob, result.top_logprobs, cached))
        out_of_budget = sub.max_tokens is not None and seq.generated >= sub.max_tokens
        out_of_context = len(seq.prompt) + seq.generated >= sub.context_tokens
        if out_of_budget or out_of_context:
            seq.outbox.append(seq.done("length"))
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
            stall_parked=sum(1 for s in self._waiting if s.stall_parked),
            stall_parks=self.stall_parks,
            stall_ended=self.stall_ended,
        )
