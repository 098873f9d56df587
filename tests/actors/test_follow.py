"""Decode follow (`Settings.decode_follow`): a plain decode step is followed by its continuation
without waiting for the scheduler. It changes when work runs, never what comes out: the same
tokens and the same endings (token limit, stop token, cancel) as with it off, while rows join,
finish, park and get cancelled; everything is freed and the books return to baseline."""

from __future__ import annotations

import attrs
import pytest
import trio

from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import Cancel, Done, Failed, MemoryQuery, Submit, Token
from kvgrove.config import Settings
from kvgrove.grammar import regex_grammar
from kvgrove.sampling import SamplingParams
from waiting import wait_until

DEADLINE = 60
GREEDY = SamplingParams(temperature=0)
SEEDED = SamplingParams(temperature=0.9, top_k=20, seed=7)
DIGITS = SamplingParams(temperature=0, grammar=regex_grammar(r"[0-9]{3,30}"))


def prompt(i: int, n: int = 12) -> tuple[int, ...]:
    return tuple((13 * i + 5 * j) % 250 + 5 for j in range(n))


async def generate(
    scheduler, rid, tokens, max_tokens, params, stop_ids, cancel_after, gate, started=None
):
    """(tokens, how it ended); a reader held back by `gate` parks its sequence meanwhile;
    `started` is set at its first token."""
    send, recv = trio.open_memory_channel(256 if gate is None else 1)
    submit = Submit(rid, tokens, params, max_tokens, 400, frozenset(stop_ids), send)
    await scheduler.inbox.send(submit)
    if gate is not None:
        await gate.wait()
    out: list[int] = []
    async for msg in recv:
        match msg:
            case Token(token=token):
                out.append(token)
                if started is not None:
                    started.set()
                if len(out) == cancel_after:
                    await scheduler.inbox.send(Cancel(rid, trio.current_time()))
                    return out, "cancelled"
            case Done(reason=reason, generated_tokens=n):
                assert n == len(out)
                return out, reason
            case Failed(message=message):
                return out, message
    return out, "closed"


async def run(settings, requests):
    """Every request at once (a second wave joins the running batch); returns what each got,
    the scheduler's follow count, and whether everything was freed."""
    results = {}
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings)
        with trio.fail_after(DEADLINE):
            first_done = trio.Event()
            async with trio.open_nursery() as clients:
                for wave in (0, 1):
                    for rid, w, tokens, n, params, stops, cancel in requests:
                        if w != wave:
                            continue

                        async def one(rid=rid, a=(tokens, n, params, stops, cancel)):
                            gate = first_done if rid == 9 else None
                            results[rid] = await generate(engine.scheduler, rid, *a, gate=gate)
                            if rid == 1:
                                first_done.set()

                        clients.start_soon(one)
                    await trio.sleep(0)  # let the first wave in before the second
                    if wave == 0:  # the second wave arrives while the first decodes
                        await wait_until(
                            lambda: engine.scheduler.statistics().max_decode_rows,
                            what="the first wave decoding",
                            seconds=DEADLINE,
                            poll=0.001,
                        )

            async def released():  # the executor charges the released caches off after its step
                send, recv = trio.open_memory_channel(1)
                await engine.accountant.inbox.send(MemoryQuery(send))
                memory = await recv.receive()
                idle = not engine.executor.statistics().live_sequences
                return idle and not memory.ledger.live_cache_bytes

            await wait_until(released, what="the live caches charged off", seconds=DEADLINE)
        assert engine.accountant.statistics().ledger.consistent
        stats = engine.scheduler.statistics()
        assert stats.running == stats.waiting == 0
        follows = engine.scheduler.in_flight.follows
        queued = engine.executor.statistics().queued_steps
        nursery.cancel_scope.cancel()
    return results, (follows, queued)


def workload(stop_token: int | None):
    """(request id, wave, prompt, max tokens, params, stop ids, cancel after)."""
    stops = () if stop_token is None else (stop_token,)
    return [
        (1, 0, prompt(1), 24, GREEDY, (), None),
        (2, 0, prompt(2, 30), 5, GREEDY, (), None),  # reaches its token limit early
        (3, 0, prompt(3), 18, SEEDED, (), None),
        (4, 0, prompt(4), 40, GREEDY, stops, None),  # ends at a stop token
        (5, 1, prompt(5, 20), 16, GREEDY, (), None),  # joins the running batch
        (6, 1, prompt(6), 30, GREEDY, (), 4),  # cancelled mid-decode
        (7, 1, prompt(7), 1, GREEDY, (), None),  # one token only
        (8, 1, prompt(8), 20, DIGITS, (), None),  # a constrained row in the batch
        (9, 0, prompt(9), 14, GREEDY, (), None),  # read only once 1 is done: it parks
    ]


