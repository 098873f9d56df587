"""One request's generation state as the scheduler sees it: `SeqState`. No trio here.

A sequence makes its own step items (`next_item`) and takes its own results (`apply`): its
history, what the executor's cache holds of it, and the messages (`outbox`) for its handler.
"""

from __future__ import annotations

import collections
import time

import attrs

from kvgrove.models.steps import ItemResult, Start, StepItem
from kvgrove.scheduling.messages import Done, Failed, Submit, Token


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

    def next_item(self, budget: int) -> StepItem:
        """Its item for this step, feeding at most `budget` tokens (a decode feeds one)."""
        start = None
        if not self.started:
            self.started = True
            self.first_step_at = time.monotonic()
            sub = self.submit
            start = Start(
                sub.params,
                sub.prompt_tokens,
                sub.context_tokens,
                namespace=sub.namespace,
                cached_tokens=self.fed,
            )
        resume = 0
        if self.started and not self.has_cache:
            resume, self.resume_tokens = self.resume_tokens, 0
        self.has_cache = True
        remaining = self.pending
        assert remaining >= 1
        if remaining <= budget:
            tokens, sample = tuple(self.history[self.fed :]), True
        else:
            # Stop one short of the end so the last token is fed with sampling.
            n = min(budget, remaining - 1)
            tokens, sample = tuple(self.history[self.fed : self.fed + n]), False
        return StepItem(self.request_id, tokens, sample, start, resume)

    def apply(self, item: StepItem, result: ItemResult) -> None:
        """Account its finished item; queue Token / Done / Failed in the outbox."""
        if result.error is not None:
            self.finished = True
            self.outbox.append(Failed(result.error))
            return
        self.fed += len(item.tokens)
        self.cache_bytes = result.cache_bytes
        if result.cached_tokens is not None:  # what the executor actually restored
            self.cached_tokens = result.cached_tokens
        if result.token is None:
            self.prefill_seconds += result.seconds
            return
        if self.generated == 0:
            self.prefill_seconds += result.seconds
        else:
            self.decode_seconds += result.seconds
        sub = self.submit
        if result.token in sub.stop_ids:
            self.outbox.append(self.done("stop"))
            return
        self.generated += 1
        self.history.append(result.token)
        cached = self.cached_tokens if self.generated == 1 else None
        self.outbox.append(Token(result.token, result.logprob, result.top_logprobs, cached))
        out_of_budget = sub.max_tokens is not None and self.generated >= sub.max_tokens
        out_of_context = len(self.prompt) + self.generated >= sub.context_tokens
        if out_of_budget or out_of_context:
            self.outbox.append(self.done("length"))
