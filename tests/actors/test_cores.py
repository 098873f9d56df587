"""The sync cores: scheduler planning, stop strings, the byte ledger, settings."""

from __future__ import annotations

import argparse

import pytest

from kvgrove.actors.messages import Done, ItemResult, Submit, Token
from kvgrove.config import Settings, add_serve_arguments, settings_from_args
from kvgrove.sampling import SamplingParams
from kvgrove.scheduling.core import SchedulerCore
from kvgrove.tokenize.stops import StopMatcher

EOS = 0


def submit(rid: int, n_prompt: int, *, max_tokens: int | None = 4, context: int = 100) -> Submit:
    return Submit(
        request_id=rid,
        prompt_tokens=tuple(range(1, n_prompt + 1)),
        params=SamplingParams(temperature=0),
        max_tokens=max_tokens,
        context_tokens=context,
        stop_ids=frozenset({EOS}),
        reply=None,
    )


def result(item, token=None) -> ItemResult:
    return ItemResult(item.request_id, token, None, None, 0.01, 1000)


def test_long_prompt_is_prefilled_in_chunks_then_sampled():
    core = SchedulerCore(chunk_tokens=4, max_running=2)
    core.admit(submit(1, 10))
    sizes = []
    while True:
        (item,) = core.plan_step()
        sizes.append((len(item.tokens), item.sample, item.start is not None))
        seq = core.on_result(item, result(item, 7 if item.sample else None))
        if item.sample:
            break
    assert sizes == [(4, False, True), (4, False, False), (2, True, False)]
    assert list(seq.outbox) == [Token(7)]
    assert seq.fed == 10


def test_stop_token_ends_without_emitting_it():
    core = SchedulerCore(chunk_tokens=8, max_running=1)
    core.admit(submit(1, 3))
    (item,) = core.plan_step()
    seq = core.on_result(item, result(item, EOS))
    (done,) = seq.outbox
    assert isinstance(done, Done) and done.reason == "stop" and done.generated_tokens == 0


def test_max_tokens_and_context_limit_end_with_length():
    core = SchedulerCore(chunk_tokens=8, max_running=2)
    core.admit(submit(1, 3, max_tokens=2))
    core.admit(submit(2, 3, max_tokens=None, context=5))
    delivered: dict[int, list] = {1: [], 2: []}
    while items := core.plan_step():
        for item in items:
            seq = core.on_result(item, result(item, 9))
            delivered[item.request_id] += seq.outbox
            seq.outbox.clear()
    for rid in (1, 2):
        msgs = delivered[rid]
        assert msgs[:2] == [Token(9), Token(9)]
        assert isinstance(msgs[2], Done) and msgs[2].reason == "length"
        assert len(msgs) == 3


def test_parked_sequence_is_not_planned_and_others_go_on():
    core = SchedulerCore(chunk_tokens=8, max_running=2)
    core.admit(submit(1, 2, max_tokens=None))
    core.admit(submit(2, 2, max_tokens=None))
    for item in core.plan_step():
        core.on_result(item, result(item, 9))
    core.get(2).outbox.clear()  # delivered; seq 1 still holds its token: parked
    assert core.get(1).parked
    for _ in range(2):
        (item,) = core.plan_step()
        assert item.request_id == 2
        core.on_result(item, result(item, 9)).outbox.clear()
    assert core.statistics().parked == 1


