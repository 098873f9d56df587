"""The sampler over random logits: filters, penalties, seeds, distribution, logprobs."""

from __future__ import annotations

import itertools
import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgrove.sampling import (
    SampleResult,
    SamplingParams,
    SequenceSampler,
    apply_penalties,
    build_sample,
    sample_batch,
    sample_one,
)

# Four tokens with probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS4 = np.log(PROBS).astype(np.float32)


def sampler(prompt=(), context_limit=None, **params) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**params), list(prompt), context_limit=context_limit)


def draws(logits_row: np.ndarray, n: int, **params) -> np.ndarray:
    """n tokens from one distribution: a batch of n samplers seeded 0..n-1."""
    samplers = [sampler(seed=i, **params) for i in range(n)]
    logits = mx.array(np.tile(logits_row, (n, 1)))
    return np.array(sample_batch(logits, samplers).tokens)


def random_logits(rng: np.random.Generator, batch: int, vocab: int) -> np.ndarray:
    return (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# --- parameters -----------------------------------------------------------------------------


def test_defaults_are_ollamas():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.9, 0.0)
    assert (p.repeat_last_n, p.repeat_penalty, p.presence_penalty, p.frequency_penalty) == (
        64,
        1.0,
        0.0,
        0.0,
    )
    assert (p.seed, p.logprobs, p.top_logprobs) == (-1, False, 0)
    assert not p.greedy
    assert not p.penalizes


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("top_p", 1.5, "top_p must be in [0, 1], got 1.5"),
        ("top_p", -0.1, "top_p must be in [0, 1]"),
        ("min_p", 2.0, "min_p must be in [0, 1]"),
        ("temperature", -0.5, "temperature must be >= 0"),
        ("temperature", float("nan"), "temperature must be a finite number"),
        ("repeat_last_n", -2, "repeat_last_n must be >= -1"),
        ("repeat_penalty", 0.0, "repeat_penalty must be > 0"),
        ("presence_penalty", float("inf"), "presence_penalty must be a finite number"),
        ("frequency_penalty", "1", "frequency_penalty must be a finite number"),
        ("top_logprobs", 21, "top_logprobs must be in [0, 20], got 21"),
        ("top_logprobs", -1, "top_logprobs must be in [0, 20]"),
        ("top_k", 4.5, "top_k must be an integer"),
        ("top_k", True, "top_k must be an integer"),
        ("seed", "x", "seed must be an integer"),
        ("logprobs", 1, "logprobs must be a boolean"),
    ],
)
def test_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**{field: value})


def test_edge_values_are_valid():
    p = SamplingParams(
        temperature=0, top_k=-1, top_p=1.0, min_p=1.0, repeat_last_n=-1, top_logprobs=20
    )
    assert p.greedy
    assert SamplingParams(top_k=1).greedy
    assert SamplingParams(repeat_penalty=1.1).penalizes
    assert not SamplingParams(repeat_penalty=1.1, repeat_last_n=0).penalizes


def test_random_seed_is_drawn_and_explicit_seed_kept():
    assert sampler(seed=1234).seed == 1234
    seeds = {sampler(seed=-1).seed for _ in range(4)}
    assert len(seeds) == 4
    assert all(s >= 0 for s in seeds)


# --- greedy and filters ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 5),
    vocab=st.integers(2, 300),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_greedy_is_argmax(batch, vocab, data_seed):
    logits = random_logits(np.random.default_rng(data_seed), batch, vocab)
    result = sample_batch(mx.array(logits), [sampler(temperature=0) for _ in range(batch)])
    assert result.tokens == logits.argmax(axis=-1).tolist()
    assert result.logprobs == [None] * batch
    assert result.top_logprobs == [None] * batch


