"""The actors through their channels, on a tiny random-weight model (real loader, real MLX)."""

from __future__ import annotations

import time

import attrs
import pytest
import trio

from actor_calls import ask
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import Cancel, Done, MemoryQuery, Resume, Submit, Token
from kvgrove.config import Settings
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from waiting import wait_until


@pytest.fixture
def tiny_llama(tiny) -> str:
    return tiny("llama")


async def start_actors(nursery, settings):
    """The actors as served (start_engine), the prefix cache off."""
    engine = await start_engine(nursery, attrs.evolve(settings, prefix_cache=False), loader=load)
    return engine.accountant, engine.executor, engine.scheduler


def make_submit(rid, reply, *, n_prompt=20, max_tokens=6):
    return Submit(
        request_id=rid,
        prompt_tokens=tuple(range(10, 10 + n_prompt)),
        params=SamplingParams(temperature=0),
        max_tokens=max_tokens,
        context_tokens=400,
        stop_ids=frozenset(),
        reply=reply,
    )


def live_bytes_zero(accountant):
    """A condition for wait_until: the ledger's memory summary once it holds no live bytes."""

    async def check():
        memory = await ask(accountant.inbox, MemoryQuery)
        return memory if memory.ledger.live_cache_bytes == 0 else None

    return check


async def collect(recv) -> list:
    out = []
    async for msg in recv:
        out.append(msg)
        if isinstance(msg, Done):
            break
    return out


async def test_slow_reader_parks_only_its_own_sequence(tiny_llama):
    settings = Settings(model=tiny_llama, prefill_chunk_tokens=8)
    async with trio.open_nursery() as nursery:
        accountant, _executor, scheduler = await start_actors(nursery, settings)
        slow_send, slow_recv = trio.open_memory_channel(1)
        fast_send, fast_recv = trio.open_memory_channel(64)
        await scheduler.inbox.send(make_submit(1, slow_send, max_tokens=10))
        await scheduler.inbox.send(make_submit(2, fast_send, max_tokens=10))
        fast = await collect(fast_recv)
        assert [type(m) for m in fast] == [Token] * 10 + [Done]
        assert scheduler.statistics().parked == 1  # the slow one waits, holding one token
        # Draining the slow reader (with Resume, as the request actor does) finishes it.
        slow = []
        while not slow or not isinstance(slow[-1], Done):
            slow.append(await slow_recv.receive())
            scheduler.inbox.send_nowait(Resume(1))
        assert [m.token for m in slow[:-1]] == [m.token for m in fast[:-1]]  # same prompt
        await wait_until(live_bytes_zero(accountant), what="the live caches charged off")
        assert accountant.statistics().ledger.consistent
        nursery.cancel_scope.cancel()


async def test_cancel_mid_prefill_stops_within_one_chunk(tiny_llama):
    settings = Settings(model=tiny_llama, prefill_chunk_tokens=4)
    async with trio.open_nursery() as nursery:
        accountant, executor, scheduler = await start_actors(nursery, settings)
        send, recv = trio.open_memory_channel(8)
        other_send, other_recv = trio.open_memory_channel(64)
        await scheduler.inbox.send(make_submit(1, send, n_prompt=300, max_tokens=5))
        await scheduler.inbox.send(make_submit(2, other_send, n_prompt=12, max_tokens=5))
        await wait_until(
            lambda: any(rid == 1 for rid, _, _ in executor.step_log),
            what="request 1's first prefill chunk",
            poll=0,
        )
        cancelled_at = time.monotonic()
        recv.close()
        await scheduler.inbox.send(Cancel(1, cancelled_at))
        other = await collect(other_recv)
        assert isinstance(other[-1], Done) and other[-1].generated_tokens == 5
        late = [s for rid, s, _ in executor.step_log if rid == 1 and s > cancelled_at]
        assert len(late) <= 1
        steps_for_1 = sum(1 for rid, _, _ in executor.step_log if rid == 1)
        assert steps_for_1 < 300 // 4
        await wait_until(
            lambda: executor.statistics().live_sequences == 0, what="the live caches released"
        )
        memory = await wait_until(live_bytes_zero(accountant), what="the live caches charged off")
        assert memory.ledger.weights_bytes > 0
        nursery.cancel_scope.cancel()
