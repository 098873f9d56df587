"""What one step of the executor takes and gives: plain frozen data, no trio, no MLX.

The scheduler builds `StepItem`s (inside `kvgrove.actors.messages.Step`, which adds the reply
channel); the step runner (`kvgrove.models.runner`) returns a `StepResult`. They live here, below
the actors, so the runner that fills them needs nothing from the layers above it.
"""

from __future__ import annotations

import attrs

from kvgrove.sampling import SamplingParams


@attrs.frozen
class Start:
    """What the executor needs the first time it sees a sequence."""

    params: SamplingParams
    prompt_tokens: tuple[int, ...]
    context_tokens: int
    namespace: str = ""  # the prefix-cache namespace its KV is stored under
    cached_tokens: int = 0  # the pager locked this many prompt tokens: restore them first


@attrs.frozen
class StepItem:
    """Feed `tokens` into the sequence's cache; when `sample`, draw a token after the last one."""

    request_id: int
    tokens: tuple[int, ...]
    sample: bool
    start: Start | None = None  # set on the sequence's first item
    # A preempted sequence resuming: restore its first `resume_tokens` history tokens from the
    # prefix cache (recomputing whatever is no longer there) before feeding `tokens`.
    resume_tokens: int = 0


@attrs.frozen
class ItemResult:
    request_id: int
    token: int | None
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    seconds: float
    cache_bytes: int
    error: str | None = None  # this item failed; its sequence ends with this message
    # On a sequence's first item: the prompt tokens restored from the prefix cache (fewer than
    # `Start.cached_tokens` promised when a restore fell back to recomputing).
    cached_tokens: int | None = None
    # Bytes one more cached token of this row takes (`caches.token_nbytes`: no spare rows or
    # positions, which `cache_bytes`, its share of a batch's buffers, counts); 0 = not known.
    token_bytes: int = 0


@attrs.frozen
class StepResult:
    results: tuple[ItemResult, ...]
    error: str | None = None  # the step failed as a whole (e.g. out of memory)
    # (request_id, tokens) for each preempted sequence whose KV the prefix cache now holds.
    kept: tuple[tuple[int, int], ...] = ()


@attrs.frozen
class ExecutorStats:
    """The executor's statistics() snapshot (ExecutorQuery's answer)."""

    steps: int
    items: int
    live_sequences: int
    tokens_computed: int
    weights_bytes: int = 0
    batch_rows: int = 0  # rows in the running batch now
    max_batch_rows: int = 0  # the most rows one batched forward pass has decoded
    batched: bool = True  # False: the model's caches cannot batch; rows decode one by one
    overlapped_steps: int = 0  # batched decodes launched before the scheduler planned them
    wasted_row_steps: int = 0  # rows decoded ahead that the plan did not take
    fused_steps: int = 0  # overlapped decodes sampled in the forward's own graph
    queued_steps: int = 0  # continuations queued on the MLX thread behind their step
    mlx_busy_seconds: float = 0.0  # the MLX thread's time running work (steps, copies)