@settings(max_examples=25, deadline=None)
@given(vocab=st.integers(2, 300), data_seed=st.integers(0, 2**32 - 1))
def test_top_k_one_is_greedy(vocab, data_seed):
    logits = random_logits(np.random.default_rng(data_seed), 4, vocab)
    samplers = [sampler(top_k=1, temperature=1.5, top_p=1.0, seed=i) for i in range(4)]
    assert sample_batch(mx.array(logits), samplers).tokens == logits.argmax(axis=-1).tolist()


def test_temperature_zero_applies_penalties_before_argmax():
    logits = np.array([[3.0, 2.5, 1.0, -1.0]], dtype=np.float32)
    plain = sampler([0, 0], temperature=0)
    penalized = sampler([0, 0], temperature=0, repeat_penalty=2.0)  # 3.0 -> 1.5 < 2.5
    assert sample_one(mx.array(logits), plain).token == 0
    assert sample_one(mx.array(logits), penalized).token == 1
    frequent = sampler([0, 0, 1], temperature=0, frequency_penalty=1.0)  # 1.0, 1.5, 1.0, -1.0
    assert sample_one(mx.array(logits), frequent).token == 1
    present = sampler([0, 1], temperature=0, presence_penalty=2.5)  # 0.5, 0.0, 1.0, -1.0
    assert sample_one(mx.array(logits), present).token == 2


@pytest.mark.parametrize("top_k", [0, 3, 40])
def test_tiny_top_p_keeps_only_the_top_token(top_k):
    logits = random_logits(np.random.default_rng(5), 1, 50)[0]
    tokens = draws(logits, 200, temperature=2.0, top_k=top_k, top_p=1e-6)
    assert set(tokens.tolist()) == {int(logits.argmax())}


@pytest.mark.parametrize("top_k", [0, 4, 40])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_k):
    # Mass before each token: 0, 0.5, 0.8, 0.95. p = 0.75 keeps tokens 0 and 1 only.
    tokens = draws(LOGITS4, 2000, temperature=1.0, top_k=top_k, top_p=0.75)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).mean() - 0.5 / 0.8) < 0.04
    # Just below and just above the mass before token 2 (0.8).
    assert set(draws(LOGITS4, 2000, temperature=1.0, top_k=top_k, top_p=0.79).tolist()) == {0, 1}
    assert set(draws(LOGITS4, 2000, temperature=1.0, top_k=top_k, top_p=0.81).tolist()) == {
        0,
        1,
        2,
    }


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (0, 0.999), (4, 1.0)])
def test_min_p_is_relative_to_the_top_probability(top_k, top_p):
    # Threshold 0.2 * 0.5 = 0.1: tokens 0, 1, 2 stay, token 3 (0.05) goes.
    tokens = draws(LOGITS4, 3000, temperature=1.0, top_k=top_k, top_p=top_p, min_p=0.2)
    assert set(tokens.tolist()) == {0, 1, 2}
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(freq[:3], PROBS[:3] / PROBS[:3].sum(), atol=0.03)
    # min_p 1 keeps only the top token.
    assert set(draws(LOGITS4, 300, top_k=top_k, top_p=top_p, min_p=1.0).tolist()) == {0}


def test_top_k_limits_the_candidates():
    logits = random_logits(np.random.default_rng(9), 1, 100)[0]
    tokens = draws(logits, 2000, temperature=5.0, top_k=5, top_p=1.0)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert set(tokens.tolist()) == top5


# --- the distribution -----------------------------------------------------------------------


# Chi-square critical values at p = 0.001 for 5 and 3 degrees of freedom.
CHI2_5, CHI2_3 = 20.52, 16.27


