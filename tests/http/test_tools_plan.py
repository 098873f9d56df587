"""ChatPlan on real tokenizers with real templates, no server: forced-call grammars walked by
random draws end in a valid call, templates that open a reasoning block, reasoning_effort."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from chat_templates import TEMPLATES
from kvgrove.grammar import Constraint
from kvgrove.http.common import BadRequest
from kvgrove.http.tools import chat_plan
from kvgrove.tokenize.loading import load_tokenizer
from tiny_models import write_tiny_model

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
ANY = {"type": "function", "function": {"name": "any", "parameters": {}}}
NOTE = {
    "type": "function",
    "function": {
        "name": "note",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "maxLength": 6}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "Add 2 and 3."}]
# DeepSeek-R1 style: the generation prompt opens the reasoning block for the model.
OPENS_THINK = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].split('</think>')[-1] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
EFFORT = (
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    "{% if reasoning_effort is defined %}effort={{ reasoning_effort }}{% endif %}"
)


def runtime(tmp_path, template: str) -> SimpleNamespace:
    folder = write_tiny_model(tmp_path / "m", "llama", chat_template=template)
    return SimpleNamespace(loaded=SimpleNamespace(tokenizer=load_tokenizer(folder)))


def walk(grammar: str, tok, seed: int, limit: int = 400) -> str:
    """Random allowed tokens until the grammar is complete: what any model could write."""
    rng = np.random.default_rng(seed)
    c = Constraint(grammar, tok)
    ids = []
    for _ in range(limit):
        allowed = np.flatnonzero(c.mask(tok.vocab_size))
        t = int(rng.choice(allowed))
        if t in tok.eos_ids:
            break
        c.accept(t)
        ids.append(t)
    assert c.accepting, tok.decode(ids)
    return tok.decode(ids)


@pytest.mark.parametrize("family", [*sorted(TEMPLATES), "opens_think", "generic"])
def test_a_forced_call_walked_at_random_is_a_valid_call(tmp_path, family):
    template = {"opens_think": OPENS_THINK, "generic": "{{ messages[0]['content'] }}"}.get(
        family, TEMPLATES.get(family)
    )
    rt = runtime(tmp_path, template)
    tok = rt.loaded.tokenizer
    named = {"type": "function", "function": {"name": "add"}}
    for choice in ("required", named):
        body = {"tools": [ADD, NOTE], "tool_choice": choice}
        plan = chat_plan(rt, body, ASK, api="openai")
        assert plan.grammar is not None
        for seed in range(4):
            text = walk(plan.grammar, tok, seed)
            split = plan.split_all(text)
            (call,) = split.calls
            assert split.content.strip() == ""
            if choice is named:
                assert call["name"] == "add"
            args = call["arguments"]
            if call["name"] == "add":
                assert set(args) == {"a", "b"} and all(type(v) is int for v in args.values())
            else:
                assert isinstance(args["text"], str) and len(args["text"]) <= 6
            if family == "opens_think":  # the open reasoning block is closed first
                assert text.startswith("</think>") and split.reasoning == ""


def test_reasoning_effort_reaches_templates_that_read_it(tmp_path):
    rt = runtime(tmp_path, EFFORT)
    plan = chat_plan(rt, {"reasoning_effort": "low"}, ASK, api="openai")
    assert plan.prompt.endswith("effort=low")
    plan = chat_plan(rt, {"think": "high"}, ASK, api="ollama")
    assert plan.prompt.endswith("effort=high")
    with pytest.raises(BadRequest, match="reasoning_effort"):
        chat_plan(rt, {"reasoning_effort": 3}, ASK, api="openai")


def test_a_template_that_opens_reasoning_starts_the_reply_inside_it(tmp_path):
    rt = runtime(tmp_path, OPENS_THINK)
    plan = chat_plan(rt, {}, ASK, api="openai")
    assert plan.reasoning
    split = plan.split_all("Two plus three.\n</think>\n\nFive.")
    assert (split.reasoning, split.content) == ("Two plus three.\n", "Five.")
    with pytest.raises(BadRequest, match="reasoning_effort"):  # no switch in this template
        chat_plan(rt, {"reasoning_effort": "none"}, ASK, api="openai")


def test_a_template_without_tools_gets_them_in_the_system_turn(tmp_path):
    rt = runtime(tmp_path, OPENS_THINK)
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    plan = chat_plan(rt, {"tools": [ADD]}, history, api="openai")
    system = plan.prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert json.dumps(ADD) in system and "<tool_call>" in system
    assert (
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in plan.prompt
    )
    assert "<|im_start|>user\n<tool_response>\n5\n</tool_response>" in plan.prompt
    plan = chat_plan(rt, {"tools": [ADD], "tool_choice": "none"}, ASK, api="openai")
    assert "<tools>" not in plan.prompt and plan.syntax is None


def allows(grammar: str, tok, text: str) -> bool:
    """Whether the grammar lets the model write exactly ``text`` (token by token)."""
    c = Constraint(grammar, tok)
    for t in tok.encode(text, parse_special=False):
        if not c.mask(tok.vocab_size)[t]:
            return False
        c.accept(t)
    return c.accepting


def test_a_schema_saying_nothing_still_forces_an_object(tmp_path):
    rt = runtime(tmp_path, TEMPLATES["qwen3"])
    plan = chat_plan(rt, {"tools": [ANY], "tool_choice": "required"}, ASK, api="openai")
    head = '<tool_call>\n{"name": "any", "arguments": '
    assert allows(plan.grammar, rt.loaded.tokenizer, head + '{"x":[1]}}\n</tool_call>')
    assert not allows(plan.grammar, rt.loaded.tokenizer, head + "5}\n</tool_call>")
