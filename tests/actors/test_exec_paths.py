"""The executor's restore and store paths through the real actors, on tiny random models.

Each test pins one promise of the prefix cache: a restore that fails in any way recomputes (same
answer as cache-off, the path unlocked); cached-token counts are the tokens actually restored.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from actor_calls import GREEDY, ask, gather, run
from kvgrove import faults
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import (
    CacheQuery,
    ExecutorQuery,
    MemoryQuery,
    Submit,
    Token,
)
from kvgrove.actors.metrics import Metrics
from kvgrove.actors.requests import Finished, Generation, GenerationRequest
from kvgrove.config import Settings
from kvgrove.models.caches import cache_nbytes, make_cache
from kvgrove.models.generate import generate, prefill_chunks
from kvgrove.models.loading import load

DEADLINE_SECONDS = 60


@pytest.fixture(autouse=True)
def _disarm():
    yield
    faults.disarm()


async def start(nursery, settings, kv_budget_bytes=None):
    """The actors as served (start_engine)."""
    e = await start_engine(nursery, settings, kv_budget_bytes=kv_budget_bytes)
    return e.accountant, e.executor, e.pager, e.scheduler, e.loaded


async def run_together(scheduler, prompts, n, rid0):
    return await gather(*(partial(run, scheduler, rid0 + i, p, n) for i, p in enumerate(prompts)))


def reference(model, prompt, n):
    return [s.token for s in generate(model, list(prompt), GREEDY, max_tokens=n)]


async def settle(accountant, pager, executor):
    """Wait for the last release step, then: nothing live, nothing locked, the trie sound."""
    with trio.fail_after(DEADLINE_SECONDS):
        while executor.statistics().live_sequences:
            await trio.sleep(0.01)  # polling a reading, with a deadline
    await ask(executor.inbox, ExecutorQuery)
    summary = await ask(pager.inbox, lambda r: CacheQuery(r, check=True))
    memory = await ask(accountant.inbox, MemoryQuery)
    assert accountant.statistics().ledger.consistent
    assert summary["locked_requests"] == 0, summary
    assert memory.ledger.live_cache_bytes == 0
    return summary


def prompts_sharing(prefix_len: int, n: int, seed: int = 0):
    prefix = tuple((7 * i + seed) % 240 + 10 for i in range(prefix_len))
    return prefix, [prefix + tuple((3 * i + 11 * k) % 240 + 10 for i in range(5)) for k in range(n)]


@pytest.mark.parametrize("chunk", [16, 128])  # 128: both prompts prefill in one together pass
@pytest.mark.parametrize("arch", ["llama", "window"])
@pytest.mark.parametrize(
    "point,extra",
    [("tiers.promote", {"device_cache_bytes": 1}), ("tiers.stitch", {})],
    ids=["promote", "stitch"],
)
async def test_a_failed_restore_recomputes_the_whole_gap_and_unlocks(
    tiny, arch, point, extra, chunk, tmp_path
):
    folder = tiny(arch)
    model = load(folder).model
    prefix, prompts = prompts_sharing(40, 2)
    expected = [reference(model, p, 6) for p in prompts]
    settings = Settings(
        model=folder, prefill_chunk_tokens=chunk, kv_cache_dir=str(tmp_path), **extra
    )
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler, _ = await start(nursery, settings)
        await run(scheduler, 1, prefix, 2)  # the shared prefix enters the cache
        await settle(accountant, pager, executor)
        faults.arm(point)  # every restore fails now, as an allocation failure would
        got = await run_together(scheduler, prompts, 6, 10)
        assert faults.raised(point) >= 1
        assert [out for out, _ in got] == expected
        # Nothing was restored, so nothing is reported as cached; the paths are unlocked.
        assert [done.cached_tokens for _, done in got] == [0, 0]
        await settle(accountant, pager, executor)
        faults.disarm(point)
        out, done = await run(scheduler, 20, prompts[0], 6)
        assert out == expected[0] and done.cached_tokens > 0
        await settle(accountant, pager, executor)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
async def test_cached_tokens_are_reported_when_a_stop_string_ends_the_stream(tiny, arch, tmp_path):
    folder = tiny(arch)
    settings = Settings(model=folder, prefill_chunk_tokens=16, kv_cache_dir=str(tmp_path))
    prefix, prompts = prompts_sharing(48, 1, seed=5)
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler, loaded = await start(nursery, settings)
        await run(scheduler, 1, (*prefix, 9), 2)
        await settle(accountant, pager, executor)
        out, done = await run(scheduler, 2, prompts[0], 6)
        assert done.cached_tokens > 0
        restored = done.cached_tokens
        await settle(accountant, pager, executor)
        # The same prompt again, stopped by a string: the first generated token's text.
        stop = loaded.tokenizer.decode([out[0]])
        assert stop
        request = GenerationRequest(prompts[0], GREEDY, 6, 400, stop=(stop,))
        gen = Generation(request, scheduler.inbox, loaded.tokenizer, Metrics(), 64)
        events = []
        with trio.fail_after(DEADLINE_SECONDS):
            async for event in gen.stream():
                events.append(event)
        finished = events[-1]
        assert isinstance(finished, Finished) and finished.reason == "stop"
        assert finished.generated_tokens < 6
        assert finished.cached_tokens >= restored
        await settle(accountant, pager, executor)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("arch", ["llama", "window", "qwen3_next"])
async def test_a_preempted_sequence_resumes_from_what_it_stored(tiny, arch, tmp_path):
    folder = tiny(arch)
    model = load(folder).model
    # Four unrelated prompts (no shared prefix) whose caches grow during decode (the attention
    # buffers grow in 256-token steps): two fit while small, not once both have grown, so a
    # preemption happens however the requests' arrivals interleave.
    prompts = [tuple((13 * i + 37 * k) % 240 + 10 + k for i in range(250)) for k in range(4)]
    n = 16
    expected = [reference(model, p, n) for p in prompts]
    no_recompute = sum(len(p) + n - 1 for p in prompts)  # every token fed exactly once
    sizes = []
    for extra in ((), tuple(expected[0])):
        one = make_cache(model)
        for _ in prefill_chunks(model, one, prompts[0] + extra, chunk_tokens=512):
            pass
        sizes.append(cache_nbytes(one))
    small, big = sizes
    assert big > small
    budget = small + big - 1
    computed = {}
    for cache_on in (False, True):
        settings = Settings(model=folder, prefix_cache=cache_on, kv_cache_dir=str(tmp_path))
        async with trio.open_nursery() as nursery:
            accountant, executor, pager, scheduler, _ = await start(
                nursery, settings, kv_budget_bytes=budget
            )
            got = await run_together(scheduler, prompts, n, 1)
            assert [out for out, _ in got] == expected
            assert scheduler.statistics().preempted >= 1
            computed[cache_on] = executor.statistics().tokens_computed
            if cache_on:
                await settle(accountant, pager, executor)
            nursery.cancel_scope.cancel()
    assert computed[False] > no_recompute  # preemption made it recompute from token 0
    assert computed[True] == no_recompute, computed  # resumed from what it stored


@pytest.mark.parametrize("cache_bytes", [0, 1, 10**6, 10**9])
@pytest.mark.parametrize("weights", [0, 1000, 999_999, 10**6])
def test_the_device_split_stays_within_the_one_device_budget(weights, cache_bytes):
    settings = Settings(device_budget_bytes=10**6, device_cache_bytes=cache_bytes)
    split = settings.device_split(weights)
    assert split.live_bytes >= 0 and split.prefix_bytes >= 0
    assert split.weights_bytes + split.live_bytes + split.prefix_bytes <= 10**6
    assert settings.prefix_device_budget_bytes(weights) == split.prefix_bytes
    if cache_bytes:
        assert split.prefix_bytes == min(cache_bytes, 10**6 - weights)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
async def test_no_reading_exceeds_the_device_budget_under_load(tiny, arch, tmp_path):
    folder = tiny(arch)
    lm = load(folder)
    _, prompts = prompts_sharing(120, 6, seed=2)
    prompts = [p + tuple((5 * i + k) % 240 + 10 for i in range(100)) for k, p in enumerate(prompts)]
    one = make_cache(lm.model)
    for _ in prefill_chunks(lm.model, one, prompts[0] + (1,) * 16, chunk_tokens=512):
        pass
    # Room for about five sequences' caches beside the weights, shared by live and cached KV.
    budget = lm.info.nbytes + 5 * cache_nbytes(one)
    settings = Settings(
        model=folder,
        prefill_chunk_tokens=64,
        device_budget_bytes=budget,
        kv_cache_dir=str(tmp_path),
    )
    split = settings.device_split(lm.info.nbytes)
    assert split.weights_bytes + split.room_bytes <= budget
    expected = [reference(lm.model, p, 16) for p in prompts]
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler, _ = await start(nursery, settings)
        for wave in range(2):  # the second wave hits what the first cached
            got = await run_together(scheduler, prompts, 16, 1 + 10 * wave)
            assert [out for out, _ in got] == expected
        summary = await settle(accountant, pager, executor)
        memory = await ask(accountant.inbox, MemoryQuery)
        assert memory.device_peak_bytes <= budget, (memory, split)
        assert summary["bytes"]["device"] <= split.prefix_bytes
        assert summary["moved_bytes"], "the load was meant to page cached KV off the device"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chunk", [16, 256])  # prefilled in chunks / alone or together
@pytest.mark.parametrize("arch", ["llama", "window"])
async def test_a_prompt_is_shared_as_soon_as_its_prefill_is_done(tiny, arch, chunk, tmp_path):
    folder = tiny(arch)
    model = load(folder).model
    prompt = tuple((11 * i) % 240 + 10 for i in range(60))
    other = tuple((17 * i) % 240 + 12 for i in range(30))
    expected = reference(model, prompt, 4)
    settings = Settings(model=folder, prefill_chunk_tokens=chunk, kv_cache_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler, _ = await start(nursery, settings)
        # A's reader takes one token and stops reading: A stays running (parked) and never
        # closes, so its KV can only have entered the trie when its prefill was done.
        send, recv = trio.open_memory_channel(1)
        await scheduler.inbox.send(Submit(1, prompt, GREEDY, 300, 400, frozenset(), send))
        # Another prompt arrives with it (so A may prefill together with it).
        other_done = trio.Event()

        async def run_other():
            await run(scheduler, 3, other, 4)
            other_done.set()

        nursery.start_soon(run_other)
        with trio.fail_after(DEADLINE_SECONDS):
            first = await recv.receive()
        assert isinstance(first, Token) and first.token == expected[0]
        out, done = await run(scheduler, 2, prompt, 4)
        assert out == expected
        assert done.cached_tokens == len(prompt) - 1  # all of it but the token it must feed
        assert scheduler.core.get(1) is not None  # A is still running
        with trio.fail_after(DEADLINE_SECONDS):
            await other_done.wait()
        recv.close()
        await settle(accountant, pager, executor)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("arch", ["llama", "window", "qwen3_next"])
async def test_identical_prompts_arriving_together_prefill_once(tiny, arch, tmp_path):
    folder = tiny(arch)
    model = load(folder).model
    prompt = tuple((19 * i) % 240 + 10 for i in range(200))
    n = 5
    expected = reference(model, prompt, n)
    settings = Settings(model=folder, prefill_chunk_tokens=16, kv_cache_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler, _ = await start(nursery, settings)
        got = await run_together(scheduler, [prompt] * 3, n, 1)
        assert [out for out, _ in got] == [expected] * 3
        assert sorted(done.cached_tokens for _, done in got) == [0, 199, 199]
        assert scheduler.statistics().prefill_waits == 2
        # The prompt was computed once; the followers fed only its last token, then decoded.
        assert executor.statistics().tokens_computed == 200 + 2 * 1 + 3 * (n - 1)
        await settle(accountant, pager, executor)
        nursery.cancel_scope.cancel()


async def test_a_follower_whose_leader_is_cancelled_computes_its_prompt(tiny, tmp_path):
    folder = tiny("llama")
    model = load(folder).model
    prompt = tuple((23 * i) % 240 + 10 for i in range(200))
    expected = reference(model, prompt, 4)
    settings = Settings(model=folder, prefill_chunk_tokens=16, kv_cache_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler, _ = await start(nursery, settings)
        send, recv = trio.open_memory_channel(1)
        await scheduler.inbox.send(Submit(1, prompt, GREEDY, 4, 400, frozenset(), send))
        result = {}

        async def follower():
            result["out"] = await run(scheduler, 2, prompt, 4)

        nursery.start_soon(follower)
        with trio.fail_after(DEADLINE_SECONDS):
            while scheduler.statistics().prefill_waits < 1:
                await trio.sleep(0.005)  # polling a counter, with a deadline
        recv.close()  # the leader's client goes away mid-prefill
        with trio.fail_after(DEADLINE_SECONDS):
            while "out" not in result:
                await trio.sleep(0.005)
        out, done = result["out"]
        assert out == expected
        assert done.cached_tokens < len(prompt)  # what the leader had stored, no more
        await settle(accountant, pager, executor)
        nursery.cancel_scope.cancel()
