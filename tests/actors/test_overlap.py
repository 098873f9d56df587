"""The decode overlap (`decode_overlap="on"`): the executor launches the batch's next decode from
the still-lazy tokens before they go up. It changes when work runs, never what comes out: the
same tokens as with it off, for greedy, seeded and grammar-constrained rows, while rows join,
finish, get cancelled and are preempted; the books return to baseline."""

from __future__ import annotations

import collections

import attrs
import pytest
import trio

from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import Cancel, Done, Failed, MemoryQuery, Submit, Token
from kvgrove.config import Settings
from kvgrove.grammar import regex_grammar
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model
from waiting import wait_until

DEADLINE = 60
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


def prompt(i: int, n: int = 12) -> tuple[int, ...]:
    return tuple((11 * i + 7 * j) % 250 + 5 for j in range(n))


async def request(scheduler, rid, tokens, max_tokens, params, *, cancel_after, started, gate):
    # A reader held back by `gate` (a channel of one token) parks its sequence meanwhile.
    send, recv = trio.open_memory_channel(256 if gate is None else 1)
    await scheduler.inbox.send(Submit(rid, tokens, params, max_tokens, 400, frozenset(), send))
    out = []
    if gate is not None:
        started.set()
        await gate.wait()
    async for msg in recv:
        if isinstance(msg, Token):
            out.append(msg.token)
            started.set()
            if cancel_after is not None and len(out) == cancel_after:
                await scheduler.inbox.send(Cancel(rid, trio.current_time()))
                return out
        elif isinstance(msg, Failed):
            started.set()
            return [msg]
        elif isinstance(msg, Done):
            started.set()
            return out
    return out


def workload(preempting: bool = False, stateless: bool = False):
    """(delay in waves, request id, prompt, max tokens, params, cancel after). `stateless`:
    no row needs the host between its tokens (no grammar, no penalty), so the batch's sampling
    runs ahead in the forward's graph, seeded draws included."""
    if preempting:  # as test_batching_actors' pressure test: the caches outgrow the budget
        return [(0, i, prompt(i, 200), 80, GREEDY, None) for i in range(1, 5)]
    seeded = SamplingParams(temperature=0.9, top_k=20, seed=7)
    digits = SamplingParams(temperature=0, grammar=regex_grammar(r"[0-9]{3,30}"))
    if stateless:
        digits = SamplingParams(temperature=1.2, top_p=0.8, seed=3, logprobs=True, top_logprobs=2)
    return [
        (0, 1, prompt(1), 24, GREEDY, None),
        (0, 2, prompt(2, 30), 5, GREEDY, None),  # finishes early: a row leaves
        (0, 3, prompt(3), 18, seeded, None),
        (1, 4, prompt(4, 20), 16, GREEDY, None),  # joins a running batch
        (1, 5, prompt(5), 20, digits, None),  # a constrained row in the batch
        (1, 6, prompt(6), 30, GREEDY, 4),  # cancelled mid-decode
        (2, 7, prompt(1), 12, seeded, None),  # the same prompt as 1: its prefix is cached
        (0, 8, prompt(8), 14, GREEDY, None),  # read only once 1 is done: it parks
    ]


async def run_workload(settings, kv_budget_bytes=None, stateless=False):
    results = {}
    done = collections.defaultdict(trio.Event)
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings, kv_budget_bytes=kv_budget_bytes)
        accountant, executor, scheduler = engine.accountant, engine.executor, engine.scheduler
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as clients:
                for wave in range(3):
                    started = []
                    plan = workload(bool(kv_budget_bytes), stateless)
                    for delay, rid, tokens, n, params, cancel in plan:
                        if delay != wave:
                            continue
                        started.append(trio.Event())

                        async def one(
                            rid=rid, tokens=tokens, n=n, p=params, c=cancel, e=started[-1]
                        ):
                            gate = done[1] if rid == 8 and kv_budget_bytes is None else None
                            results[rid] = await request(
                                scheduler, rid, tokens, n, p, cancel_after=c, started=e, gate=gate
                            )
                            done[rid].set()

                        clients.start_soon(one)
                    # The next wave arrives once this one is decoding.
                    for event in started:
                        await event.wait()

        async def released():  # the executor charges the released caches off after its step
            send, recv = trio.open_memory_channel(1)
            await accountant.inbox.send(MemoryQuery(send))
            memory = await recv.receive()
            idle = not executor.statistics().live_sequences and not memory.ledger.live_cache_bytes
            return memory if idle else None

        memory = await wait_until(released, what="the live caches charged off", seconds=DEADLINE)
        assert accountant.statistics().ledger.consistent
        stats = executor.statistics()
        preempted = scheduler.statistics().preempted
        nursery.cancel_scope.cancel()
    return results, memory, stats, preempted


# None: no pressure. 300 KB: room for two of the four 200-token sequences (tiny llama's cache
# grows in 256-token buffers of 128 KB): when their decode crosses 256 tokens the buffers
# double and the newest is preempted. Without the prefix cache it recomputes its history; with
# it, it resumes from what the cache kept. (Preemption must come from that growth: admission
# alone is no test of it, as the scheduler admits only what its learned bytes per token fit.)
@pytest.mark.parametrize(
    ("kv_budget_bytes", "prefix_cache", "stateless"),
    [(None, True, False), (None, True, True), (300_000, False, False), (300_000, True, False)],
)
async def test_the_overlap_changes_no_token(llama, kv_budget_bytes, prefix_cache, stateless):
    base = Settings(model=llama, disk_budget_bytes=0, prefix_cache=prefix_cache)
    off, _, off_stats, off_preempted = await run_workload(
        attrs.evolve(base, decode_overlap="off"), kv_budget_bytes, stateless
    )
    on, memory, stats, preempted = await run_workload(
        attrs.evolve(base, decode_overlap="on"), kv_budget_bytes, stateless
    )
    assert off_stats.overlapped_steps == 0
    # Every batch of the preempting and stateless workloads samples statelessly: the sampling
    # ran ahead in the forward's graph (seeded rows too, their draws given back when a plan
    # did not take them); the mixed one's too while its grammar row was not in the batch.
    # (tests/models/test_runner_ahead.py takes the give-back paths for certain.)
    assert stats.fused_steps > 0
    assert (off_preempted > 0) == (preempted > 0) == (kv_budget_bytes is not None)
    assert stats.overlapped_steps > 0  # it did run ahead
    # Rows that end may leave a step computed ahead behind, or none: the scheduler runs ahead
    # only of plans it expects some of the rows to decode after.
    assert on.keys() == off.keys()
    for rid in on:
        assert on[rid] == off[rid], rid
        assert on[rid] and all(isinstance(t, int) for t in on[rid]), on[rid]
    assert memory.ledger.live_cache_bytes == 0
    assert stats.live_sequences == 0
