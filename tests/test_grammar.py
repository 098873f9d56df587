"""Constrained decoding: llguidance grammars through the batched sampler.

The logits are random (seeded numpy) over the bundled model's real vocabulary, so the
grammar, not the model, decides validity: whatever the logits favour, the output must parse
and match the schema, and EOS may come only where the grammar can end.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgrove.grammar import (
    Constraint,
    GrammarError,
    any_json_grammar,
    check_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from kvgrove.models.bundled import DEFAULT, pull
from kvgrove.sampling import SamplingParams, SequenceSampler, build_sample
from kvgrove.tokenize import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(pull(DEFAULT))


def decode(tok, samplers, *, steps, seed, eos_bias=0.0):
    """Run ``steps`` batched steps over random logits; each row stops at EOS.

    Row i's logits at step t depend only on (seed, i, t), so a row sees the same logits alone
    or in any batch. Returns each row's tokens (EOS included when it came).
    """
    width = tok.vocab_size
    outputs: list[list[int]] = [[] for _ in samplers]
    live = list(range(len(samplers)))
    for t in range(steps):
        if not live:
            break
        rows = []
        for i in live:
            row = np.random.default_rng([seed, samplers[i].seed % 1000, t]).normal(size=width)
            row[sorted(tok.eos_ids)] += eos_bias
            rows.append(row.astype(np.float32) * 4)
        result = build_sample(mx.array(np.stack(rows)), [samplers[i] for i in live]).result()
        still = []
        for j, i in enumerate(live):
            token = result.tokens[j]
            samplers[i].accept(token)
            outputs[i].append(token)
            if token not in tok.eos_ids:
                still.append(i)
        live = still
    return outputs


def constrained(tok, grammar, *, seed, **params):
    params = SamplingParams(seed=seed, grammar=grammar, **params)
    return SequenceSampler(params, [], constraint=Constraint(grammar, tok))


def text_of(tok, tokens):
    return tok.decode([t for t in tokens if t not in tok.eos_ids])


def conforms(value, schema) -> bool:
    """A small validator for the schemas ``schemas()`` draws."""
    kind = schema.get("type")
    if "enum" in schema:
        return value in schema["enum"]
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema["minimum"] <= value <= schema["maximum"]
        )
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema["maxLength"]
    if kind == "array":
        return (
            isinstance(value, list)
            and len(value) <= schema["maxItems"]
            and all(conforms(v, schema["items"]) for v in value)
        )
    if kind == "object":
        props = schema["properties"]
        return (
            isinstance(value, dict)
            and set(value) == set(props)
            and all(conforms(value[k], props[k]) for k in props)
        )
    raise AssertionError(schema)


def leaves():
    return st.one_of(
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-1000, 1000),
            st.integers(0, 1000),
        ),
        st.just({"type": "boolean"}),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
        st.builds(
            lambda vs: {"type": "string", "enum": vs},
            st.lists(
                st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=3, unique=True
            ),
        ),
    )


def schemas():
    names = st.text("abcdefgh_", min_size=1, max_size=6)

    def objects(children):
        return st.builds(
            lambda props: {
                "type": "object",
                "properties": props,
                "required": sorted(props),
                "additionalProperties": False,
            },
            st.dictionaries(names, children, min_size=1, max_size=3),
        )

    arrays = st.builds(
        lambda items, n: {"type": "array", "items": items, "maxItems": n},
        leaves(),
        st.integers(0, 3),
    )
    return objects(st.one_of(leaves(), arrays, objects(st.one_of(leaves(), arrays))))


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(schema=schemas(), seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 1.0]))
def test_schema_output_is_valid_greedy_and_sampled(tok, schema, seed, temperature):
    grammar = json_schema_grammar(schema)
    check_grammar(grammar, tok)
    sampler = constrained(tok, grammar, seed=seed, temperature=temperature, top_k=0, top_p=1.0)
    (tokens,) = decode(tok, [sampler], steps=400, seed=seed)
    assert tokens[-1] in tok.eos_ids, "the grammar should complete within 400 tokens"
    value = json.loads(text_of(tok, tokens))
    assert conforms(value, schema), (schema, value)


def test_eos_only_where_the_grammar_can_end(tok):
    # EOS strongly favoured: the constrained row still writes the whole match first.
    grammar = regex_grammar("ab(cd){3}")
    sampler = constrained(tok, grammar, seed=1, temperature=0.0)
    (tokens,) = decode(tok, [sampler], steps=50, seed=3, eos_bias=100.0)
    assert tokens[-1] in tok.eos_ids
    assert text_of(tok, tokens) == "abcdcdcd"
    # The same grammar cut short by the token limit is not complete: no EOS, not accepting.
    short = constrained(tok, grammar, seed=1, temperature=0.0)
    (tokens,) = decode(tok, [short], steps=2, seed=3, eos_bias=100.0)
    assert all(t not in tok.eos_ids for t in tokens)
    assert not short.constraint.accepting


def test_mixed_batch_rows_get_the_tokens_they_get_alone(tok):
    grammar = any_json_grammar()

    def rows():
        return [
            constrained(tok, grammar, seed=11, temperature=1.0, top_k=0, top_p=1.0),
            SequenceSampler(SamplingParams(seed=12, temperature=1.0), []),
            constrained(tok, grammar, seed=13, temperature=0.0),
            SequenceSampler(SamplingParams(seed=14, temperature=0.0), []),
            constrained(tok, lark_grammar('start: "yes" | "no"'), seed=15, temperature=1.0),
        ]

    together = decode(tok, rows(), steps=40, seed=5)
    alone = [decode(tok, [s], steps=40, seed=5)[0] for s in rows()]
    assert together == alone
    assert text_of(tok, together[4]) in ("yes", "no")
    # The free rows really are free: random logits do not write JSON.
    assert not text_of(tok, together[3]).startswith("{")


def test_rejected_grammars_name_why(tok):
    with pytest.raises(GrammarError, match="schema"):
        json_schema_grammar(["not", "a", "schema"])
    with pytest.raises(GrammarError) as err:
        check_grammar(lark_grammar("start: undefined_rule"), tok)
    assert "undefined_rule" in str(err.value)
    with pytest.raises(GrammarError):
        check_grammar(json_schema_grammar({"type": "no-such-type"}), tok)


def test_grammar_param_must_be_a_string():
    with pytest.raises(ValueError, match="grammar"):
        SamplingParams(grammar=3)