@pytest.mark.parametrize(
    ("params", "transform", "critical"),
    [
        # No filters: the whole vocabulary in token order.
        (dict(temperature=1.0, top_k=0, top_p=1.0), lambda lg: lg, CHI2_5),
        # A no-op top_p (0.9999 keeps every token here) takes the sorted path.
        (dict(temperature=1.0, top_k=0, top_p=0.9999), lambda lg: lg, CHI2_5),
        # Temperature 0.5 sharpens: softmax(logits / 0.5).
        (dict(temperature=0.5, top_k=0, top_p=1.0), lambda lg: lg / 0.5, CHI2_5),
        # top_k 4 renormalizes over the four largest logits.
        (
            dict(temperature=1.0, top_k=4, top_p=1.0),
            lambda lg: np.where(lg >= np.sort(lg)[-4], lg, -np.inf),
            CHI2_3,
        ),
    ],
)
def test_empirical_distribution_matches_softmax(params, transform, critical):
    logits = np.array([1.0, 0.2, -0.5, 0.7, -1.5, 0.0], dtype=np.float32)
    rows, steps = 1000, 8
    samplers = [sampler(seed=1000 + i, **params) for i in range(rows)]
    batch = mx.array(np.tile(logits, (rows, 1)))
    tokens = np.concatenate([np.array(sample_batch(batch, samplers).tokens) for _ in range(steps)])
    probs = np.exp(log_softmax(transform(logits.astype(np.float64))))
    kept = probs > 0
    assert set(np.unique(tokens).tolist()) <= set(np.flatnonzero(kept).tolist())
    # Pearson's chi-square over the tokens that can occur.
    observed = np.bincount(tokens, minlength=len(logits))[kept]
    expected = probs[kept] * len(tokens)
    assert float(((observed - expected) ** 2 / expected).sum()) < critical


# --- seeds ----------------------------------------------------------------------------------


def run_steps(samplers, logits_steps, accept=True):
    out = []
    for logits in logits_steps:
        tokens = sample_batch(mx.array(logits), samplers).tokens
        if accept:
            for s, t in zip(samplers, tokens, strict=True):
                s.accept(t)
        out.append(tokens)
    return np.array(out)


def test_same_seed_same_tokens_and_different_seeds_differ():
    rng = np.random.default_rng(3)
    steps = [random_logits(rng, 1, 500) / 3 for _ in range(30)]
    params = dict(temperature=1.0, top_k=0, top_p=0.95, repeat_penalty=1.2)
    a = run_steps([sampler([1, 2, 3], seed=42, **params)], steps)
    b = run_steps([sampler([1, 2, 3], seed=42, **params)], steps)
    c = run_steps([sampler([1, 2, 3], seed=43, **params)], steps)
    np.testing.assert_array_equal(a, b)
    assert (a != c).sum() > 10


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "row_params",
    [
        dict(),  # Ollama's defaults: the top-k path
        dict(top_k=0, top_p=0.9),  # full sort
        dict(top_k=0, top_p=1.0, min_p=0.05),  # unsorted
        dict(temperature=1.3, top_k=7, repeat_penalty=1.5, presence_penalty=0.5),
    ],
)
def test_seeded_row_is_independent_of_batch_composition(row_params, ties):
    rng = np.random.default_rng(11)
    steps = [random_logits(rng, 3, 400) for _ in range(12)]
    if ties:
        # Few distinct values, as with bf16 logits: order must not depend on neighbours.
        steps = [np.round(s) for s in steps]
    prompt = [4, 4, 9, 17]
    alone = run_steps([sampler(prompt, seed=7, **row_params)], [s[1:2] for s in steps])
    others = [
        sampler([1, 2], seed=1, temperature=0.5, top_k=100, logprobs=True, top_logprobs=5),
        sampler([3], seed=2, top_k=0, top_p=1.0, repeat_penalty=1.3, frequency_penalty=0.2),
    ]
    together = run_steps([others[0], sampler(prompt, seed=7, **row_params), others[1]], steps)
    np.testing.assert_array_equal(alone[:, 0], together[:, 1])


def test_sample_batch_does_not_accept():
    s = sampler([1, 2], seed=0, repeat_penalty=1.5)
    sample_batch(mx.array(random_logits(np.random.default_rng(0), 1, 10)), [s])
    assert s.history == (1, 2)
    s.accept(7)
    assert s.history == (1, 2, 7)
    assert len(s) == 3


