"""The scheduler core's sequences: who waits, who runs, and how they move. No trio here.

`SeqQueue` holds the waiting list and the running batch (insertion order = round-robin order).
Admission fills free running slots by `priority`: the longest cached prefix first, aged by
`aging_tokens_per_step` per step waited so nothing starves. A sequence whose uncached prefix
another is prefilling waits for that one (`kvgrove.scheduling.sharing`), then matches again.
A stalled reader leaves the batch (`park_stalled`) and waits like a queued request until its
outbox drains. Preempted and removed sequences are queued for the executor (`take_preempt`,
`take_release`). `kvgrove.scheduling.core.SchedulerCore` plans steps over it.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvgrove.scheduling.messages import Submit
from kvgrove.scheduling.sequence import SeqState
from kvgrove.scheduling.sharing import find_leader, wait_is_over


class SeqQueue:
    """The waiting and running sequences; admission, removal, stalls and preemption."""

    def __init__(
        self,
        *,
        max_running: int,
        aging_tokens_per_step: int,
        share_prefills: bool,
        min_prefix_tokens: int = 0,
        share_min_tokens: int = 0,
    ):
        assert max_running > 0 and aging_tokens_per_step >= 0 and min_prefix_tokens >= 0
        self.max_running = max_running
        self.aging_tokens_per_step = aging_tokens_per_step
        # A prompt's KV enters the prefix cache as it is prefilled: a sequence whose uncached
        # prefix another is prefilling waits for it rather than compute it too.
        self.share_prefills = share_prefills
        # A cached prefix shorter than this is not restored and a shared one not waited for:
        # the prompt is computed in full, beside other fresh prompts (`Settings`).
        self.min_prefix_tokens = min_prefix_tokens
        # A prompt computing fewer tokens is not stored as it prefills (the runner's
        # `share_min_tokens`): nobody waits for it.
        self.share_min_tokens = share_min_tokens
        self._rematch: list[int] = []
        self.prefill_waits = 0
        self.short_prefixes = 0
        self._waiting: list[SeqState] = []
        self._running: dict[int, SeqState] = {}  # insertion order = round-robin order
        self._release: list[int] = []
        self._preempt: list[int] = []
        self._admitted = 0
        self.steps_planned = 0
        self.cancelled = 0
        self.completed = 0
        self.preempted = 0
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

    def worth(self, cached_tokens: int) -> int:
        """How much of a matched prefix to restore: all of it, or none (counted) when it is
        shorter than `min_prefix_tokens`."""
        if 0 < cached_tokens < self.min_prefix_tokens:
            self.short_prefixes += 1
            return 0
        return cached_tokens

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
        found = find_leader(
            seq,
            self._running.values(),
            min_gain=self.min_prefix_tokens,
            min_leader_tokens=self.share_min_tokens,
        )
        if found is not None:
            seq.waits_for, seq.wait_until, seq.waited = found[0].request_id, found[1], True
            self.prefill_waits += 1

    def _check_waits(self) -> None:
        """Sequences whose leader has fed the shared prefix (or is gone) ask the pager again."""
        for seq in self._running.values():
            if seq.waits_for is not None and wait_is_over(seq, self._running):
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
