"""Shared prefills: a sequence whose uncached prefix another is prefilling waits for it. No trio.

A prompt's KV enters the prefix cache as it is prefilled (at chunk ends), so a sequence that
waits for the one already computing its prefix then matches it from the cache rather than
compute it twice (as SGLang does). The scheduler core decides with these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from kvgrove.scheduling.sequence import SeqState


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def find_leader(
    seq: SeqState, running: Iterable[SeqState], *, min_gain: int = 0, min_leader_tokens: int = 0
) -> tuple[SeqState, int] | None:
    """The running sequence prefilling (or about to) the longest prefix of seq's prompt beyond
    what seq has cached, and how long that shared prefix is; None if there is none, or if it
    would gain seq fewer than `min_gain` tokens (a wait and a second match cost more than
    computing a few tokens beside other fresh prompts). A sequence whose prompt computes fewer
    than `min_leader_tokens` tokens leads nobody: its prefill is not stored as it goes."""
    usable = len(seq.prompt) - 1  # at least one prompt token is always fed
    best, best_common = None, seq.cached_tokens
    for other in running:
        if other is seq or other.finished or other.waiting_for_prefill:
            continue
        if other.submit.namespace != seq.submit.namespace:
            continue
        if len(other.prompt) - other.cached_tokens < min_leader_tokens:
            continue
        common = min(common_prefix(seq.prompt, other.prompt), usable)
        if common > best_common and other.fed < common:
            best, best_common = other, common
    if best is None or best_common - seq.cached_tokens < min_gain:
        return None
    return best, best_common


def wait_is_over(seq: SeqState, running: Mapping[int, SeqState]) -> bool:
    """Whether seq, waiting for a leader's prefill, should match again: the leader has fed the
    shared prefix, or is gone, finished or preempted (no use waiting on it)."""
    leader = running.get(seq.waits_for)
    return (
        leader is None
        or leader.finished
        or leader.fed >= seq.wait_until
        or (leader.started and not leader.has_cache)
    )
