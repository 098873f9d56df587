"""Prompts that share only a short cached prefix prefill together, through the real actors
(`Settings.min_prefix_tokens`); a long enough one is still restored."""

from __future__ import annotations

from functools import partial

import trio

from actor_calls import ask, gather, run
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import CacheQuery, ExecutorQuery, MemoryQuery
from kvgrove.config import Settings
from kvgrove.models.generate import generate
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from waiting import wait_until


def counting_loader(calls: list[tuple[int, ...]]):
    """The real model, its forward passes' input shapes noted."""

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, inputs, cache=None):
            calls.append(tuple(inputs.shape))
            return self.inner(inputs, cache=cache)

    def loader(name):
        loaded = load(name)
        loaded.model = Counting(loaded.model)
        return loaded

    return loader


def prompts(shared: int, n: int):
    prefix = tuple((7 * i) % 240 + 10 for i in range(shared))
    own = [tuple((5 * i + 13 * k) % 240 + 10 for i in range(20)) for k in range(1, n + 1)]
    return prefix + own[0], [prefix + o for o in own[1:]]


async def settle(engine):
    await wait_until(
        lambda: engine.executor.statistics().live_sequences == 0, what="no live sequence"
    )
    await ask(engine.executor.inbox, ExecutorQuery)
    summary = await ask(engine.pager.inbox, lambda r: CacheQuery(r, check=True))
    memory = await ask(engine.accountant.inbox, MemoryQuery)
    assert summary["locked_requests"] == 0, summary
    assert engine.accountant.statistics().ledger.consistent
    assert memory.ledger.live_cache_bytes == 0


async def wave(tiny, tmp_path, shared: int, minimum: int):
    folder = tiny("llama")
    first, rest = prompts(shared, 9)
    model = load(folder).model
    greedy = SamplingParams(temperature=0)
    expected = [[s.token for s in generate(model, list(p), greedy, max_tokens=4)] for p in rest]
    calls: list[tuple[int, ...]] = []
    settings = Settings(model=folder, kv_cache_dir=str(tmp_path), min_prefix_tokens=minimum)
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings, loader=counting_loader(calls))
        await run(engine.scheduler, 1, first, 2)  # the shared prefix enters the cache
        await settle(engine)
        calls.clear()
        got = await gather(
            *(partial(run, engine.scheduler, 10 + i, p, 4) for i, p in enumerate(rest))
        )
        assert [out for out, _ in got] == expected
        stats = engine.scheduler.statistics()
        await settle(engine)
        nursery.cancel_scope.cancel()
    return [done.cached_tokens for _, done in got], stats, calls


async def test_prompts_sharing_a_short_cached_prefix_prefill_together(tiny, tmp_path):
    cached, stats, calls = await wave(tiny, tmp_path, 8, 16)
    assert cached == [0] * 8  # 8 cached tokens were not worth restoring
    assert stats.short_prefixes == 8 and stats.prefill_waits == 0
    # They arrive as the pager answers, so they may come in a few groups; each group of two or
    # more prefills in one (B, T) pass (a restored prefix would prefill on its own).
    assert any(b > 1 and t > 1 for b, t in calls), calls


async def test_a_long_enough_cached_prefix_is_restored(tiny, tmp_path):
    cached, stats, _ = await wave(tiny, tmp_path, 16, 16)
    assert cached == [16] * 8 and stats.short_prefixes == 0


async def test_no_minimum_restores_a_short_prefix(tiny, tmp_path):
    cached, stats, _ = await wave(tiny, tmp_path, 8, 0)
    assert cached == [8] * 8 and stats.short_prefixes == 0
