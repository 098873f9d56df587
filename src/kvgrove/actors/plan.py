"""The scheduler's sync core: admission, the step plan, stop and length checks. No trio here.

Sequences run round-robin, one unit of work per step: a prefill chunk of at most
`chunk_tokens`, or one decode token. So a long prefill never holds back another request by more
than one chunk, and a cancelled sequence is dropped at the next step boundary. The step is a
tuple of items so continuous batching can later put many sequences in one step.

A sequence whose outbox is not empty is *parked*: its reply channel was full (a slow reader)
and it is not planned until the outbox drains. Outboxes hold at most the messages of one step.
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
class Sequence:
    """One request's generation state as the scheduler sees it."""

    submit: Submit
    cached_tokens: int = 0
    fed: int = 0  # prompt and generated tokens now in the executor's cache
    generated: int = 0
    last_token: int | None = None
    started: bool = False  # the executor holds a cache for it
    finished: bool = False
    outbox: collections.deque = attrs.field(factory=collections.deque)
    submitted_at: float = attrs.field(factory=time.monotonic)
    first_step_at: float | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

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
        return not self.finished and not self.outbox

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


class SchedulerCore:
    """Owns the sequences; decides what the executor does next."""

    def __init__(self, *, chunk_tokens: int, max_running: int) -> None:
        assert chunk_tokens > 0 and max_running > 0
        self.chunk_tokens = chunk_tokens
        self.max_running = max_running
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: dict[int, Sequence] = {}  # insertion order = round-robin order
        self._cursor = 0
        self._release: list[int] = []
        self.steps_planned = 0
        self.cancelled = 0
        self.completed = 0

    # -- admission and removal ------------------------------------------------------------

    def admit(self, submit: Submit, *, cached_tokens: int = 0) -> Sequence:
        assert submit.prompt_tokens, "empty prompts are rejected before the scheduler"
        assert 0 <= cached_tokens < len(submit.prompt_tokens)
        seq = Sequence(submit, cached_tokens=cached_tokens, fed=cached_tokens)
        if submit.max_tokens == 0:
            seq.outbox.append(seq.done("length"))
        self._waiting.append(seq)
        self._fill()
        return seq

    def _fill(self) -> None:
        while self._waiting and len(self._running) < self.max_running:
            seq = self._waiting.popleft()
            self._running[seq.request_id] = seq

    def get(self, request_id: int) -> Sequence | None:
        seq = self._running.get(request_id)
        if seq is not None:
            return seq
        return next((s for s in self._waiting if s.request_id == request_id), None)

    def remove(self, request_id: int, *, cancelled: bool) -> Sequence | None:
        """Forget a sequence (delivered or cancelled); its executor state is released next step."""
        seq = self._running.pop(request_id, None)
        if seq is None:
            seq = next((s for s in self._waiting if s.request_id == request_id), None)
            if seq is None:
                return None
            self._waiting.remove(seq)
        if seq.started:
            self._release.append(request_id)
        if cancelled:
            self.cancelled += 1
        else:
            self.completed += 1
        self._fill()
        return seq

    def sequences(self) -> Iterator[Sequence]:
        yield from self._running.values()
        yield from self._waiting

    # -- planning -------------------------------------------------------------------------

    def take_release(self) -> tuple[int, ...]:
        out, self._release = tuple(self._release), []
        return out

    @property
    def idle(self) -> bool:
        return not any(s.runnable for s in self._running.values())

    def next_item(self) -> StepItem | None:
        """The next unit of work, round-robin over runnable sequences; None when none can run."""
        order = list(self._running.values())
        for i in range(len(order)):
            seq = order[(self._cursor + i) % len(order)]
            if seq.runnable:
                self._cursor = (self._cursor + i + 1) % len(order)
                self.steps_planned += 1
                return self._item_for(seq)
        return None

    def _item_for(self, seq: Sequence) -> StepItem:
        start = None
        if not seq.started:
            seq.started = True
            seq.first_step_at = time.monotonic()
            sub = seq.submit
            start = Start(sub.params, sub.prompt_tokens, sub.context_tokens)
        prompt = seq.prompt
        if seq.fed < len(prompt):
            remaining = len(prompt) - seq.fed
            if remaining <= self.chunk_tokens:
                tokens, sample = prompt[seq.fed :], True
            else:
                # Stop one short of the end so the last prompt token is fed with sampling.
                n = min(self.chunk_tokens, remaining - 1)
                tokens, sample = prompt[seq.fed : seq.fed + n], False
        else:
            assert seq.last_token is not None
            tokens, sample = (seq.last_token,), True
        return StepItem(seq.request_id, tokens, sample, start)

    # -- results --------------------------------------------------------------------------

    def on_result(self, item: StepItem, result: ItemResult) -> Sequence | None:
        """Account a finished item; queue Token / Done in the sequence's outbox."""
        seq = self._running.get(result.request_id)
        if seq is None or seq.finished:
            return None  # cancelled while the step ran
        seq.fed += len(item.tokens)
        if result.token is None:
            seq.prefill_seconds += result.seconds
            return seq
        if seq.generated == 0 and seq.last_token is None:
            seq.prefill_seconds += result.seconds
        else:
            seq.decode_seconds += result.seconds
        sub = seq.submit
        if result.token in sub.stop_ids:
            seq.outbox.append(seq.done("stop"))
            return seq
        seq.generated += 1
        seq.last_token = result.token
        seq.outbox.append(Token(result.token, result.logprob, result.top_logprobs))
        out_of_budget = sub.max_tokens is not None and seq.generated >= sub.max_tokens
        out_of_context = len(seq.prompt) + seq.generated >= sub.context_tokens
        if out_of_budget or out_of_context:
            seq.outbox.append(seq.done("length"))
        return seq

    def fail_all(self, message: str) -> list[Sequence]:
        """A step failed as a whole: every running sequence ends with `message`."""
        out = []
        for seq in list(self._running.values()):
            if not seq.finished:
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
        )
