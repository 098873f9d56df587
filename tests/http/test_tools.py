"""Tool calls and the reasoning split over HTTP: tiny random-weight models carrying Qwen3's,
Llama 3.1's and Mistral's real chat templates, and the bundled model (whose template knows no
tools), through the real `openai` and `ollama` clients.

A random model's words are noise, so replies are scripted with kvgrove's `grammar` extension
(a regex the model's output must match): the server then parses real model output, token by
token, exactly as it would a trained model's. `required` and named `tool_choice` need no
script: the server constrains decoding to the family's call syntax itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from functools import partial
from typing import Any

import httpx
import ollama
import openai
import pytest
import trio

from chat_templates import TEMPLATES
from kvgrove.config import Settings
from kvgrove.serve import serve
from tiny_models import write_tiny_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def valid_weather(arguments: dict) -> bool:
    return (
        set(arguments) == {"city", "days"}
        and isinstance(arguments["city"], str)
        and len(arguments["city"]) <= 10
        and isinstance(arguments["days"], int)
        and 1 <= arguments["days"] <= 7
    )


def valid_time(arguments: dict) -> bool:
    return arguments in ({"zone": "UTC"}, {"zone": "CET"})


def valid_call(name: str, arguments: dict) -> bool:
    return {"get_weather": valid_weather, "get_time": valid_time}[name](arguments)


def regex_of(text: str) -> str:
    """A regex matching exactly `text`."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~/" else c for c in text)


class Tiny:
    def __init__(self, url: str, server: Any, token: Any) -> None:
        self.url = url
        self.server = server
        self.token = token
        self.oa = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
        self.ol = ollama.Client(host=url, timeout=120)

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120)


def _run_server(settings: Settings) -> Iterator[Tiny]:
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, settings, handle_signals=False))
            box["server"] = server
            box["token"] = trio.lowlevel.current_trio_token()
            await server.ready.wait()
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=run, name="kvgrove-tools-server", daemon=True)
    thread.start()
    assert ready.wait(120), "server did not become ready"
    if "error" in box:
        raise box["error"]
    server = box["server"]
    yield Tiny(server.url, server, box["token"])
    box["token"].run_sync_soon(server.shutdown.set)
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def tiny(request, tmp_path_factory) -> Iterator[Tiny]:
    root = tmp_path_factory.mktemp(f"tools-{request.param}")
    folder = write_tiny_model(
        root / "model", "llama", chat_template=TEMPLATES[request.param], context_length=4096
    )
    settings = Settings(
        port=0, model=str(folder), shutdown_grace_seconds=0.5, kv_cache_dir=str(root / "kv")
    )
    tiny = next(gen := _run_server(settings))
    tiny.family = request.param
    yield tiny
    next(gen, None)


@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_tool_choice_gives_a_valid_call_from_a_random_model(tiny, choice):
    tool_choice = (
        "required"
        if choice == "required"
        else {"type": "function", "function": {"name": "get_time"}}
    )
    for seed in range(3):
        r = tiny.oa.chat.completions.create(
            model="model",
            messages=ASK,
            tools=TOOLS,
            tool_choice=tool_choice,
            max_tokens=120,
            temperature=1.0,
            seed=seed,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c
        (call,) = c.message.tool_calls
        assert call.id and call.type == "function"
        if choice == "named":
            assert call.function.name == "get_time"
        assert valid_call(call.function.name, json.loads(call.function.arguments))
        assert not c.message.content


def test_forced_tool_choice_streams_index_id_name_then_arguments(tiny):
    stream = tiny.oa.chat.completions.create(
        model="model",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=120,
        temperature=1.0,
        seed=7,
        stream=True,
    )
    chunks = list(stream)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == ""
    head, *fragments = calls
    assert head.index == 0 and head.id and head.function.name == "get_weather"
    assert fragments and all(f.index == 0 and f.id is None for f in fragments)
    if tiny.family != "mistral":  # name-first syntax: the arguments stream as they are written
        assert len(fragments) > 3
    arguments = head.function.arguments + "".join(f.function.arguments for f in fragments)
    assert valid_weather(json.loads(arguments))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# The call each family writes, as its template renders one (what a trained model would say).
SCRIPTS = {
    "qwen3": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
    '"days": 2}}\n</tool_call>',
    "llama31": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]',
}
SCRIPT_CONTENT = {"qwen3": "Checking.\n", "llama31": "", "mistral": ""}


