"""Tool calls with the bundled model (SmolLM2, whose template knows no tools: the server
describes them in the system turn and reads json_tools' `<tool_call>` syntax), through the
real `openai` and `ollama` clients against the session's live kvgrove."""

from __future__ import annotations

import json

import httpx
import pytest

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up in the dictionary",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string", "maxLength": 12}},
            "required": ["word"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [LOOKUP, ADD]
ASK = [{"role": "user", "content": "What does 'grove' mean?"}]


def valid(name: str, args: dict) -> bool:
    if name == "lookup":
        return set(args) == {"word"} and isinstance(args["word"], str) and len(args["word"]) <= 12
    return set(args) == {"a", "b"} and all(
        isinstance(v, int) and 0 <= v <= 99 for v in args.values()
    )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "add"}}], ids=["req", "add"]
)
def test_required_and_named_choice_return_a_valid_call(oa, choice, temperature):
    r = oa.chat.completions.create(
        model="smollm2",
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        max_tokens=80,
        temperature=temperature,
        seed=3,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    (call,) = c.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert call.function.name == "add"
    assert valid(call.function.name, json.loads(call.function.arguments))
    assert c.message.content is None


def test_named_choice_streams_a_valid_call(oa):
    chunks = list(
        oa.chat.completions.create(
            model="smollm2",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "lookup"}},
            max_tokens=80,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    parts = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert parts[0].id and parts[0].function.name == "lookup" and parts[0].index == 0
    args = json.loads("".join(p.function.arguments or "" for p in parts))
    assert valid("lookup", args)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finish[-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0


def test_the_tool_result_turn_is_answered_with_the_tools_prefix_cached(oa):
    first = oa.chat.completions.create(
        model="smollm2", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "a small wood"},
    ]
    second = oa.chat.completions.create(
        model="smollm2", messages=history, tools=TOOLS, max_tokens=12, temperature=0.0
    )
    c = second.choices[0]
    assert c.message.content or c.message.tool_calls
    assert c.finish_reason in ("stop", "length", "tool_calls")
    # The system turn holding the tool definitions, and the question, came from the cache.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 2


def test_ollama_client_tools_and_history(ol, live_server):
    """Ollama has no tool_choice: with tools the model may or may not call one; either way no
    call markup reaches the content, and a history holding a call and its result renders."""
    for stream in (False, True):
        kwargs = dict(model="smollm2", messages=ASK, tools=TOOLS, options={"num_predict": 40})
        if stream:
            parts = list(ol.chat(**kwargs, stream=True))
            content = "".join(p.message.content or "" for p in parts)
            assert parts[-1].done
        else:
            r = ol.chat(**kwargs)
            content = r.message.content
            assert r.done_reason in ("stop", "length")
        assert "<tool_call>" not in content and "</tool_call>" not in content
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "lookup", "arguments": {"word": "grove"}}}],
        },
        {"role": "tool", "tool_name": "lookup", "content": "a small wood"},
    ]
    r = ol.chat(model="smollm2", messages=history, tools=TOOLS, options={"num_predict": 8})
    assert r.done and r.prompt_eval_count > 0
    # The same turn again (raw, to read kvgrove's prompt_cache_count): its prompt is cached.
    body = {
        "model": "smollm2",
        "messages": history,
        "tools": TOOLS,
        "stream": False,
        "options": {"num_predict": 8},
    }
    again = httpx.post(f"{live_server.url}/api/chat", json=body, timeout=120).json()
    assert again["prompt_cache_count"] > 0
