"""Continuous batching through the actors' channels, on tiny random-weight models (real MLX)."""

from __future__ import annotations

import logging
from functools import partial

import attrs
import pytest
import trio
from mlx_lm.models import cache as mlx_cache

from actor_calls import gather
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import Done, Failed, MemoryQuery, Submit, Token
from kvgrove.config import Settings
from kvgrove.models.generate import generate
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from tiny_models import ShapeLogging
from waiting import wait_until

GREEDY = SamplingParams(temperature=0)
MARKED = 311  # a prompt holding this token makes the faulty model's forward raise


class FaultyModel:
    """A real model whose forward raises on a marked token, or on the next batched decode."""

    def __init__(self, inner, *, window: int | None = None) -> None:
        self.inner = inner
        self.window = window
        self.fail_next_decode = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, inputs, cache=None):
        if any(MARKED in row for row in inputs.tolist()):
            raise RuntimeError("marked token")
        if self.fail_next_decode and inputs.shape[0] > 1 and inputs.shape[1] == 1:
            self.fail_next_decode = False
            raise RuntimeError("decode fault")
        return self.inner(inputs, cache=cache)

    def make_cache(self):
        if self.window is None:
            return mlx_cache.make_prompt_cache(self.inner)
        # Sliding-window layers: kvgrove has no batched form for them.
        return [mlx_cache.RotatingKVCache(max_size=self.window) for _ in self.inner.layers]


def wrapping_loader(**kwargs):
    def loader(name):
        loaded = load(name)
        loaded.model = FaultyModel(loaded.model, **kwargs)
        return loaded

    return loader


async def start_actors(nursery, settings, *, loader=load, kv_budget_bytes=None):
    """The actors as served (start_engine), the prefix cache off."""
    engine = await start_engine(
        nursery,
        attrs.evolve(settings, prefix_cache=False),
        loader=loader,
        kv_budget_bytes=kv_budget_bytes,
    )
    return engine.accountant, engine.executor, engine.scheduler


def prompts_of_lengths(*lengths):
    return [tuple((7 * i + 3 * n) % 250 + 5 for i in range(n)) for n in lengths]


async def run_request(scheduler, rid, prompt, max_tokens, *, params=GREEDY):
    send, recv = trio.open_memory_channel(64)
    await scheduler.inbox.send(
        Submit(rid, tuple(prompt), params, max_tokens, 400, frozenset(), send)
    )
    out = []
    async for msg in recv:
        out.append(msg)
        if isinstance(msg, Done | Failed):
            break
    return out


async def run_all(scheduler, prompts, max_tokens, *, first_id=1):
    calls = (
        partial(run_request, scheduler, first_id + i, p, max_tokens) for i, p in enumerate(prompts)
    )
    return await gather(*calls)


def tokens(msgs):
    return [m.token for m in msgs if isinstance(m, Token)]


def solo(folder, prompts, n):
    model = load(folder).model
    return [[s.token for s in generate(model, p, GREEDY, max_tokens=n)] for p in prompts]


async def idle_memory(accountant):
    """The ledger's summary once the last release step's charges are in (no live bytes)."""

    async def idle():
        send, recv = trio.open_memory_channel(1)
        await accountant.inbox.send(MemoryQuery(send))
        memory = await recv.receive()
        return memory if memory.ledger.live_cache_bytes == 0 else None

    memory = await wait_until(idle, what="no live cache bytes")
    assert accountant.statistics().ledger.consistent
    return memory


@pytest.mark.parametrize("arch", ["llama", "qwen3_next"])
async def test_concurrent_requests_decode_in_one_batch_with_solo_tokens(tiny, arch):
    folder = tiny(arch)
    prompts = prompts_of_lengths(5, 40, 17, 90, 3, 26)
    expected = solo(folder, prompts, 10)
    settings = Settings(model=folder, prefill_chunk_tokens=32)
    async with trio.open_nursery() as nursery:
        accountant, executor, scheduler = await start_actors(nursery, settings)
        results = await run_all(scheduler, prompts, 10)
        assert [tokens(r) for r in results] == expected
        assert all(isinstance(r[-1], Done) and r[-1].reason == "length" for r in results)
        memory = await idle_memory(accountant)
        assert memory.ledger.live_cache_bytes == 0
        stats = executor.statistics()
        assert stats.batched and stats.max_batch_rows >= 4
        assert stats.live_sequences == 0 and stats.batch_rows == 0
        assert scheduler.statistics().max_decode_rows >= 4
        nursery.cancel_scope.cancel()