@pytest.mark.parametrize("stream", [False, True])
def test_scripted_calls_of_each_family_are_parsed(tiny, stream):
    body = {
        "model": "model",
        "messages": ASK,
        "tools": TOOLS,
        "max_tokens": 200,
        "stream": stream,
        "grammar": {"regex": regex_of(SCRIPTS[tiny.family])},
    }
    r = tiny.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    if not stream:
        choice = r.json()["choices"][0]
        msg = choice["message"]
        assert choice["finish_reason"] == "tool_calls"
        assert (msg["content"] or "") == SCRIPT_CONTENT[tiny.family].strip() or msg[
            "content"
        ] == SCRIPT_CONTENT[tiny.family]
        (call,) = msg["tool_calls"]
    else:
        events = [
            json.loads(line[6:])
            for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        content = "".join(d.get("content") or "" for d in deltas)
        assert content == SCRIPT_CONTENT[tiny.family]
        parts = [tc for d in deltas for tc in d.get("tool_calls", [])]
        call = {
            "id": parts[0]["id"],
            "function": {
                "name": parts[0]["function"]["name"],
                "arguments": "".join(p["function"]["arguments"] for p in parts),
            },
        }
        assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_ollama_client_gets_tool_calls(tiny):
    """Through the real `ollama` client (which cannot send `grammar`): Llama 3.1's calls are
    bare JSON, so a `format` schema scripts one; the others get theirs through the raw API."""
    if tiny.family == "llama31":
        schema = {
            "type": "object",
            "properties": {
                "name": {"const": "get_time"},
                "parameters": {
                    "type": "object",
                    "properties": {"zone": {"const": "UTC"}},
                    "required": ["zone"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for stream in (False, True):
            kwargs = dict(model="model", messages=ASK, tools=TOOLS, format=schema)
            if stream:
                parts = list(tiny.ol.chat(**kwargs, stream=True, options={"num_predict": 60}))
                calls = [c for p in parts for c in (p.message.tool_calls or [])]
                content = "".join(p.message.content or "" for p in parts)
            else:
                r = tiny.ol.chat(**kwargs, options={"num_predict": 60})
                calls, content = r.message.tool_calls, r.message.content
            assert content == ""
            (call,) = calls
            assert call.function.name == "get_time" and call.function.arguments == {"zone": "UTC"}
        return
    for stream in (False, True):
        body = {
            "model": "model",
            "messages": ASK,
            "tools": TOOLS,
            "stream": stream,
            "grammar": {"regex": regex_of(SCRIPTS[tiny.family])},
            "options": {"num_predict": 200},
        }
        r = tiny.post("/api/chat", body)
        assert r.status_code == 200, r.text
        lines = [json.loads(x) for x in r.text.splitlines()]
        calls = [c for x in lines for c in x["message"].get("tool_calls", [])]
        content = "".join(x["message"]["content"] for x in lines)
        assert content.strip() == SCRIPT_CONTENT[tiny.family].strip()
        (call,) = calls
        assert call["function"]["name"] == "get_weather"
        assert call["function"]["arguments"] == {"city": "Paris", "days": 2}
        assert lines[-1]["done"] and lines[-1]["done_reason"] == "stop"


def test_a_follow_up_turn_with_the_tool_result_is_answered_from_the_cached_prefix(tiny):
    first = tiny.oa.chat.completions.create(
        model="model",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0.0,
    )
    (call,) = first.choices[0].message.tool_calls
    if tiny.family == "mistral":
        assert len(call.id) == 9 and call.id.isalnum()  # what Mistral's template requires
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = tiny.oa.chat.completions.create(
        model="model", messages=history, tools=TOOLS, max_tokens=8, temperature=0.0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # The tool definitions (and, where the template puts them first, everything up to the
    # first reply) come from the prefix cache.
    assert second.usage.prompt_tokens_details.cached_tokens > 0


THINKING = "<think>\nThe user wants Paris.\n</think>\n\nIt is sunny."


@pytest.mark.parametrize("tiny", ["qwen3"], indirect=True)  # the template that knows <think>
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_split_out_in_both_apis(tiny, stream):
    grammar = {"regex": regex_of(THINKING)}
    r = tiny.post(
        "/v1/chat/completions",
        {
            "model": "model",
            "messages": ASK,
            "max_tokens": 100,
            "stream": stream,
            "grammar": grammar,
        },
    )
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
    else:
        msg = r.json()["choices"][0]["message"]
        reasoning, content = msg["reasoning_content"], msg["content"]
    assert (reasoning, content) == ("\nThe user wants Paris.\n", "It is sunny.")
    r = tiny.post(
        "/api/chat",
        {
            "model": "model",
            "messages": ASK,
            "think": True,
            "stream": stream,
            "grammar": grammar,
            "options": {"num_predict": 100},
        },
    )
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines()]
    thinking = "".join(x["message"].get("thinking", "") for x in lines)
    content = "".join(x["message"]["content"] for x in lines)
    assert (thinking, content) == ("\nThe user wants Paris.\n", "It is sunny.")


def test_think_false_renders_the_template_with_thinking_off(tiny):
    if tiny.family != "qwen3":
        with pytest.raises(ollama.ResponseError) as e:
            tiny.ol.chat(model="model", messages=ASK, think=True, options={"num_predict": 1})
        assert "think" in str(e.value)
        return
    on = tiny.ol.chat(model="model", messages=ASK, think=True, options={"num_predict": 1})
    off = tiny.ol.chat(model="model", messages=ASK, think=False, options={"num_predict": 1})
    # Qwen3's template writes an empty <think></think> block when thinking is off.
    assert off.prompt_eval_count > on.prompt_eval_count
    r = tiny.oa.chat.completions.create(
        model="model", messages=ASK, reasoning_effort="none", max_tokens=1
    )
    assert r.usage.prompt_tokens == off.prompt_eval_count


HOSTILE = [
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
        "tools[0].function.parameters",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        "tools[0].function.name",
    ),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
            ]
        },
        "tools[0].function.parameters",
    ),
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    (
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        "tool_choice",
    ),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [*ASK, {"role": "tool", "content": "21"}]}, "messages[1].tool_call_id"),
    (
        {"messages": [*ASK, {"role": "tool", "tool_call_id": "x", "content": "21"}]},
        "messages[1].tool_call_id",
    ),
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "abcdefghi",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{oops"},
                        }
                    ],
                },
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            ]
        },
        "messages[1].tool_calls[0].id",
    ),
    (
        {"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": 3}]}]},
        "messages[1].tool_calls[0]",
    ),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    (
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "abcdefghi", "type": "code", "function": {"name": "f"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].type",
    ),
]


