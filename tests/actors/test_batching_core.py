"""The scheduler core's batched plan: decode together, chunked prefill, ordering, preemption."""

from __future__ import annotations

import attrs

from kvgrove.actors.messages import Failed, ItemResult, Submit, Token
from kvgrove.sampling import SamplingParams
from kvgrove.scheduling.core import SchedulerCore

EOS = 0


def submit(rid: int, n_prompt: int, *, max_tokens: int | None = 4) -> Submit:
    return Submit(
        request_id=rid,
        prompt_tokens=tuple(range(1, n_prompt + 1)),
        params=SamplingParams(temperature=0),
        max_tokens=max_tokens,
        context_tokens=1000,
        stop_ids=frozenset({EOS}),
        reply=None,
    )


def run_step(core, *, token=9, nbytes_per_token=0, error_for=()):
    """Plan one step and answer it as an executor would; returns {rid: (n_tokens, sample)}."""
    items = core.plan_step()
    out = {}
    for item in items:
        seq = core.get(item.request_id)
        tokens = seq.fed + len(item.tokens)
        error = "boom" if item.request_id in error_for else None
        result = ItemResult(
            item.request_id,
            token if item.sample and error is None else None,
            None,
            None,
            0.01,
            tokens * nbytes_per_token,
            error,
        )
        seq = core.on_result(item, result)
        if seq is not None:
            seq.outbox.clear()  # delivered
            if seq.finished:
                core.remove(seq.request_id, cancelled=False)
        out[item.request_id] = (len(item.tokens), item.sample)
    return out


def test_every_decoding_sequence_is_in_each_step_and_prefill_is_chunked():
    core = SchedulerCore(chunk_tokens=8, max_running=4)
    core.admit(submit(1, 3, max_tokens=None))
    core.admit(submit(2, 5, max_tokens=None))
    assert run_step(core) == {1: (3, True), 2: (5, True)}  # both prompts fit one chunk
    core.admit(submit(3, 20, max_tokens=None))
    # A long prompt: one chunk per step (stopping one short of the end), decodes go on.
    assert run_step(core) == {1: (1, True), 2: (1, True), 3: (8, False)}
    assert run_step(core) == {1: (1, True), 2: (1, True), 3: (8, False)}
    assert run_step(core) == {1: (1, True), 2: (1, True), 3: (4, True)}
    assert run_step(core) == {1: (1, True), 2: (1, True), 3: (1, True)}
    assert core.statistics().max_decode_rows == 3


def test_prefill_budget_is_shared_between_new_prompts():
    core = SchedulerCore(chunk_tokens=10, max_running=8)
    for rid in (1, 2, 3):
        core.admit(submit(rid, 6))
    # 6 + 4 tokens: the second stops short (no sampling yet), the third waits.
    assert run_step(core) == {1: (6, True), 2: (4, False)}
    assert run_step(core) == {1: (1, True), 2: (2, True), 3: (6, True)}


def test_max_running_bounds_the_batch():
    core = SchedulerCore(chunk_tokens=64, max_running=2)
    for rid in (1, 2, 3):
        core.admit(submit(rid, 4, max_tokens=2))
    assert set(run_step(core)) == {1, 2}
    assert set(run_step(core)) == {1, 2}  # 1 and 2 finish here (2 tokens each)
    assert run_step(core) == {3: (4, True)}


def test_waiting_requests_prefer_the_longest_cached_prefix():
    core = SchedulerCore(chunk_tokens=64, max_running=1, aging_tokens_per_step=0)
    core.admit(submit(1, 4, max_tokens=1))  # runs; the others wait
    core.admit(submit(2, 50), cached_tokens=0)
    core.admit(submit(3, 50), cached_tokens=40)
    core.admit(submit(4, 50), cached_tokens=10)
    order = []
    while core.statistics().running or core.statistics().waiting:
        for rid in run_step(core):
            if rid not in order:
                order.append(rid)
    assert order == [1, 3, 4, 2]