# --- penalties, exactly ---------------------------------------------------------------------

PEN_LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 1.0], dtype=np.float32)


def penalized(s: SequenceSampler) -> np.ndarray:
    return np.array(apply_penalties(mx.array(PEN_LOGITS[None]), [s]))[0]


def test_penalties_on_a_hand_computed_example():
    # History counts: token 0 twice, token 1 once, token 3 three times.
    history = [3, 0, 1, 3, 0, 3]
    s = sampler(
        history, repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, repeat_last_n=-1
    )
    expected = np.array(
        [
            2.0 / 2 - 2 * 0.5 - 0.25,  # positive: divided
            -1.0 * 2 - 1 * 0.5 - 0.25,  # negative: multiplied
            0.5,  # absent
            3.0 / 2 - 3 * 0.5 - 0.25,
            -2.0,
            1.0,
        ]
    )
    np.testing.assert_allclose(penalized(s), expected, rtol=1e-6)


def test_each_penalty_alone():
    history = [0, 0, 1]
    np.testing.assert_allclose(
        penalized(sampler(history, repeat_penalty=4.0)), [0.5, -4.0, 0.5, 3.0, -2.0, 1.0]
    )
    np.testing.assert_allclose(
        penalized(sampler(history, frequency_penalty=0.5)), [1.0, -1.5, 0.5, 3.0, -2.0, 1.0]
    )
    np.testing.assert_allclose(
        penalized(sampler(history, presence_penalty=0.5)), [1.5, -1.5, 0.5, 3.0, -2.0, 1.0]
    )
    # A repeat penalty below 1 rewards repetition.
    np.testing.assert_allclose(
        penalized(sampler(history, repeat_penalty=0.5)), [4.0, -0.5, 0.5, 3.0, -2.0, 1.0]
    )


def test_repeat_last_n_zero_turns_penalties_off():
    s = sampler([0, 1, 3], repeat_last_n=0, repeat_penalty=2.0, presence_penalty=1.0)
    np.testing.assert_array_equal(penalized(s), PEN_LOGITS)


def test_window_smaller_than_history_slides_with_accept():
    s = sampler([0, 0, 1, 3], repeat_last_n=2, frequency_penalty=1.0)  # window [1, 3]
    np.testing.assert_allclose(penalized(s), [2.0, -2.0, 0.5, 2.0, -2.0, 1.0])
    s.accept(3)  # window [3, 3]
    np.testing.assert_allclose(penalized(s), [2.0, -1.0, 0.5, 1.0, -2.0, 1.0])
    s.accept(5)  # window [3, 5]
    np.testing.assert_allclose(penalized(s), [2.0, -1.0, 0.5, 2.0, -2.0, 0.0])
    assert s.history == (0, 0, 1, 3, 3, 5)


def test_whole_context_window_is_bounded_by_context_limit():
    history = [0, 0, 0, 1, 2]
    unbounded = sampler(history, repeat_last_n=-1, frequency_penalty=1.0)
    np.testing.assert_allclose(penalized(unbounded), [-1.0, -2.0, -0.5, 3.0, -2.0, 1.0])
    bounded = sampler(history, repeat_last_n=-1, frequency_penalty=1.0, context_limit=3)
    np.testing.assert_allclose(penalized(bounded), [1.0, -2.0, -0.5, 3.0, -2.0, 1.0])
    # The default window, 64, covers all of a short history.
    default = sampler(history, frequency_penalty=1.0)
    np.testing.assert_allclose(penalized(default), penalized(unbounded))


