"""The prefix cache through the actors (pager + scheduler + executor) on tiny random models.

Greedy tokens must be identical with the cache off, on, and after the cached KV went through the
host tier and the disk tier, for plain attention (llama), hybrid recurrent (qwen3_next) and MLA
(glm4_moe_lite) models; every byte must be accounted for and the trie consistent afterwards.
"""

from __future__ import annotations

import threading
import time
from functools import partial

import attrs
import pytest
import trio

from actor_calls import GREEDY, ask, gather, run
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import (
    CacheQuery,
    Cancel,
    Done,
    ExecutorQuery,
    Match,
    MemoryQuery,
    Release,
    Submit,
    Token,
)
from kvgrove.config import Settings
from kvgrove.models.generate import generate
from kvgrove.models.loading import load
from tiny_models import ShapeLogging
from waiting import wait_until

ARCHS = ["llama", "qwen3_next", "glm4_moe_lite", "window", "gemma3", "default"]


def shape_logging(shapes: list, name: str):
    """A loader whose model appends each forward pass's input shape to `shapes`."""
    loaded = load(name)
    loaded.model = ShapeLogging(loaded.model, shapes)
    return loaded


async def start(nursery, settings):
    """The actors as served (start_engine)."""
    engine = await start_engine(nursery, settings)
    return engine.accountant, engine.executor, engine.pager, engine.scheduler


def conversation(seed: int) -> list[tuple[int, ...]]:
    """Three user turns; each prompt extends the previous one (as a chat's turns do)."""
    system = tuple((11 * i + seed) % 240 + 10 for i in range(37))
    return [
        tuple((5 * i + 13 * t + seed) % 240 + 10 for i in range(9 + 4 * t)) for t in range(3)
    ], system


async def multi_turn(scheduler, system, turns, n, rid0, namespace=""):
    """Run a conversation: each turn's prompt = the history so far + the new user tokens."""
    history = list(system)
    outputs, cached = [], []
    for t, user in enumerate(turns):
        history += user
        out, done = await run(scheduler, rid0 + t, history, n, namespace=namespace)
        outputs.append(out)
        cached.append(done.cached_tokens)
        history += out
    return outputs, cached


def reference(folder, system, turns, n):
    model = load(folder).model
    history, outputs = list(system), []
    for user in turns:
        history += user
        out = [s.token for s in generate(model, history, GREEDY, max_tokens=n)]
        outputs.append(out)
        history += out
    return outputs


async def check_clean(accountant, pager, executor):
    # Wait for the scheduler's last release step to give up every live cache, then for the
    # executor to answer a query (it answers in order, after the step's charges are sent).
    await wait_until(
        lambda: executor.statistics().live_sequences == 0, what="the live caches released"
    )
    await ask(executor.inbox, ExecutorQuery)
    summary = await ask(pager.inbox, lambda r: CacheQuery(r, check=True))
    memory = await ask(accountant.inbox, MemoryQuery)
    assert accountant.statistics().ledger.consistent
    assert memory.ledger.live_cache_bytes == 0
    assert summary["locked_requests"] == 0
    assert summary["integrity"]["clean"], summary["integrity"]
    assert attrs.asdict(memory.ledger.cached_kv_bytes) == summary["bytes"]
    assert executor.statistics().live_sequences == 0
    return summary, memory


@pytest.mark.parametrize("arch", ARCHS)
async def test_multi_turn_outputs_identical_with_cache_on_off_and_paged(tiny, arch, tmp_path):
    folder = tiny(arch)
    turns, system = conversation(3)
    expected = reference(folder, system, turns, 6)
    for name, extra in [
        ("off", {"prefix_cache": False}),
        ("device", {}),
        ("host", {"device_cache_bytes": 1}),
        ("disk", {"device_cache_bytes": 1, "host_budget_bytes": 1}),
    ]:
        settings = Settings(
            model=folder, prefill_chunk_tokens=16, kv_cache_dir=str(tmp_path / name), **extra
        )
        async with trio.open_nursery() as nursery:
            accountant, executor, pager, scheduler = await start(nursery, settings)
            outputs, cached = await multi_turn(scheduler, system, turns, 6, 1)
            assert outputs == expected, name
            if name == "off":
                assert cached == [0, 0, 0]
            else:
                # Each later turn reuses at least the previous turn's prompt.
                assert cached[1] >= len(system) + len(turns[0]), (name, cached)
                assert cached[2] >= len(system) + len(turns[0]) + 6 + len(turns[1]), (name, cached)
                summary, _ = await check_clean(accountant, pager, executor)
                tier = {"device": "device", "host": "host", "disk": "disk"}[name]
                assert summary["bytes"][tier] > 0, summary
                if name != "device":
                    assert summary["bytes"]["device"] <= 1
                    assert summary["moved_bytes"], summary
            nursery.cancel_scope.cancel()


