"""The request handler <-> scheduler boundary: frozen attrs messages. No trio here.

They live below the actors because the scheduler's sync core makes and reads them;
`kvgrove.actors.messages` re-exports them with the other groups.
"""

from __future__ import annotations

from typing import Any

import attrs

from kvgrove.sampling import SamplingParams

# -- request handler -> scheduler --------------------------------------------------------------


@attrs.frozen
class Submit:
    """Run one generation. Replies (Token..., then Done or Failed) go to `reply`.

    `max_tokens` None = until the context limit. `context_tokens` is the request's limit
    (min of num_ctx and the model's maximum); the prompt is already checked to be shorter.
    """

    request_id: int
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    max_tokens: int | None
    context_tokens: int
    stop_ids: frozenset[int]
    reply: Any  # trio.MemorySendChannel[Token | Done | Failed]
    namespace: str = ""  # prefix-cache namespace (per API key / cache_salt); "" = shared

    @property
    def handler_gone(self) -> bool:
        """Its handler closed the receive end of `reply` (it will read no more)."""
        return self.reply.statistics().open_receive_channels == 0


@attrs.frozen
class Cancel:
    """The handler is gone (client disconnected, stop string matched, error): drop the sequence."""

    request_id: int
    at_seconds: float  # time.monotonic() when the handler let go


@attrs.frozen
class Resume:
    """The handler drained a full reply channel: a parked sequence may continue."""

    request_id: int


@attrs.frozen
class SchedulerQuery:
    reply: Any  # receives SchedulerStats


# -- scheduler -> request handler --------------------------------------------------------------


@attrs.frozen
class Token:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # On the first token only: the prompt tokens restored from the prefix cache (so a stop
    # string that ends the stream before `Done` still reports them). Not part of equality.
    cached_tokens: int | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Outcome:
    """How a generation ended, in tokens and seconds (`Done`'s and the handler's `Finished`'s
    common part)."""

    reason: str  # "stop" | "length"
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float

    def outcome(self) -> dict[str, Any]:
        """Just the `Outcome` fields (to build another kind of outcome from this one)."""
        return {f.name: getattr(self, f.name) for f in attrs.fields(Outcome)}


@attrs.frozen
class Done(Outcome):
    """The sequence ended normally. Durations are the executor's own (prefill / decode)."""

    queued_seconds: float


@attrs.frozen
class Failed:
    message: str
