"""The scheduler's side of the pager's prefix locks, over real (bounded) memory channels."""

from __future__ import annotations

import trio

from actor_calls import drain
from kvgrove.actors.channels import sender
from kvgrove.actors.messages import Match, Release, Submit
from kvgrove.sampling import SamplingParams
from kvgrove.scheduling.core import SchedulerCore
from kvgrove.scheduling.prefix_locks import PrefixLocks


def setup(pager_items: int = 4):
    core = SchedulerCore(chunk_tokens=64, max_running=4)
    pager_send, pager = trio.open_memory_channel[object](pager_items)
    match = sender(pager_send, lambda rid, ns, tokens: Match(rid, ns, tokens, None))
    locks = PrefixLocks(core, match=match, release=sender(pager_send, Release))
    return core, locks, pager


def submit(rid: int, n: int = 8):
    reply, handler = trio.open_memory_channel[object](4)
    sub = Submit(
        rid, tuple(range(1, n + 1)), SamplingParams(temperature=0), 4, 100, frozenset(), reply
    )
    return sub, handler


def test_a_submit_waits_for_the_match_then_starts_from_the_cached_prefix():
    core, locks, pager = setup()
    sub, _handler = submit(1)
    locks.submit(sub)
    assert core.get(1) is None and 1 in locks.matching
    assert [type(m) for m in drain(pager)] == [Match]
    locks.matched(1, 5)
    seq = core.get(1)
    assert seq is not None and seq.cached_tokens == 5 and not locks.matching


def test_a_swamped_pager_means_computing_the_prompt_in_full():
    core, locks, pager = setup(pager_items=1)
    locks.submit(submit(1)[0])
    locks.submit(submit(2)[0])  # the inbox is full now
    assert 2 not in locks.matching and core.get(2).cached_tokens == 0
    assert len(drain(pager)) == 1


def test_a_request_gone_while_the_pager_looked_has_its_lock_released():
    core, locks, pager = setup()
    sub, handler = submit(1)
    locks.submit(sub)
    handler.close()  # the handler let go before the answer came
    locks.matched(1, 5)
    assert core.get(1) is None
    assert [type(m) for m in drain(pager)] == [Match, Release]


def test_a_cancel_before_the_answer_releases_after_the_match_in_order():
    _core, locks, pager = setup()
    locks.submit(submit(1)[0])
    locks.remove(1, cancelled=True)
    assert [type(m) for m in drain(pager)] == [Match, Release] and not locks.matching


def test_releases_a_full_inbox_refused_are_sent_later():
    _core, locks, pager = setup(pager_items=1)
    locks.submit(submit(1)[0])  # fills the inbox
    locks.remove(1, cancelled=True)
    assert locks.releases == [1]
    assert [type(m) for m in drain(pager)] == [Match]
    locks.send_releases()
    assert locks.releases == [] and drain(pager) == [Release(1)]
