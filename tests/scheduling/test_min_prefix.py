"""A cached or shared prefix shorter than `min_prefix_tokens` is computed, not restored or awaited:
its lock goes back to the pager, and the prompt prefills beside other fresh prompts."""

from __future__ import annotations

import trio

from actor_calls import drain
from kvgrove.actors.channels import sender
from kvgrove.actors.messages import ItemResult, Match, Release, Submit
from kvgrove.sampling import SamplingParams
from kvgrove.scheduling.core import SchedulerCore
from kvgrove.scheduling.prefix_locks import PrefixLocks

SHARED = tuple(range(1, 41))  # 40 tokens


def setup(minimum: int, *, pager_items: int = 4, share: bool = False):
    core = SchedulerCore(
        chunk_tokens=8, max_running=4, share_prefills=share, min_prefix_tokens=minimum
    )
    pager_send, pager = trio.open_memory_channel[object](pager_items)
    match = sender(pager_send, lambda rid, ns, tokens: Match(rid, ns, tokens, None))
    locks = PrefixLocks(core, match=match, release=sender(pager_send, Release))
    return core, locks, pager


def submit(rid: int, prompt: tuple[int, ...]) -> Submit:
    reply, _handler = trio.open_memory_channel[object](4)
    return Submit(rid, prompt, SamplingParams(temperature=0), 4, 1000, frozenset(), reply)


def prompt_sharing(n_shared: int, rid: int) -> tuple[int, ...]:
    return SHARED[:n_shared] + tuple(1000 + 50 * rid + i for i in range(30))


def types(msgs) -> list[type]:
    return [type(m) for m in msgs]


def test_a_short_cached_prefix_is_admitted_uncached_and_its_lock_released():
    core, locks, pager = setup(16)
    locks.submit(submit(1, prompt_sharing(40, 1)))
    locks.matched(1, 15)
    seq = core.get(1)
    assert seq.cached_tokens == seq.fed == 0
    assert types(drain(pager)) == [Match, Release]
    assert core.statistics().short_prefixes == 1
    (item,) = core.plan_step()
    assert item.start.cached_tokens == 0 and len(item.tokens) == 8  # computed from token 0


def test_a_prefix_of_the_minimum_is_restored_and_stays_locked():
    core, locks, pager = setup(16)
    locks.submit(submit(1, prompt_sharing(40, 1)))
    locks.matched(1, 16)
    assert core.get(1).cached_tokens == 16
    assert types(drain(pager)) == [Match]  # the executor's restore takes the lock
    assert core.statistics().short_prefixes == 0


def test_no_minimum_restores_any_prefix():
    for minimum in (0, 1):
        core, locks, pager = setup(minimum)
        locks.submit(submit(1, prompt_sharing(40, 1)))
        locks.matched(1, 1)
        assert core.get(1).cached_tokens == 1
        assert types(drain(pager)) == [Match]


def test_a_short_shared_prefix_is_not_waited_for_and_a_long_one_is():
    core = SchedulerCore(chunk_tokens=8, max_running=4, share_prefills=True, min_prefix_tokens=16)
    core.admit(submit(1, prompt_sharing(40, 1)))  # the leader: prefills 40 shared tokens
    core.admit(submit(2, prompt_sharing(15, 2)))  # would gain 15 by waiting: prefills now
    core.admit(submit(3, prompt_sharing(16, 3)))  # would gain 16: waits
    core.admit(submit(4, prompt_sharing(40, 4)), cached_tokens=30)  # would gain 10: no wait
    assert core.get(2).waits_for is None and core.get(4).waits_for is None
    assert core.get(3).waits_for == 1 and core.get(3).wait_until == 16
    assert core.statistics().prefill_waits == 1
    # Without the minimum, 2 and 4 wait for 1 too (the behaviour before the setting).
    core = SchedulerCore(chunk_tokens=8, max_running=4, share_prefills=True)
    core.admit(submit(1, prompt_sharing(40, 1)))
    core.admit(submit(2, prompt_sharing(15, 2)))
    core.admit(submit(4, prompt_sharing(40, 4)), cached_tokens=30)
    assert core.get(2).waits_for == 1 and core.get(4).waits_for == 1


