"""The step-plan codec: any step round-trips through words and frames, and damage is caught."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgrove.actors.messages import Start, Step, StepItem
from kvgrove.distributed.codec import (
    HEADER_WORDS,
    STEP,
    STOP,
    PlanError,
    decode_step,
    encode_step,
    frame,
    rest_words,
    unframe,
)
from kvgrove.sampling import MAX_TOP_LOGPROBS, SamplingParams

token_ids = st.integers(0, 2**31 - 1)
request_ids = st.integers(-(2**63), 2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)

params = st.builds(
    SamplingParams,
    temperature=st.floats(0, 1e6),
    top_k=st.integers(-(2**40), 2**40),
    top_p=st.floats(0, 1),
    min_p=st.floats(0, 1),
    repeat_last_n=st.integers(-1, 2**40),
    repeat_penalty=st.floats(1e-30, 1e6),
    presence_penalty=finite,
    frequency_penalty=finite,
    seed=st.integers(-(2**63), 2**63 - 1),
    logprobs=st.booleans(),
    top_logprobs=st.integers(0, MAX_TOP_LOGPROBS),
    grammar=st.none() | st.text(max_size=30),
)
starts = st.builds(
    Start,
    params=params,
    prompt_tokens=st.lists(token_ids, max_size=40).map(tuple),
    context_tokens=st.integers(0, 2**40),
    namespace=st.text(max_size=12),
    cached_tokens=st.integers(0, 2**40),
)
items = st.builds(
    StepItem,
    request_id=request_ids,
    tokens=st.lists(token_ids, max_size=40).map(tuple),
    sample=st.booleans(),
    start=st.none() | starts,
    resume_tokens=st.integers(0, 2**40),
)
steps = st.builds(
    Step,
    items=st.lists(items, max_size=6).map(tuple),
    release=st.lists(request_ids, max_size=5).map(tuple),
    reply=st.none(),
    preempt=st.lists(request_ids, max_size=5).map(tuple),
    ahead=st.booleans(),
)


@settings(max_examples=100, deadline=None)
@given(steps, st.integers(HEADER_WORDS + 1, 300))
def test_any_step_round_trips_through_frames(step, frame_words):
    words = frame(STEP, encode_step(step), frame_words)
    assert len(words) % frame_words == 0
    first = words[:frame_words]
    assert len(words) == frame_words + rest_words(first)
    kind, payload = unframe(words)
    assert kind == STEP
    assert decode_step(payload) == step


def test_the_reply_channel_stays_on_rank_0():
    step = Step(items=(), release=(3,), reply=object())
    assert decode_step(encode_step(step)) == Step(items=(), release=(3,), reply=None)


def test_an_empty_stop_message_fits_one_frame():
    words = frame(STOP, np.zeros(0, np.int32), 16)
    assert len(words) == 16 and rest_words(words) == 0
    assert unframe(words)[0] == STOP


def test_a_big_prompt_spans_several_frames():
    start = Start(SamplingParams(temperature=0), tuple(range(10_000)), 20_000)
    step = Step(items=(StepItem(1, tuple(range(2048)), True, start),), release=(), reply=None)
    words = frame(STEP, encode_step(step), 4096)
    assert rest_words(words[:4096]) == len(words) - 4096 > 4096
    assert decode_step(unframe(words)[1]) == step


@settings(max_examples=100, deadline=None)
@given(steps, st.data())
def test_a_flipped_word_is_caught(step, data):
    words = frame(STEP, encode_step(step), 64)
    end = HEADER_WORDS + int(words[2])
    at = data.draw(st.integers(0, end - 1))
    damaged = words.copy()
    damaged[at] ^= data.draw(st.integers(1, 2**31 - 1))
    with pytest.raises(PlanError):
        unframe(damaged)


def test_truncated_and_padded_payloads_are_refused():
    words = encode_step(Step(items=(StepItem(1, (5, 6), True),), release=(), reply=None))
    with pytest.raises(PlanError, match="truncated"):
        decode_step(words[:-1])
    with pytest.raises(PlanError, match="left over"):
        decode_step(np.concatenate([words, np.zeros(1, np.int32)]))
    with pytest.raises(PlanError, match="magic"):
        unframe(np.zeros(8, np.int32))


def test_token_ids_out_of_range_are_refused_when_encoding():
    with pytest.raises(ValueError, match="token ids"):
        encode_step(Step(items=(StepItem(1, (2**31,), True),), release=(), reply=None))


def test_every_field_of_a_step_travels():
    """A field added to the step's classes that the codec does not write would reach rank 0's
    runner but not the others' (their samplers would draw differently): name them all."""
    import attrs

    from kvgrove.distributed.codec import _PARAM_INTS
    from kvgrove.sampling import FLOAT_FIELDS

    written = {*_PARAM_INTS, *FLOAT_FIELDS, "logprobs", "grammar"}
    assert {f.name for f in attrs.fields(SamplingParams)} == written
    assert {f.name for f in attrs.fields(Start)} == {
        "params",
        "prompt_tokens",
        "context_tokens",
        "namespace",
        "cached_tokens",
    }
    assert {f.name for f in attrs.fields(StepItem)} == {
        "request_id",
        "tokens",
        "sample",
        "start",
        "resume_tokens",
    }
    # `follow` stays on rank 0: its executor runs the continuation as a step of its own, which
    # it broadcasts like any other. `ahead` travels: every rank runs the same decode ahead.
    fields = {"items", "release", "reply", "preempt", "follow", "ahead"}
    assert {f.name for f in attrs.fields(Step)} == fields
