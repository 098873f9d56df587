"""The messages actors exchange: frozen attrs classes, one group per boundary.

Channels that carry them are all bounded. Messages that need an answer carry their own reply
send channel (capacity 1, owned by the asker).
"""

from __future__ import annotations

from typing import Any

import attrs

from kvgrove.models.steps import ItemResult, Start, StepItem, StepResult
from kvgrove.scheduling.follow import continued
from kvgrove.scheduling.messages import (
    Cancel,
    Done,
    Failed,
    Outcome,
    Resume,
    SchedulerQuery,
    Submit,
    Token,
)

# Defined below the actors, where the sync cores that make and read them live: the request
# handler <-> scheduler group (`kvgrove.scheduling.messages`) and the step data the scheduler
# and the executor exchange (`kvgrove.models.steps`).
__all__ = [
    "Cancel",
    "Done",
    "Failed",
    "ItemResult",
    "Outcome",
    "Resume",
    "SchedulerQuery",
    "Start",
    "StepItem",
    "StepResult",
    "Submit",
    "Token",
    "continued",
]

# -- scheduler -> executor ---------------------------------------------------------------------


@attrs.frozen
class Step:
    """One unit of executor work: sequences to release or preempt first, then the items.

    Items with one token, `sample` set and a cache already in the executor decode together in
    one batched forward pass; the others (prefill chunks) run one by one in the same step.
    `preempt` drops a sequence's cache but keeps its sampler: its KV goes into the prefix
    cache (`StepResult.kept` says how many tokens) and it resumes from there (a later item with
    no `start` and `resume_tokens`), re-feeding only the rest.
    """

    items: tuple[StepItem, ...]
    release: tuple[int, ...]
    reply: Any  # receives StepResult
    preempt: tuple[int, ...] = ()
    # A plain decode step: right after it the executor runs its continuation (`Follow`) too,
    # without waiting for the scheduler, so `reply` receives two results.
    follow: bool = False
    # Rows of this step are expected to decode in the step after it, in the same batch: the
    # runner launches that forward from this one's still-lazy tokens (`Settings.decode_overlap`).
    # Only then, so a plan that changes the batch rarely finds a step run ahead to undo. A
    # followed step always runs ahead (its continuation is certain): its `ahead` is its
    # continuation's.
    ahead: bool = False


@attrs.frozen
class Follow:
    """Run one more continuation of the last step: every row that sampled a token decodes it,
    nothing else changes (no joins, no releases). Its result goes to that step's `reply`.

    The scheduler sends one while a continuation runs, for the one after it, when it sees no
    change coming: the device then never waits for the tokens to reach the clients. A row that
    ended in the meantime costs one wasted row-step. After a step that failed as a whole, no
    continuation runs (and none replies)."""

    # The scheduler expects some of its rows to decode after it (not every one reaches its
    # token or context limit with the token it samples): it runs ahead (`Step.ahead`).
    ahead: bool = True


@attrs.frozen
class ExecutorQuery:
    reply: Any  # receives ExecutorStats


# -- anyone -> accountant ----------------------------------------------------------------------


@attrs.frozen
class Charge:
    """Set the bytes held by (category, owner); 0 removes the entry."""

    category: str  # "weights" | "live" | "device" | "host" | "disk"
    owner: str
    nbytes: int


@attrs.frozen
class Charges:
    """Several `Charge`s applied at once: no reading ever shows some of them without the rest
    (the executor's per-step update of live caches and tiers)."""

    charges: tuple[Charge, ...]


@attrs.frozen
class MemoryQuery:
    reply: Any  # receives kvgrove.actors.accountant.MemoryStats (what /api/memory shows)


# -- anyone -> pager ---------------------------------------------------------------------------


@attrs.frozen
class Match:
    """Find and lock the longest restorable cached prefix of `tokens` for `request_id`.

    The lock holds until the executor stores the sequence's KV (or `Release`); `reply` (the
    scheduler's inbox) receives `Matched`.
    """

    request_id: int
    namespace: str
    tokens: tuple[int, ...]
    reply: Any  # receives Matched


@attrs.frozen
class Matched:
    request_id: int
    cached_tokens: int


@attrs.frozen
class Release:
    """Unlock whatever prefix `request_id` holds (it ended before the executor saw it)."""

    request_id: int


@attrs.frozen
class CacheQuery:
    """/api/cache: the trie's summary; with `check`, run check_integrity() first."""

    reply: Any  # receives dict
    check: bool = False


# -- pager <-> executor (the prefix cache's copies, on the MLX thread) -------------------------


@attrs.frozen
class UsePager:
    """pager -> executor, once at start: the prefix cache is on; ask for restores and hand over
    what to store on `channel` (the pager's own channel for the executor). `charged`: the tier
    figures the pager charged at start (recovered from disk), which the executor's later charges
    replace: it must know them, or a tier that empties is never charged back to 0."""

    channel: Any  # trio.MemorySendChannel[RestorePrefixes | StorePrefixes]
    charged: tuple[tuple[str, int], ...] = ()


@attrs.frozen
class RestorePrefixes:
    """executor -> pager, before a step: fresh live caches holding the cached prefixes of
    `requests` (`kvgrove.models.runner.RestoreRequest`); `reply` receives `Restored`."""

    requests: tuple[Any, ...]
    reply: Any


@attrs.frozen
class Restored:
    """Per request: (request_id, the live cache or None, the tokens it holds)."""

    caches: tuple[tuple[int, Any, int], ...]


@attrs.frozen
class StorePrefixes:
    """executor -> pager, after a step: store `keeps` (`kvgrove.models.runner.Keep`) in the
    prefix cache, then fit the device tier beside `live_bytes` of live caches (None: not yet,
    the step has not run); `reply` receives `Stored`."""

    keeps: tuple[Any, ...]
    live_bytes: int | None
    reply: Any


@attrs.frozen
class Stored:
    kept: tuple[tuple[int, int], ...]  # (request_id, tokens now cached) per preempted sequence
    tier_bytes: tuple[tuple[str, int], ...]  # what each tier holds now