def test_aging_lets_an_uncached_request_overtake_newer_cached_ones():
    core = SchedulerCore(chunk_tokens=64, max_running=1, aging_tokens_per_step=10)
    core.admit(submit(1, 4, max_tokens=5))
    core.admit(submit(2, 8, max_tokens=1))  # nothing cached, but it arrived first
    for _ in range(3):
        run_step(core)  # 2 waits 3 steps: priority 30
    core.admit(submit(3, 50, max_tokens=1), cached_tokens=25)  # priority 25
    order = []
    while core.statistics().running or core.statistics().waiting:
        order += [rid for rid in run_step(core) if rid not in order]
    assert order.index(2) < order.index(3)
    # Without the wait, the cached one would have won.
    assert core.priority(core.admit(submit(4, 50), cached_tokens=25)) == 25


def test_over_budget_preempts_the_newest_which_resumes_with_its_tokens():
    core = SchedulerCore(chunk_tokens=64, max_running=4, kv_budget_bytes=1000)
    core.admit(submit(1, 10, max_tokens=None))
    core.admit(submit(2, 10, max_tokens=None))
    run_step(core, nbytes_per_token=40)  # 2 x 10 tokens x 40 bytes = 800
    run_step(core, nbytes_per_token=40)  # 880
    run_step(core, nbytes_per_token=40)  # 960
    run_step(core, nbytes_per_token=40)  # 1040: over budget
    seq2 = core.get(2)
    items = core.plan_step()
    assert core.take_preempt() == (2,)
    assert [i.request_id for i in items] == [1]  # 2 does not fit back yet
    assert seq2.fed == 0 and not seq2.has_cache and seq2.generated == 4
    assert core.statistics().preempted == 1
    # Once 1 is gone, 2 re-feeds its prompt and the 4 tokens it generated, then samples.
    core.on_result(items[0], ItemResult(1, 9, None, None, 0.01, 520))
    core.remove(1, cancelled=True)
    (resume,) = core.plan_step()
    assert resume.request_id == 2 and resume.start is None and resume.sample
    assert resume.tokens == (*range(1, 11), 9, 9, 9, 9)
    seq = core.on_result(resume, ItemResult(2, 7, None, None, 0.01, 560))
    assert list(seq.outbox)[-1] == Token(7) and seq.generated == 5


def test_an_item_error_fails_only_that_sequence():
    core = SchedulerCore(chunk_tokens=64, max_running=4)
    core.admit(submit(1, 3, max_tokens=None))
    core.admit(submit(2, 3, max_tokens=None))
    run_step(core)
    items = core.plan_step()
    seq1 = core.on_result(items[0], ItemResult(1, None, None, None, 0.0, 0, "boom"))
    seq2 = core.on_result(items[1], ItemResult(2, 5, None, None, 0.0, 0))
    assert list(seq1.outbox) == [Failed("boom")] and seq1.finished
    assert list(seq2.outbox) == [Token(5)] and not seq2.finished
    # A whole-step failure also ends only the step's sequences.
    core.admit(submit(3, 3))
    core.remove(1, cancelled=False)
    seq2.outbox.clear()
    (item,) = [i for i in core.plan_step() if i.request_id == 2]
    assert [s.request_id for s in core.fail_items((item,), "oom")] == [2]
    assert not core.get(3).finished


def test_a_preempted_sequence_resumes_from_what_the_prefix_cache_kept():
    core = SchedulerCore(chunk_tokens=64, max_running=4, kv_budget_bytes=1000)
    core.admit(submit(1, 10, max_tokens=None))
    core.admit(submit(2, 10, max_tokens=None))
    for _ in range(4):
        run_step(core, nbytes_per_token=40)  # the fourth goes over budget
    items = core.plan_step()
    assert core.take_preempt() == (2,)
    # The executor stored 2's 13 fed tokens (10 prompt + 3 generated) in the prefix cache.
    core.on_preempted(2, 13)
    core.on_result(items[0], ItemResult(1, 9, None, None, 0.01, 520))
    core.remove(1, cancelled=True)
    (resume,) = core.plan_step()
    assert resume.request_id == 2 and resume.start is None and resume.sample
    assert resume.resume_tokens == 13
    assert resume.tokens == (9,)  # only the last sampled token is fed
    seq = core.on_result(resume, ItemResult(2, 7, None, None, 0.01, 560))
    assert seq.fed == 14 and list(seq.outbox)[-1] == Token(7) and seq.generated == 5
    # Later items carry no restore.
    seq.outbox.clear()
    (item,) = core.plan_step()
    assert item.resume_tokens == 0 and item.tokens == (7,)


