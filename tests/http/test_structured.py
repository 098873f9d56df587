"""Structured output through the real `ollama` and `openai` clients against a live kvgrove."""

from __future__ import annotations

import json
import re

import httpx
import pytest

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}


def valid(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"name", "age", "admin"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 150
        and isinstance(value["admin"], bool)
    )


PROMPT = [{"role": "user", "content": "Describe a user as JSON."}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_openai_json_schema_is_valid(oa, temperature):
    for seed in range(2):
        r = oa.chat.completions.create(
            model="smollm2",
            messages=PROMPT,
            max_tokens=80,
            temperature=temperature,
            seed=seed,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "user", "schema": SCHEMA, "strict": True},
            },
        )
        (choice,) = r.choices
        assert choice.finish_reason == "stop", choice
        assert valid(choice.message.content), choice.message.content


def test_openai_json_object_streamed(oa):
    chunks = oa.chat.completions.create(
        model="smollm2",
        messages=PROMPT,
        max_tokens=80,
        temperature=1.0,
        seed=3,
        stream=True,
        response_format={"type": "json_object"},
    )
    parts, finish = [], None
    for chunk in chunks:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    text = "".join(parts)
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # the token limit hit first: reported as such, never as complete
        assert finish == "length" and text.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ollama_format_schema_chat_and_generate(ol, stream, temperature):
    opts = {"temperature": temperature, "seed": 7, "num_predict": 80}
    if stream:
        parts = list(ol.chat("smollm2", messages=PROMPT, format=SCHEMA, options=opts, stream=True))
        text = "".join(p.message.content for p in parts)
        assert parts[-1].done_reason == "stop"
    else:
        r = ol.chat("smollm2", messages=PROMPT, format=SCHEMA, options=opts)
        text = r.message.content
        assert r.done_reason == "stop"
    assert valid(text), text
    g = ol.generate("smollm2", prompt="A user as JSON:", format=SCHEMA, options=opts)
    assert g.done_reason == "stop" and valid(g.response), g.response


def test_ollama_format_json_and_length(ol):
    r = ol.generate("smollm2", prompt="JSON please", format="json", options={"num_predict": 3})
    # Three tokens cannot close a JSON object under this model: "length", not "stop".
    if r.done_reason == "stop":
        assert isinstance(json.loads(r.response), dict)
    else:
        assert r.done_reason == "length" and r.response.startswith("{")


def test_extension_grammar_regex_and_lark(live_server):
    body = {"model": "smollm2", "prompt": "Pick:", "stream": False, "options": {"temperature": 1}}
    r = httpx.post(
        f"{live_server.url}/api/generate",
        json={**body, "grammar": {"regex": "(red|green|blue) [0-9]{2}"}},
        timeout=120,
    )
    assert r.status_code == 200 and re.fullmatch("(red|green|blue) [0-9]{2}", r.json()["response"])
    r = httpx.post(
        f"{live_server.url}/v1/completions",
        json={"model": "smollm2", "prompt": "Answer:", "grammar": {"lark": 'start: "yes" | "no"'}},
        timeout=120,
    )
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize(
    ("path", "body", "field", "why"),
    [
        ("/api/chat", {"format": "yaml"}, "format", "json"),
        ("/api/chat", {"format": {"type": "no-such-type"}}, "format", "no-such-type"),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "xml"}},
            "response_format.type",
            "xml",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
            "response_format.json_schema.schema",
            "object",
        ),
        ("/api/generate", {"grammar": {"lark": "start: missing"}}, "grammar", "missing"),
    ],
)
def test_rejected_grammars_are_400_naming_why(live_server, path, body, field, why):
    base = {"model": "smollm2", "stream": False}
    if path == "/api/generate":
        base["prompt"] = "hi"
    else:
        base["messages"] = PROMPT
    r = httpx.post(f"{live_server.url}{path}", json={**base, **body}, timeout=60)
    assert r.status_code == 400, r.text
    text = r.text
    assert field in text and why in text, text
    # The server keeps serving.
    ok = httpx.post(
        f"{live_server.url}/api/generate",
        json={"model": "smollm2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
        timeout=60,
    )
    assert ok.status_code == 200