async def test_batching_off_decodes_one_row_at_a_time_with_the_same_tokens(tiny):
    folder = tiny("llama")
    prompts = prompts_of_lengths(6, 20, 11)
    expected = solo(folder, prompts, 8)
    settings = Settings(model=folder, max_running_sequences=1)
    async with trio.open_nursery() as nursery:
        _, executor, scheduler = await start_actors(nursery, settings)
        results = await run_all(scheduler, prompts, 8)
        assert [tokens(r) for r in results] == expected
        assert executor.statistics().max_batch_rows == 1
        nursery.cancel_scope.cancel()


async def test_unbatchable_caches_fall_back_to_one_at_a_time_with_a_logged_reason(tiny, caplog):
    folder = tiny("llama")
    prompts = prompts_of_lengths(6, 20, 11)
    model = FaultyModel(load(folder).model, window=256)
    expected = [[s.token for s in generate(model, p, GREEDY, max_tokens=8)] for p in prompts]
    settings = Settings(model=folder)
    caplog.set_level(logging.WARNING, logger="kvgrove.actors.executor")
    async with trio.open_nursery() as nursery:
        _, executor, scheduler = await start_actors(
            nursery, settings, loader=wrapping_loader(window=256)
        )
        assert "batching off" in caplog.text and "WindowKVCache" in caplog.text
        results = await run_all(scheduler, prompts, 8)
        assert [tokens(r) for r in results] == expected
        stats = executor.statistics()
        assert not stats.batched and stats.max_batch_rows == 0
        assert scheduler.statistics().max_decode_rows == 3  # planned together, run one by one
        nursery.cancel_scope.cancel()


async def test_a_failing_step_fails_only_its_requests_and_serving_goes_on(tiny):
    folder = tiny("llama")
    good = prompts_of_lengths(8, 30, 14)
    bad = (5, 6, MARKED, 8)
    expected = solo(folder, good, 12)
    settings = Settings(model=folder)
    async with trio.open_nursery() as nursery:
        accountant, executor, scheduler = await start_actors(
            nursery, settings, loader=wrapping_loader()
        )
        # A prefill that raises, while the others decode in a batch: only it fails.
        results = await run_all(scheduler, [*good, bad], 12)
        assert [tokens(r) for r in results[:3]] == expected
        assert results[3] == [Failed("generation failed: marked token")]
        # A batched decode that raises fails the rows in that step, and nothing else. (Prompts
        # are prefilled one by one here, so the fault hits the decode, not a batched prefill.)
        executor.settings = attrs.evolve(executor.settings, batch_prefill=False)
        executor.loaded.model.fail_next_decode = True
        # Which rows are in that step depends on when each request came in (a prompt still
        # prefilling then is not): at least two (the fault hits a batch), the others finish
        # with their solo tokens.
        results = await run_all(scheduler, good, 12, first_id=10)
        failed = [r for r in results if isinstance(r[-1], Failed)]
        assert len(failed) >= 2, [r[-1] for r in results]
        assert all(r[-1].message == "generation failed: decode fault" for r in failed)
        for r, want in zip(results, expected, strict=True):
            if not isinstance(r[-1], Failed):
                assert tokens(r) == want
        # The server keeps serving.
        results = await run_all(scheduler, good, 12, first_id=20)
        assert [tokens(r) for r in results] == expected
        memory = await idle_memory(accountant)
        assert memory.ledger.live_cache_bytes == 0
        assert executor.statistics().live_sequences == 0
        nursery.cancel_scope.cancel()


