"""One generation per HTTP request: submit to the scheduler, stream tokens back as text.

`Generation.stream()` is the per-request actor. It owns its bounded reply channel and its
detokenizer; it never blocks the scheduler (which sends with `send_nowait` and parks the
sequence when this channel is full). However it ends (finished, stop string, client gone,
error), its `finally` closes the reply channel and tells the scheduler without blocking.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import trio

from kvgrove.actors.messages import Cancel, Done, Failed, Outcome, Resume, Submit, Token
from kvgrove.actors.metrics import Metrics
from kvgrove.sampling import SamplingParams
from kvgrove.tokenize.stops import StopMatcher

_ids = itertools.count(1)


def next_request_id() -> int:
    return next(_ids)


class GenerationError(Exception):
    """The generation failed after it was admitted (reported as the stream's last message)."""


@attrs.frozen
class GenerationRequest:
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    max_tokens: int | None  # None = until the context limit
    context_tokens: int
    stop: tuple[str, ...] = ()
    api: str = "ollama"
    namespace: str = ""  # prefix-cache namespace: cached prompts are shared only within one


@attrs.frozen
class TextChunk:
    text: str
    tokens: tuple[Token, ...]


@attrs.frozen
class Finished(Outcome):
    """The last event. Seconds are wall-clock on the server; counts are tokens."""

    total_seconds: float


@attrs.define
class Generation:
    """One request's generation. Iterate `stream()` once."""

    request: GenerationRequest
    scheduler: trio.MemorySendChannel
    tokenizer: Any
    metrics: Metrics
    reply_channel_items: int
    request_id: int = attrs.field(factory=next_request_id)
    arrived_at: float = attrs.field(factory=time.monotonic)

    async def stream(self) -> AsyncIterator[TextChunk | Finished]:
        req = self.request
        send, recv = trio.open_memory_channel[object](self.reply_channel_items)
        detok = self.tokenizer.detokenizer()
        stops = StopMatcher(req.stop)
        done_seen = False
        generated = 0
        cached = 0  # prompt tokens restored from the prefix cache (told with the first token)
        held: list[Token] = []  # tokens whose text is still held back (stop match, UTF-8)
        first_at = last_at = None
        outcome = "cancelled"
        try:
            submit = Submit(
                request_id=self.request_id,
                prompt_tokens=req.prompt_tokens,
                params=req.params,
                max_tokens=req.max_tokens,
                context_tokens=req.context_tokens,
                stop_ids=frozenset(self.tokenizer.eos_ids),
                reply=send,
                namespace=req.namespace,
            )
            await self.scheduler.send(submit)
            while True:
                # Everything already queued is handled in one go and leaves as one chunk: a
                # reader that fell behind catches up with one write, not one per token.
                batch = await self._receive(recv)
                now = time.monotonic()
                text = ""
                chunk_tokens = 0  # held tokens whose text `text` holds
                for msg in batch:
                    match msg:
                        case Token(token=token):
                            generated += 1
                            if msg.cached_tokens is not None:
                                cached = msg.cached_tokens
                            if first_at is None:
                                first_at = now
                                self.metrics.ttft.observe(now - self.arrived_at)
                            else:
                                self.metrics.inter_token.observe(now - last_at)
                            last_at = now
                            try:
                                piece = detok.add(token)
                            except ValueError as e:  # a token the tokenizer cannot decode
                                outcome = "error"
                                if text:
                                    yield TextChunk(text, tuple(held[:chunk_tokens]))
                                raise GenerationError(f"cannot decode token {token}: {e}") from None
                            emit, hit = stops.feed(piece)
                            held.append(msg)
                            if emit:
                                text += emit
                                chunk_tokens = len(held)
                            if hit:
                                outcome = "ok"
                                if text:
                                    yield TextChunk(text, tuple(held))
                                # A stop string ended it before the scheduler's Done.
                                times = (first_at - self.arrived_at, now - first_at)
                                n = len(req.prompt_tokens)
                                early = Outcome("stop", n, cached, generated, *times)
                                yield self._finish(early, "stop", now)
                                return
                        case Done():
                            done_seen = True
                            emit, hit = stops.feed(detok.flush())
                            text += emit + stops.flush()
                            if text:
                                yield TextChunk(text, tuple(held))
                            outcome = "ok"
                            yield self._finish(msg, "stop" if hit else msg.reason, now)
                            return
                        case Failed(message=message):
                            done_seen = True
                            outcome = "error"
                            if text:
                                yield TextChunk(text, tuple(held[:chunk_tokens]))
                            raise GenerationError(message)
                        case _:
                            raise AssertionError(f"request: unexpected message {msg!r}")
                if text:
                    yield TextChunk(text, tuple(held[:chunk_tokens]))
                    del held[:chunk_tokens]
        finally:
            recv.close()
            self.metrics.inc("kvgrove_requests_total", api=req.api, outcome=outcome)
            if not done_seen:
                # Not blocking: the scheduler also notices the closed reply channel.
                with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError):
                    self.scheduler.send_nowait(Cancel(self.request_id, time.monotonic()))

    async def _receive(self, recv: trio.MemoryReceiveChannel) -> list[object]:
        """The next message, waiting for it, and every one queued behind it."""
        stats = recv.statistics()
        was_full = stats.current_buffer_used >= stats.max_buffer_size
        try:
            try:
                batch = [recv.receive_nowait()]
            except trio.WouldBlock:
                batch = [await recv.receive()]
        except trio.EndOfChannel:
            # The scheduler closes a reply channel without Done only at the stall limit.
            raise GenerationError(
                "generation ended: the client stopped reading for longer than the stall limit"
            ) from None
        while not isinstance(batch[-1], Done | Failed):
            try:
                batch.append(recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break  # an end of channel comes back at the next receive
        if was_full:
            # Only a full channel can have parked the sequence; draining it unparks it.
            with contextlib.suppress(trio.WouldBlock):  # the scheduler polls parked ones too
                self.scheduler.send_nowait(Resume(self.request_id))
        return batch

    def _finish(self, done: Outcome, reason: str, now: float) -> Finished:
        computed = done.prompt_tokens - done.cached_tokens
        self.metrics.inc("kvgrove_prompt_tokens_total", computed, kind="computed")
        self.metrics.inc("kvgrove_prompt_tokens_total", done.cached_tokens, kind="reused")
        self.metrics.inc("kvgrove_generated_tokens_total", done.generated_tokens)
        return Finished(**{**done.outcome(), "reason": reason}, total_seconds=now - self.arrived_at)
