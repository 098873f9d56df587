"""Tool-call syntax per family and the reasoning/content/calls split, on scripted outputs."""

from __future__ import annotations

import itertools
import json

import pytest

from chat_templates import LLAMA31, MISTRAL, QWEN3
from kvgrove.tokenize.calls import (
    GENERIC,
    THINK,
    OutputSplitter,
    call_syntax,
    starts_in_reasoning,
    think_markers,
)

CHATML = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def split(text, syntax, *, pieces, think=None, reasoning=False):
    """Feed `text` in `pieces`-character slices (0: all at once); the joined result."""
    sp = OutputSplitter(syntax=syntax, tools=TOOLS, think=think, reasoning=reasoning)
    parts = [text] if pieces == 0 else [text[i : i + pieces] for i in range(0, len(text), pieces)]
    outs = [sp.feed(p) for p in parts] + [sp.finish()]
    return (
        "".join(o.reasoning for o in outs),
        "".join(o.content for o in outs),
        [c for o in outs for c in o.calls],
        outs,
    )


def plain(calls):
    return [{k: v for k, v in c.items() if k != "raw_arguments"} for c in calls]


def test_families_are_chosen_from_the_template_as_mlx_lm_does():
    assert call_syntax(QWEN3, {}).family == "json_tools"
    assert call_syntax(MISTRAL, {}).family == "mistral"
    assert call_syntax(LLAMA31, {}).family == "llama3_json"
    assert call_syntax(CHATML, {}) is GENERIC and GENERIC.generic
    assert think_markers(QWEN3, {}) == THINK
    assert think_markers(LLAMA31, {}) is None
    assert starts_in_reasoning("<|im_start|>assistant\n<think>\n", THINK)
    assert not starts_in_reasoning("<think>\n\n</think>\n\n", THINK)


CASES = [
    (
        QWEN3,
        'I will look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        "I will look.\n",
        [{"name": "get_weather", "arguments": {"city": "Paris"}}],
    ),
    (
        QWEN3,
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"x": [1, 2]}}\n</tool_call>',
        "\n",
        [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": [1, 2]}}],
    ),
    (
        MISTRAL,
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abcdefghi"}]',
        "",
        [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abcdefghi"}],
    ),
    (
        MISTRAL,
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}',
        "",
        [{"name": "get_weather", "arguments": {"city": "Oslo"}}],
    ),
    (
        LLAMA31,
        '{"name": "get_weather", "parameters": {"city": "Lima"}}',
        "",
        [{"name": "get_weather", "arguments": {"city": "Lima"}}],
    ),
    (
        LLAMA31,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Bern"}}',
        "",
        [{"name": "get_weather", "arguments": {"city": "Bern"}}],
    ),
    (LLAMA31, "It is sunny {not json", "It is sunny {not json", []),
    (
        CHATML,
        'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Kyiv"}}</tool_call>',
        "Sure ",
        [{"name": "get_weather", "arguments": {"city": "Kyiv"}}],
    ),
]


@pytest.mark.parametrize("pieces", [0, 1, 3])
@pytest.mark.parametrize(("template", "text", "content", "calls"), CASES)
def test_calls_are_parsed_and_their_markup_never_reaches_content(
    template, text, content, calls, pieces
):
    syntax = call_syntax(template, {})
    _, got_content, got_calls, outs = split(text, syntax, pieces=pieces)
    for c in got_calls:  # the arguments' text as written, where the family writes JSON
        assert json.loads(c.pop("raw_arguments", json.dumps(c["arguments"]))) == c["arguments"]
    assert got_calls == calls
    assert got_content == content
    for marker in ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>"):
        assert all(marker not in o.content for o in outs) or not calls


@pytest.mark.parametrize("pieces", [0, 1, 2])
def test_a_call_cut_short_comes_out_as_content(pieces):
    text = '<tool_call>\n{"name": "get_weather", "argum'
    _, content, calls, _ = split(text, call_syntax(QWEN3, {}), pieces=pieces)
    assert calls == [] and content == text


@pytest.mark.parametrize("pieces", [0, 1, 4])
def test_reasoning_is_split_from_content(pieces):
    text = "<think>\nLet me see.\n</think>\n\nParis."
    reasoning, content, calls, outs = split(text, None, pieces=pieces, think=THINK)
    assert (reasoning, content, calls) == ("\nLet me see.\n", "Paris.", [])
    assert all("<think" not in o.content and "</" not in o.content for o in outs)
    # A prompt that opened the block: the reply starts inside it.
    reasoning, content, _, _ = split(
        "hmm</think>ok", None, pieces=pieces, think=THINK, reasoning=True
    )
    assert (reasoning, content) == ("hmm", "ok")
    # Reasoning, then a call.
    text = '<think>x</think>\n\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    reasoning, content, calls, _ = split(text, call_syntax(QWEN3, {}), pieces=pieces, think=THINK)
    assert (reasoning, content, plain(calls)) == ("x", "", [{"name": "f", "arguments": {}}])


def test_text_like_a_marker_is_held_back_only_until_it_is_not_one():
    sp = OutputSplitter(syntax=call_syntax(QWEN3, {}), tools=None, think=THINK)
    assert sp.feed("a <tool").content == "a "
    assert sp.feed("box> b").content == "<toolbox> b"
    assert sp.feed("<thi").content == ""
    assert sp.finish().content == "<thi"


@pytest.mark.parametrize("template", [QWEN3, LLAMA31])
def test_a_call_is_visible_while_it_streams_in_name_first_families(template):
    text = SCRIPT_OF[template]
    sp = OutputSplitter(syntax=call_syntax(template, {}), tools=None, think=None)
    seen = []
    calls = []
    for ch in text:
        calls += sp.feed(ch).calls
        live = sp.live_call()
        if live is not None:
            seen.append(live)
    calls += sp.finish().calls
    names = {name for name, _ in seen}
    assert names == {"get_weather"}
    grown = [args for _, args in seen]
    assert all(b.startswith(a) for a, b in itertools.pairwise(grown))
    assert grown[-1] == '{"city": "Paris", "note": "a } b"}'  # a brace inside a string
    (call,) = calls
    assert call["raw_arguments"] == grown[-1]


SCRIPT_OF = {
    QWEN3: '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "a } b"}}'
    "\n</tool_call>",
    LLAMA31: '{"name": "get_weather", "parameters": {"city": "Paris", "note": "a } b"}}',
}


def test_a_refused_call_that_was_shown_is_not_content():
    sp = OutputSplitter(syntax=call_syntax(QWEN3, {}), tools=None, think=None)
    sp.feed('<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert sp.live_call() == ("f", '{"a": ')
    sp.announce()
    rest = sp.finish()
    assert rest.content == "" and rest.unparsed.startswith("<tool_call>")