def test_a_stalled_sequence_gives_its_slot_back_and_resumes_once_drained():
    core = SchedulerCore(chunk_tokens=8, max_running=1)
    core.admit(submit(1, 2, max_tokens=None))
    core.admit(submit(2, 2, max_tokens=None))
    (item,) = core.plan_step()
    core.on_result(item, result(item, 9))
    one = core.get(1)
    core.note_delivery(one, progressed=False, blocked=True, now=100.0)
    assert core.park_stalled(100.5, stall_seconds=1.0) == []  # not yet
    # A reader that takes something makes progress: its stall starts over.
    core.note_delivery(one, progressed=True, blocked=True, now=100.9)
    assert core.park_stalled(101.5, stall_seconds=1.0) == []
    assert core.park_stalled(102.0, stall_seconds=1.0) == [one]
    assert core.take_preempt() == (1,) and not one.has_cache and one.fed == 0
    stats = core.statistics()
    assert stats.running == 1 and stats.stall_parked == 1 and stats.stall_parks == 1
    (item,) = core.plan_step()  # the waiting one runs in the freed slot
    assert item.request_id == 2
    core.remove(2, cancelled=True)
    assert core.plan_step() == ()  # still stalled: not re-admitted
    one.outbox.clear()  # its client drained
    core.note_delivery(one, progressed=True, blocked=False, now=103.0)
    core.fill()
    (item,) = core.plan_step()  # resumes by re-feeding prompt + generated token
    assert item.request_id == 1 and item.tokens == (1, 2, 9) and item.start is None
    assert core.statistics().stall_parked == 0
    assert core.over_stall_limit(1e9, 10.0) == []


def test_a_stalled_sequence_resumes_from_what_the_prefix_cache_kept():
    """A parked stalled reader resumes from its stored KV (like any preempted sequence), not
    by recomputing from token 0: on_preempted finds it while it waits out of the batch."""
    core = SchedulerCore(chunk_tokens=8, max_running=1)
    core.admit(submit(1, 2, max_tokens=None))
    (item,) = core.plan_step()
    core.on_result(item, result(item, 9))
    one = core.get(1)
    core.note_delivery(one, progressed=False, blocked=True, now=100.0)
    assert core.park_stalled(102.0, stall_seconds=1.0) == [one]
    assert core.take_preempt() == (1,)
    core.on_preempted(1, 2)  # the executor stored the prompt's two tokens
    one.outbox.clear()
    core.note_delivery(one, progressed=True, blocked=False, now=103.0)
    core.fill()
    (item,) = core.plan_step()
    assert item.request_id == 1 and item.resume_tokens == 2 and item.tokens == (9,)


def test_cancel_releases_started_sequences_and_admits_waiting():
    core = SchedulerCore(chunk_tokens=8, max_running=1)
    core.admit(submit(1, 2))
    core.admit(submit(2, 2))
    assert [item.request_id for item in core.plan_step()] == [1]
    core.remove(1, cancelled=True)
    assert core.take_release() == (1,)
    assert [item.request_id for item in core.plan_step()] == [2]
    core.remove(2, cancelled=True)
    assert core.take_release() == (2,)
    assert core.statistics().cancelled == 2 and core.idle


def test_max_tokens_zero_is_done_at_once():
    core = SchedulerCore(chunk_tokens=8, max_running=1)
    seq = core.admit(submit(1, 2, max_tokens=0))
    assert seq.finished and seq.outbox[0].reason == "length"
    assert core.plan_step() == ()


@pytest.mark.parametrize(
    "pieces, stops, expected",
    [
        (["Hello", " wor", "ld"], ["world"], ("Hello ", True)),
        (["ab", "c", "de"], ["cd"], ("ab", True)),
        (["a", "b"], ["bc"], ("ab", False)),  # a held prefix is released at the end
        (["x<", "|e", "nd|>y"], ["<|end|>"], ("x", True)),
        (["plain text"], [], ("plain text", False)),
    ],
)
def test_stop_strings_never_emit_the_stop_even_split_across_tokens(pieces, stops, expected):
    matcher = StopMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = matcher.feed(p)
        out += text
        if hit:
            break
    out += matcher.flush()
    assert (out, hit) == expected


def test_settings_from_flags_over_env(monkeypatch):
    monkeypatch.setenv("KVGROVE_PORT", "9999")
    monkeypatch.setenv("KVGROVE_PREFILL_CHUNK_TOKENS", "128")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    settings = settings_from_args(parser.parse_args(["--port", "1234", "--model", "smollm2"]))
    assert settings.port == 1234 and settings.prefill_chunk_tokens == 128
    assert settings.model == "smollm2" and settings.host == "127.0.0.1"
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        Settings(prefill_chunk_tokens=0)