async def test_namespaces_never_share_cached_prefixes(tiny, tmp_path):
    folder = tiny("llama")
    prompt = tuple(range(20, 80))
    settings = Settings(model=folder, kv_cache_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        first, done = await run(scheduler, 1, prompt, 4, namespace="tenant-a")
        assert done.cached_tokens == 0
        again, done = await run(scheduler, 2, prompt, 4, namespace="tenant-a")
        assert done.cached_tokens == len(prompt) - 1 and again == first
        other, done = await run(scheduler, 3, prompt, 4, namespace="tenant-b")
        assert done.cached_tokens == 0 and other == first
        summary, _ = await check_clean(accountant, pager, executor)
        assert summary["namespaces"] == 2
        nursery.cancel_scope.cancel()


async def run_to_disk(settings, prompt, n):
    """One uncached request on fresh actors, then a stop, which writes the cache to disk."""
    async with trio.open_nursery() as nursery:
        _, _, _, scheduler = await start(nursery, settings)
        tokens, done = await run(scheduler, 1, prompt, n)
        assert done.cached_tokens == 0
        nursery.cancel_scope.cancel()  # the executor writes the cache to disk on its way out
    return tokens


async def test_cache_survives_a_restart_on_the_same_directory(tiny, tmp_path):
    folder = tiny("qwen3_next")
    prompt = tuple((3 * i) % 240 + 10 for i in range(70))
    settings = Settings(model=folder, prefill_chunk_tokens=32, kv_cache_dir=str(tmp_path))
    first = await run_to_disk(settings, prompt, 5)
    assert list(tmp_path.rglob("*.safetensors"))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        again, done = await run(scheduler, 1, prompt, 5)
        assert again == first
        assert done.cached_tokens >= 64  # the last snapshot boundary at or before 69 tokens
        summary, _ = await check_clean(accountant, pager, executor)
        assert summary["recovered_nodes"] >= 1
        nursery.cancel_scope.cancel()


async def test_recovered_bytes_that_turn_out_corrupt_leave_the_ledger(tiny, tmp_path):
    """The pager charges what it recovered from disk at start; when those entries fail their
    checksum at restore and leave the trie, the ledger's disk figure goes back to 0 (the oracle
    found it stuck: the executor, which charges the tiers after a step, did not know the pager's
    start-up figure, so a tier that emptied was never charged again)."""
    folder = tiny("llama")
    prompt = tuple((3 * i) % 240 + 10 for i in range(40))
    settings = Settings(model=folder, prefill_chunk_tokens=32, kv_cache_dir=str(tmp_path))
    first = await run_to_disk(settings, prompt, 4)
    files = list(tmp_path.rglob("*.safetensors"))
    assert files
    for f in files:  # one flipped byte in the tensor data: the checksum fails at read
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01
        f.write_bytes(bytes(data))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        memory = await ask(accountant.inbox, MemoryQuery)
        assert memory.ledger.cached_kv_bytes.disk > 0  # recovered, and charged at start
        again, done = await run(scheduler, 2, prompt, 4)
        assert again == first and done.cached_tokens == 0  # recomputed, not served corrupt
        summary, memory = await check_clean(accountant, pager, executor)
        assert summary["bytes"]["disk"] == 0 and memory.ledger.cached_kv_bytes.disk == 0
        nursery.cancel_scope.cancel()


async def test_cancelled_requests_unlock_and_keep_what_they_computed(tiny, tmp_path):
    folder = tiny("llama")
    prompt = tuple((7 * i) % 240 + 10 for i in range(150))
    settings = Settings(model=folder, prefill_chunk_tokens=8, kv_cache_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        _, done = await run(scheduler, 1, prompt[:40], 2)
        # A request that matches the cached prefix, then goes away mid-prefill: once its first
        # chunk (of 14) has run, as the request actor does when its client leaves.
        send, recv = trio.open_memory_channel(64)
        await scheduler.inbox.send(Submit(2, prompt, GREEDY, 50, 400, frozenset(), send))
        await wait_until(
            lambda: any(rid == 2 for rid, _, _ in executor.step_log),
            what="request 2's first prefill chunk",
            poll=0,
        )
        recv.close()
        await scheduler.inbox.send(Cancel(2, time.monotonic()))
        await check_clean(accountant, pager, executor)
        assert sum(rid == 2 for rid, _, _ in executor.step_log) < 14  # it was mid-prefill
        _, done = await run(scheduler, 3, prompt, 2)
        assert done.cached_tokens >= 39
        await check_clean(accountant, pager, executor)
        nursery.cancel_scope.cancel()


async def test_integrity_check_through_the_pager_repairs_a_folder_that_disagrees(tiny, tmp_path):
    folder = tiny("llama")
    prompt = tuple((5 * i) % 240 + 10 for i in range(40))
    settings = Settings(
        model=folder, device_cache_bytes=1, host_budget_bytes=1, kv_cache_dir=str(tmp_path)
    )
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        first, _ = await run(scheduler, 1, prompt, 3)
        await ask(executor.inbox, ExecutorQuery)
        files = list(tmp_path.rglob("*.safetensors"))
        assert files  # the tiny budgets sent the prompt's KV to disk
        for f in files:
            f.unlink()  # the folder no longer matches the trie
        (files[0].parent / "feedface-0.safetensors").write_bytes(b"stray")
        summary = await ask(pager.inbox, lambda r: CacheQuery(r, check=True))
        report = summary["integrity"]
        assert not report["clean"] and not report["unrepaired"], report
        assert any("vanished" in p for p in report["problems"])
        assert any("stray" in p for p in report["problems"])
        # The pager is still there, the cache consistent, and requests are answered right.
        again, done = await run(scheduler, 2, prompt, 3)
        assert again == first and done.cached_tokens == 0
        await check_clean(accountant, pager, executor)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("arch", ["llama", "glm4_moe_lite"])
async def test_prompts_after_cached_prefixes_prefill_together_with_solo_tokens(
    tiny, arch, tmp_path
):
    """Requests arriving together, each starting from a cached prefix (a shared system prompt,
    the same prompt again, a prefix longer than another's whole prompt) or none: prefilled in
    one left-padded pass, each with the tokens it gets alone."""
    folder = tiny(arch)
    system = tuple((11 * i + 5) % 240 + 10 for i in range(60))

    def question(first: int, n: int) -> tuple[int, ...]:
        return tuple((first + 7 * i) % 240 + 10 for i in range(n))

    warm = system + question(0, 8)
    wave = [
        warm,  # all but its last token cached: one token to feed
        system + question(1, 5),
        system + question(2, 20),
        warm + question(3, 30),  # after the longest cached prefix
        system[:12] + question(4, 3),  # shorter than the others' cached prefixes
        question(5, 6),  # nothing cached
    ]
    model = load(folder).model
    expected = [[s.token for s in generate(model, p, GREEDY, max_tokens=5)] for p in wave]
    shapes = []

    # min_prefix_tokens=0: the 12-token prefix is restored too (the default, 16, would cut it)
    settings = Settings(model=folder, kv_cache_dir=str(tmp_path), min_prefix_tokens=0)
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings, loader=partial(shape_logging, shapes))
        await run(engine.scheduler, 1, warm, 5)
        shapes.clear()
        calls = [partial(run, engine.scheduler, 10 + i, p, 5) for i, p in enumerate(wave)]
        results = await gather(*calls)
        assert [out for out, _ in results] == expected
        cached = [done.cached_tokens for _, done in results]
        assert cached[0] == len(warm) - 1 and cached[3] >= len(warm), cached
        assert all(c >= len(system) for c in cached[1:3]) and cached[4] >= 12, cached
        # Restored prefixes went through one (B, S) pass, B > 1, S > 1, not one pass each.
        assert any(b > 1 and t > 1 for b, t in shapes), shapes
        await check_clean(engine.accountant, engine.pager, engine.executor)
        nursery.cancel_scope.cancel()


async def test_matches_and_releases_queued_together_keep_their_order(tiny, tmp_path):
    """The pager takes what is queued in one go (one call on the MLX thread for each run of
    matches and releases): each message still acts in the order it was sent. A release between
    two matches of the same request unlocks the first; a CacheQuery in the middle sees exactly
    the messages before it."""
    folder = tiny("llama")
    prompt = tuple((7 * i) % 240 + 10 for i in range(40))
    settings = Settings(model=folder, kv_cache_dir=str(tmp_path), min_prefix_tokens=0)
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        await run(scheduler, 1, prompt, 2)
        await check_clean(accountant, pager, executor)
        send, recv = trio.open_memory_channel(16)
        query_send, query_recv = trio.open_memory_channel(1)
        # No checkpoint between the sends: the pager finds them all queued.
        batch = [
            Match(100, "", prompt, send),
            Release(100),
            Match(101, "", (*prompt, 5, 6), send),
            CacheQuery(query_send),
            Match(100, "", prompt[:20], send),
            Match(102, "", (9, 9, 9, 9), send),  # nothing cached
            Match(103, "other", prompt, send),  # another namespace: nothing cached
        ]
        for msg in batch:
            pager.inbox.send_nowait(msg)
        with trio.fail_after(30):
            answers = [await recv.receive() for _ in range(5)]
            summary = await query_recv.receive()
        assert [a.request_id for a in answers] == [100, 101, 100, 102, 103]
        cached = [a.cached_tokens for a in answers]
        assert cached[0] == len(prompt) - 1 and cached[1] >= len(prompt) - 1, cached
        assert cached[2] == 19 and cached[3] == 0 and cached[4] == 0, cached
        # At the query: 100 released, 101 locked (and nothing after it yet).
        assert summary["locked_requests"] == 1, summary
        for rid in (100, 101):
            pager.inbox.send_nowait(Release(rid))
        await check_clean(accountant, pager, executor)
        nursery.cancel_scope.cancel()


async def test_a_burst_over_a_cached_prefix_is_matched_and_answered_like_alone(tiny, tmp_path):
    """Forty requests submitted at once, each after the same cached system prompt: every one
    restores it and gets the tokens it gets alone, and nothing is left locked or charged."""
    folder = tiny("llama")
    system = tuple((11 * i + 3) % 240 + 10 for i in range(48))
    prompts = [
        system + tuple((5 * i + 17 * k) % 240 + 10 for i in range(4 + k % 5)) for k in range(40)
    ]
    model = load(folder).model
    expected = [[s.token for s in generate(model, p, GREEDY, max_tokens=4)] for p in prompts]
    settings = Settings(model=folder, kv_cache_dir=str(tmp_path), max_running_sequences=64)
    async with trio.open_nursery() as nursery:
        accountant, executor, pager, scheduler = await start(nursery, settings)
        await run(scheduler, 1, (*system, 7), 1)
        results = await gather(
            *[partial(run, scheduler, 10 + k, p, 4) for k, p in enumerate(prompts)]
        )
        assert [out for out, _ in results] == expected
        assert all(done.cached_tokens >= len(system) for _, done in results)
        await check_clean(accountant, pager, executor)
        nursery.cancel_scope.cancel()


async def tokens_of(replies: list) -> list[list[int]]:
    """Each reply channel's tokens, read to its Done (within a minute in all)."""
    outputs = []
    with trio.fail_after(60):
        for recv in replies:
            msgs = [m async for m in recv]
            assert isinstance(msgs[-1], Done), msgs[-1]
            outputs.append([m.token for m in msgs if isinstance(m, Token)])
    return outputs


class HeldPrefill(ShapeLogging):
    """A shape-logging model whose first prefill pass (more than one position) waits for
    `release` on the MLX thread, `held` set meanwhile: a step that runs as long as a test
    needs."""

    def __init__(self, model, shapes: list) -> None:
        super().__init__(model, shapes)
        self.held, self.release = threading.Event(), threading.Event()

    def __call__(self, inputs, cache=None):
        if inputs.shape[1] > 1 and not self.held.is_set():
            self.held.set()
            assert self.release.wait(30), "the test never let the step go"
        return super().__call__(inputs, cache=cache)


async def test_prompts_that_arrive_during_a_step_are_looked_up_during_it(tiny, tmp_path):
    """While one prompt's prefill step runs (held), seven more arrive: the scheduler takes
    them and asks the pager for their prefixes during that step, not after it, so they start
    in the step right after it (with the first prompt's first decode), all seven in one pass.
    Each request gets the tokens it gets alone."""
    folder = tiny("llama")
    prompts = [tuple((5 * i + 17 * k) % 240 + 10 for i in range(20 + k)) for k in range(8)]
    model = load(folder).model
    expected = [[s.token for s in generate(model, p, GREEDY, max_tokens=4)] for p in prompts]
    shapes: list = []
    held: list[HeldPrefill] = []

    def loader(name: str):
        loaded = load(name)
        loaded.model = HeldPrefill(loaded.model, shapes)
        held.append(loaded.model)
        return loaded

    settings = Settings(model=folder, kv_cache_dir=str(tmp_path), warm_up=False)
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings, loader=loader)
        scheduler, gate = engine.scheduler, held[0]
        shapes.clear()
        replies = []
        for k, prompt in enumerate(prompts):
            send, recv = trio.open_memory_channel(64)
            replies.append(recv)
            scheduler.inbox.send_nowait(Submit(100 + k, prompt, GREEDY, 4, 400, frozenset(), send))
            if k == 0:  # the first prompt's prefill is under way (held): the rest arrive now
                await wait_until(gate.held.is_set, what="the first prefill")
        try:
            await wait_until(
                lambda: all(100 + k in scheduler.locks.matching for k in range(1, 8)),
                what="the seven prompts taken (and their lookups asked for) during the step",
            )
        finally:
            gate.release.set()
        assert await tokens_of(replies) == expected
        # The first prompt's prefill, then the next step: its decode and the seven together.
        assert shapes[0] == (1, len(prompts[0])), shapes
        assert shapes[1] == (1, 1) and shapes[2][0] == 7 and shapes[2][1] > 1, shapes
        await check_clean(engine.accountant, engine.pager, engine.executor)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("wait", [0.5, 0.0])