@pytest.mark.parametrize(("extra", "param"), HOSTILE)
def test_hostile_tool_requests_are_400_naming_the_field(tiny, extra, param):
    body = {"model": "model", "messages": ASK, "max_tokens": 4, **extra}
    r = tiny.post("/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    # Nothing was lost: the server answers the next request.
    ok = tiny.post("/v1/chat/completions", {"model": "model", "messages": ASK, "max_tokens": 2})
    assert ok.status_code == 200


def test_ollama_hostile_tool_requests_are_400(tiny):
    for extra in (
        {"tools": [{"function": {"name": "f", "parameters": []}}]},
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "not a dict"}}],
                },
            ]
        },
        {"think": "extreme"},
        {"think": 3},
    ):
        r = tiny.post("/api/chat", {"model": "model", "messages": ASK, "stream": False, **extra})
        assert r.status_code == 400, (extra, r.text)


def test_show_reports_tools_and_thinking(tiny):
    caps = tiny.ol.show("model").capabilities
    assert "tools" in caps
    assert ("thinking" in caps) == (tiny.family == "qwen3")


@pytest.mark.parametrize("tiny", ["qwen3"], indirect=True)
def test_generate_splits_thinking_too(tiny):
    body = {
        "model": "model",
        "prompt": "Where?",
        "think": True,
        "stream": False,
        "grammar": {"regex": regex_of(THINKING)},
        "options": {"num_predict": 100},
    }
    r = tiny.post("/api/generate", body).json()
    assert (r["thinking"], r["response"]) == ("\nThe user wants Paris.\n", "It is sunny.")
    r = tiny.post("/api/generate", {**body, "raw": True})
    assert r.status_code == 400 and "think" in r.json()["error"]


@pytest.mark.parametrize("tiny", ["qwen3"], indirect=True)
@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_returns_one_call(tiny, parallel):
    two = SCRIPTS["qwen3"] + "\n" + SCRIPTS["qwen3"].replace("Paris", "Rome")
    body = {
        "model": "model",
        "messages": ASK,
        "tools": TOOLS,
        "max_tokens": 200,
        "parallel_tool_calls": parallel,
        "grammar": {"regex": regex_of(two)},
    }
    calls = tiny.post("/v1/chat/completions", body).json()["choices"][0]["message"]["tool_calls"]
    cities = [json.loads(c["function"]["arguments"])["city"] for c in calls]
    assert cities == (["Paris", "Rome"] if parallel else ["Paris"])
    assert len({c["id"] for c in calls}) == len(calls)