def test_history_ids_outside_the_vocabulary_are_ignored():
    # Token 99 is outside V = 6 (a tokenizer larger than the logits): no out-of-bounds write.
    s = sampler([99, 1, -3], repeat_penalty=2.0)
    np.testing.assert_allclose(penalized(s), [2.0, -2.0, 0.5, 3.0, -2.0, 1.0])
    assert sample_one(mx.array(PEN_LOGITS), s).token in range(6)


def test_penalties_in_a_batch_touch_only_their_rows():
    logits = np.tile(PEN_LOGITS, (3, 1))
    samplers = [
        sampler([0, 1, 3, 3], presence_penalty=1.0),
        sampler([0, 1, 3], temperature=0),  # no penalties: unchanged
        sampler([5], repeat_penalty=2.0),
    ]
    out = np.array(apply_penalties(mx.array(logits), samplers))
    np.testing.assert_allclose(out[0], [1.0, -2.0, 0.5, 2.0, -2.0, 1.0])
    np.testing.assert_array_equal(out[1], PEN_LOGITS)
    np.testing.assert_allclose(out[2], [2.0, -1.0, 0.5, 3.0, -2.0, 0.5])


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_the_raw_logits():
    rng = np.random.default_rng(21)
    logits = random_logits(rng, 3, 200)
    samplers = [
        sampler([5, 6], seed=1, logprobs=True, top_logprobs=5, repeat_penalty=1.7, temperature=0.3),
        sampler(seed=2),  # no logprobs
        sampler(temperature=0, logprobs=True),  # logprobs but no alternatives
    ]
    result = sample_batch(mx.array(logits), samplers)
    expected = log_softmax(logits)
    for row in (0, 2):
        assert result.logprobs[row] == pytest.approx(expected[row, result.tokens[row]], abs=1e-4)
    assert result.logprobs[1] is None
    assert result.top_logprobs[1] is None
    assert result.top_logprobs[2] == []
    top = result.top_logprobs[0]
    assert [t for t, _ in top] == np.argsort(-logits[0])[:5].tolist()
    np.testing.assert_allclose([v for _, v in top], np.sort(expected[0])[::-1][:5], atol=1e-4)
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(top))


def test_sample_one_and_lazy_build():
    logits = random_logits(np.random.default_rng(2), 1, 64)
    choice = sample_one(mx.array(logits[0]), sampler(temperature=0, logprobs=True))
    assert choice.token == int(logits.argmax())
    assert choice.logprob == pytest.approx(float(log_softmax(logits)[0].max()), abs=1e-5)
    pending = build_sample(mx.array(logits), [sampler(temperature=0)])
    mx.async_eval(*pending.arrays())
    assert pending.result() == SampleResult([int(logits.argmax())], [None], [None])


def test_low_precision_logits_are_accepted():
    logits = random_logits(np.random.default_rng(4), 2, 100)
    result = sample_batch(
        mx.array(logits).astype(mx.bfloat16), [sampler(temperature=0), sampler(seed=3)]
    )
    as_bf16 = np.array(mx.array(logits).astype(mx.bfloat16).astype(mx.float32))
    assert as_bf16[0, result.tokens[0]] == as_bf16[0].max()
    assert 0 <= result.tokens[1] < 100


def test_empty_batch():
    assert sample_batch(mx.zeros((0, 10)), []) == SampleResult([], [], [])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="logits must be"):
        sample_batch(mx.zeros((2, 10)), [sampler()])
    assert math.isfinite(sample_one(mx.zeros((1, 10)), sampler(seed=0)).token)


def test_rewound_draws_repeat_and_a_stateless_sampler_needs_no_history():
    sampler = SequenceSampler(SamplingParams(temperature=0.8, seed=11), [1, 2])
    first = [sampler.next_uniform() for _ in range(3)]
    sampler.rewind_to(1)
    assert sampler.draws == 1
    assert [sampler.next_uniform() for _ in range(2)] == first[1:]
    assert sampler.stateless
    assert not SequenceSampler(SamplingParams(repeat_penalty=1.1), [1]).stateless