def _follower_of_a_gone_leader(locks, core, pager):
    """2 waits for leader 1's prefill of 40 shared tokens; 1 is cancelled before it is done."""
    core.admit(submit(1, prompt_sharing(40, 1)))
    (item,) = core.plan_step()
    core.on_result(item, ItemResult(1, None, None, None, 0.01, 0))
    locks.submit(submit(2, prompt_sharing(40, 2)))
    locks.matched(2, 5)  # a short match: cut, its Release goes out (or is queued)
    assert core.get(2).waits_for == 1
    locks.remove(1, cancelled=True)
    core.plan_step()  # the wait is over: 2 is to be matched again


def test_a_short_match_after_a_wait_is_not_restored_either():
    core, locks, pager = setup(16, share=True)
    _follower_of_a_gone_leader(locks, core, pager)
    drain(pager)
    locks.send_rematches()
    assert types(drain(pager)) == [Match] and 2 in locks.rematching
    locks.matched(2, 8)  # what the gone leader had stored: too little
    seq = core.get(2)
    assert seq.cached_tokens == 0 and seq.runnable
    assert types(drain(pager)) == [Release]


def test_a_release_still_queued_goes_before_the_rematch():
    """A Release the full inbox refused must reach the pager before the sequence's next Match,
    or it would unlock the new match."""
    core, locks, pager = setup(16, pager_items=1, share=True)
    core.admit(submit(1, prompt_sharing(40, 1)))
    (item,) = core.plan_step()
    core.on_result(item, ItemResult(1, None, None, None, 0.01, 0))
    locks.submit(submit(2, prompt_sharing(40, 2)))  # its Match fills the inbox
    locks.matched(2, 5)
    assert locks.releases == [2]  # refused
    assert types(drain(pager)) == [Match]
    locks.remove(1, cancelled=True)
    core.plan_step()
    locks.send_rematches()  # the inbox takes one message: the Release goes first
    assert drain(pager) == [Release(2)] and locks.releases == []
    assert 2 not in locks.rematching and core.get(2).runnable  # starts from 0, no new lock


def test_a_prompt_too_short_to_be_stored_as_it_prefills_leads_nobody():
    # The runner stores a prompt as it prefills only if it computes `share_min_tokens` tokens
    # (`Settings.share_prefill_min_tokens`): nobody waits for the prefill of a shorter one.
    for share_min, waits in ((70, True), (71, False)):
        core = SchedulerCore(
            chunk_tokens=8, max_running=4, share_prefills=True, share_min_tokens=share_min
        )
        core.admit(submit(1, prompt_sharing(40, 1)))  # 70 tokens to compute
        core.admit(submit(2, prompt_sharing(40, 2)))
        assert (core.get(2).waits_for == 1) is waits, share_min
    # What it computes counts, not its length: 10 of its 70 tokens were cached.
    core = SchedulerCore(chunk_tokens=8, max_running=4, share_prefills=True, share_min_tokens=61)
    core.admit(submit(1, prompt_sharing(40, 1)), cached_tokens=10)
    core.admit(submit(2, prompt_sharing(40, 2)))
    assert core.get(2).waits_for is None


def test_a_step_prefills_up_to_step_tokens_and_one_prompt_at_most_a_chunk():
    core = SchedulerCore(chunk_tokens=8, max_running=8, step_tokens=20)
    for rid in range(1, 5):
        core.admit(submit(rid, prompt_sharing(0, rid)))  # 30 tokens each
    assert [(it.request_id, len(it.tokens)) for it in core.plan_step()] == [(1, 8), (2, 8), (3, 4)]
    # Without step_tokens a step prefills one chunk in all, as before the setting.
    core = SchedulerCore(chunk_tokens=8, max_running=8)
    for rid in range(1, 5):
        core.admit(submit(rid, prompt_sharing(0, rid)))
    assert [(it.request_id, len(it.tokens)) for it in core.plan_step()] == [(1, 8)]