def _in(namespace: str, rid: int, n_prompt: int) -> Submit:
    return attrs.evolve(submit(rid, n_prompt), namespace=namespace)


def test_a_sequence_waits_for_a_running_prefill_of_its_prefix_in_its_namespace_only():
    core = SchedulerCore(chunk_tokens=16, max_running=8, share_prefills=True)
    core.admit(_in("a", 1, 100))
    core.admit(_in("a", 2, 60))  # shares 60 tokens with 1 (59 usable): waits
    core.admit(_in("b", 3, 100))  # another namespace: never waits on 1
    core.admit(_in("a", 4, 100), cached_tokens=99)  # has it all cached already: no wait
    items = core.plan_step()
    assert sorted(i.request_id for i in items) == [1, 4]  # 3 waits for budget, 2 for 1
    assert core.get(2).waits_for == 1 and core.get(2).wait_until == 59
    assert core.get(3).waits_for is None and core.get(4).waits_for is None
    assert core.statistics().prefill_waits == 1
    seq1 = core.get(1)
    for _ in range(8):  # 1 feeds 16 tokens a step until it has fed 59
        (item,) = [i for i in items if i.request_id == 1]
        core.on_result(item, ItemResult(1, None, None, None, 0.01, 0))
        assert core.take_rematch() == ()
        items = core.plan_step()
        if seq1.fed >= 59:
            break
    assert core.take_rematch() == (2,)
    assert core.get(2).rematching and not core.get(2).runnable
    core.rematched(2, 59)
    seq2 = core.get(2)
    assert seq2.runnable and seq2.fed == seq2.cached_tokens == 59


def test_a_new_cache_is_estimated_by_its_row_in_the_batch_and_the_measured_token_size():
    """A row of a left-padded batch holds as many positions as the longest row: a 10-token
    prompt beside a 600-token sequence is estimated at 768 positions (3 buffer steps), with
    the bytes a token takes as the executor measured them (`token_bytes`), not as a row's
    share of the batch's buffers (here 100 times larger)."""
    for room, started in ((768 * 40, [2]), (768 * 40 - 1, [])):
        core = SchedulerCore(chunk_tokens=1000, max_running=8, kv_budget_bytes=None)
        core.admit(submit(1, 600, max_tokens=None))
        (item,) = core.plan_step()
        core.on_result(item, ItemResult(1, 9, None, None, 0.01, 600 * 4000, token_bytes=40))
        core.kv_budget_bytes = core.live_bytes + room  # beside its 2.4 MB share of the batch
        core.admit(submit(2, 10, max_tokens=None))
        assert [i.request_id for i in core.plan_step() if i.start is not None] == started


def test_caches_started_in_one_step_count_together_against_the_live_budget():
    # A new cache is estimated in whole buffer steps: 256 positions x 40 bytes = 10,240.
    core = SchedulerCore(chunk_tokens=1000, max_running=8, kv_budget_bytes=400 + 15_000)
    core.admit(submit(1, 10, max_tokens=None))
    run_step(core, nbytes_per_token=40)  # 1 holds 400 bytes; 40 bytes a token is now known
    for rid in (2, 3, 4):
        core.admit(submit(rid, 10, max_tokens=None))
    items = core.plan_step()
    started = [i.request_id for i in items if i.start is not None]
    assert started == [2]  # 400 + 10,240 fits; a second 10,240 would not
    assert core.take_preempt() == ()