async def test_a_burst_at_an_idle_server_starts_in_one_prefill_step(tiny, tmp_path, wait):
    """One prompt is submitted; while the pager looks it up, seven more arrive. With
    `admission_wait_seconds`, the scheduler waits for all eight lookups before it plans: one
    left-padded pass of 8 prompts, not the first alone and the rest behind it. Off (0), the
    first went alone in 9 runs of 10 here (timing decides, so only its tokens are checked).
    Either way each request gets the tokens it gets alone."""
    folder = tiny("llama")
    prompts = [tuple((5 * i + 17 * k) % 240 + 10 for i in range(20 + k)) for k in range(8)]
    model = load(folder).model
    expected = [[s.token for s in generate(model, p, GREEDY, max_tokens=3)] for p in prompts]
    shapes = []

    settings = Settings(
        model=folder, kv_cache_dir=str(tmp_path), warm_up=False, admission_wait_seconds=wait
    )
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings, loader=partial(shape_logging, shapes))
        scheduler = engine.scheduler
        shapes.clear()
        replies = []
        for k, prompt in enumerate(prompts):
            send, recv = trio.open_memory_channel(64)
            replies.append(recv)
            submit = Submit(100 + k, prompt, GREEDY, 3, 400, frozenset(), send)
            scheduler.inbox.send_nowait(submit)
            if k == 0:  # the first is being looked up: the rest arrive now, all at once
                with trio.fail_after(30):
                    while 100 not in scheduler.locks.matching:
                        await trio.lowlevel.checkpoint()
        assert await tokens_of(replies) == expected
        prefills = [b for b, t in shapes if t > 1]
        if wait:
            assert prefills == [8], shapes
        else:
            assert sum(prefills) == 8, shapes
        await check_clean(engine.accountant, engine.pager, engine.executor)
        nursery.cancel_scope.cancel()