@pytest.mark.parametrize("prefix_cache", [False, True])
async def test_follow_changes_no_token_and_no_ending(tiny, prefix_cache):
    base = Settings(model=tiny("llama"), disk_budget_bytes=0, prefix_cache=prefix_cache)
    # Request 4's 6th token, from a run without a stop token, becomes its stop token.
    plain, _ = await run(attrs.evolve(base, decode_follow=False), workload(None))
    stop_token = plain[4][0][5]
    off, off_follows = await run(attrs.evolve(base, decode_follow=False), workload(stop_token))
    on, on_follows = await run(attrs.evolve(base, decode_follow=True), workload(stop_token))
    handed, handed_follows = await run(
        attrs.evolve(base, decode_follow=True, queued_continuations=False), workload(stop_token)
    )
    assert handed == on and handed_follows[0] > 0 and handed_follows[1] == 0
    assert off_follows == (0, 0)
    # The executor did decode without waiting for the scheduler, and queued continuations on
    # the MLX thread behind the step before them (a followed step's first one, at least).
    assert on_follows[0] > 0 and on_follows[1] > 0
    assert on == off
    for rid, _, _, n, _, _, cancel in workload(stop_token):
        tokens, ending = on[rid]
        if cancel is not None:
            assert (len(tokens), ending) == (cancel, "cancelled")
        elif rid == 4:
            assert ending == "stop" and tokens == plain[4][0][: plain[4][0].index(stop_token)]
        else:
            assert (len(tokens), ending) == (n, "length"), rid


def staggered(stop_token: int | None):
    """(request id, prompt, max tokens, params, stop ids, cancel after), each arriving alone
    once the one before it decodes: it prefills on its own, then joins the followed batch."""
    stops = () if stop_token is None else (stop_token,)
    return [
        (1, prompt(1), 40, GREEDY, (), None),
        (2, prompt(2, 20), 40, GREEDY, stops, None),  # ends at a stop token
        (3, prompt(3), 30, GREEDY, (), 5),  # cancelled mid-follow
        (4, prompt(4, 16), 12, GREEDY, (), None),  # reaches its token limit
        (5, prompt(5), 20, SEEDED, (), None),
        (6, prompt(6, 9), 16, GREEDY, (), None),
    ]


async def run_staggered(settings, requests):
    """What each request got, the scheduler's follow count and the executor's statistics."""
    results = {}
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings)
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as clients:
                for rid, tokens, n, params, stops, cancel in requests:
                    started = trio.Event()

                    async def one(rid=rid, a=(tokens, n, params, stops, cancel), e=started):
                        results[rid] = await generate(engine.scheduler, rid, *a, None, e)
                        e.set()

                    clients.start_soon(one)
                    await started.wait()
        await wait_until(
            lambda: not engine.executor.statistics().live_sequences,
            what="every sequence released",
            seconds=DEADLINE,
        )
        follows = engine.scheduler.in_flight.follows
        stats = engine.executor.statistics()
        nursery.cancel_scope.cancel()
    return results, follows, stats


@pytest.mark.parametrize("follow", [True, False])
async def test_followed_decode_runs_ahead_and_joins_undo_nothing(tiny, follow):
    """With the overlap on, every continuation decodes from the forward its predecessor
    launched ahead, and only a row that ends (stop token, cancel, token limit) costs a
    row-step computed ahead and not taken: one each at most. Rows joining the followed batch
    undo nothing (the step before a join is not continued, so nothing ran ahead of it), and the
    tokens and endings are those of a run with the overlap off. With follow off, the plans the
    scheduler expects to decode the same rows next run ahead alike."""
    base = Settings(
        model=tiny("llama"), disk_budget_bytes=0, prefix_cache=False, decode_follow=follow
    )
    plain, _, _ = await run_staggered(attrs.evolve(base, decode_overlap="off"), staggered(None))
    stop_token = plain[2][0][5]
    requests = staggered(stop_token)
    off, _, off_stats = await run_staggered(attrs.evolve(base, decode_overlap="off"), requests)
    on, follows, stats = await run_staggered(attrs.evolve(base, decode_overlap="on"), requests)
    assert on == off
    assert on[2] == (plain[2][0][: plain[2][0].index(stop_token)], "stop")
    assert on[3] == (plain[3][0][:5], "cancelled")
    assert off_stats.overlapped_steps == off_stats.wasted_row_steps == 0
    assert (follows > 0) == follow
    assert stats.overlapped_steps >= follows  # each continuation used the step run ahead
    assert stats.overlapped_steps > 0
    assert stats.wasted_row_steps <= len(requests)


async def test_a_lone_row_reaching_its_limit_leaves_nothing_run_ahead(tiny):
    """The scheduler foresees a token limit: the continuation that samples a lone row's last
    token does not run ahead (a whole forward for nothing), every one before it does."""
    base = Settings(model=tiny("llama"), disk_budget_bytes=0, prefix_cache=False)
    request = [(1, prompt(1), 30, GREEDY, (), None)]
    off, _, _ = await run_staggered(attrs.evolve(base, decode_overlap="off"), request)
    on, follows, stats = await run_staggered(attrs.evolve(base, decode_overlap="on"), request)
    assert on == off and on[1][1] == "length"
    assert follows > 0 and stats.overlapped_steps >= follows
    assert stats.wasted_row_steps == 0