async def test_memory_pressure_preempts_the_newest_and_it_resumes_with_solo_tokens(tiny):
    folder = tiny("llama")
    prompts = prompts_of_lengths(200, 200, 200, 200)
    expected = solo(folder, prompts, 80)
    settings = Settings(model=folder)
    # Room for two of them: tiny llama holds 2 layers x 2 x 2 heads x 16 x 4 bytes per token
    # (512), in 256-token buffers, batched or not. Two are admitted (the third does not fit
    # beside them); when their decode crosses 256 tokens their buffers double, the caches
    # outgrow the budget and the newest is preempted.
    async with trio.open_nursery() as nursery:
        accountant, _executor, scheduler = await start_actors(
            nursery, settings, kv_budget_bytes=300_000
        )
        results = await run_all(scheduler, prompts, 80)
        assert [tokens(r) for r in results] == expected
        assert scheduler.statistics().preempted >= 1
        memory = await idle_memory(accountant)
        assert memory.ledger.live_cache_bytes == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_batched_prefill_falls_back_to_one_prompt_at_a_time(tiny):
    folder = tiny("llama")
    prompts = prompts_of_lengths(9, 25, 14, 30)
    expected = solo(folder, prompts, 6)
    settings = Settings(model=folder)
    async with trio.open_nursery() as nursery:
        _, executor, scheduler = await start_actors(nursery, settings, loader=wrapping_loader())
        # The first (B, 1) call with B > 1 is the batched prefill's last-token step: it raises.
        executor.loaded.model.fail_next_decode = True
        results = await run_all(scheduler, prompts, 6)
        assert [tokens(r) for r in results] == expected
        assert not executor.loaded.model.fail_next_decode  # the fault did fire
        nursery.cancel_scope.cancel()


async def test_new_prompts_prefill_together_with_solo_tokens(tiny):
    folder = tiny("llama")
    prompts = prompts_of_lengths(3, 41, 17, 8, 29, 2)
    expected = solo(folder, prompts, 8)
    calls = []
    settings = Settings(model=folder)

    def loader(name):
        loaded = load(name)
        inner = loaded.model

        class Counting(FaultyModel):
            def __call__(self, inputs, cache=None):
                calls.append(tuple(inputs.shape))
                return super().__call__(inputs, cache=cache)

        loaded.model = Counting(inner)
        return loaded

    async with trio.open_nursery() as nursery:
        _, _, scheduler = await start_actors(nursery, settings, loader=loader)
        results = await run_all(scheduler, prompts, 8)
        assert [tokens(r) for r in results] == expected
        # Several prompts went through one (B, T) pass, B > 1, T > 1.
        assert any(b > 1 and t > 1 for b, t in calls), calls
        nursery.cancel_scope.cancel()


async def test_a_burst_after_a_batch_emptied_row_by_row_is_admitted_in_one_step(tiny):
    """A new prompt's cache is estimated at its tokens times one token's KV (tiny llama: 512
    bytes), not at a row's share of a batch's buffers, which counts their spare rows: after
    sixteen rows leave a batch one at a time (the last alone in buffers for sixteen), sixteen
    new prompts that fit the budget by their size start together, in one prefill pass. The
    share had estimated each at ~60 times its size: they went in passes of 3, 2, 2, 1, 1, ..."""
    folder = tiny("llama")
    first, burst = prompts_of_lengths(*range(40, 56)), prompts_of_lengths(*range(60, 76))
    expected = solo(folder, burst, 4)
    shapes = []

    def loader(name):
        loaded = load(name)
        loaded.model = ShapeLogging(loaded.model, shapes)
        return loaded

    settings = Settings(model=folder, warm_up=False)
    async with trio.open_nursery() as nursery:
        # 3 MB: the burst's batch (16 rows x 256 positions x 512 bytes, 2.1 MB) fits.
        accountant, _, scheduler = await start_actors(
            nursery, settings, loader=loader, kv_budget_bytes=3_000_000
        )
        calls = (partial(run_request, scheduler, 1 + i, p, 2 + i) for i, p in enumerate(first))
        await gather(*calls)  # rows leave one at a time
        await idle_memory(accountant)
        shapes.clear()
        replies = []
        for i, prompt in enumerate(burst):  # all at once: the scheduler sees them together
            send, recv = trio.open_memory_channel(64)
            replies.append(recv)
            scheduler.inbox.send_nowait(Submit(100 + i, prompt, GREEDY, 4, 400, frozenset(), send))
        outputs = []
        with trio.fail_after(60):
            for recv in replies:
                outputs.append(tokens([m async for m in recv]))
        assert outputs == expected
        assert [b for b, t in shapes if t > 1] == [16], shapes
        nursery.cancel_scope.cancel()
