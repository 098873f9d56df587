"""Hostile input against both APIs, property-based (hypothesis), through a live tiny server.

Bodies start from a valid request for each route (field names from /openapi.json's schemas)
and are mutated: fields set to values of the wrong type, huge or negative numbers, NaN, deep
nesting, unknown fields, fields deleted; raw bodies add invalid UTF-8, truncated JSON, number
literals past the parser's digit limit and bodies over the size limit. Every answer must come
promptly, with a JSON error body whenever it is an error (never a 500 without one), streams
must parse line by line, and the server must still be healthy at the end.

Bounded: ~300 cases in all, derandomized, a few tens of seconds.
"""

from __future__ import annotations

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgrove.config import Settings
from kvgrove.http.openapi import SCHEMAS
from kvgrove.serve import background
from tiny_models import write_decodable_llama

BODY_LIMIT = 16 * 1024
TALLY: Counter = Counter()

VALID = {
    "/api/generate": (
        "GenerateRequest",
        {"model": "llama", "prompt": "hello", "options": {"num_predict": 3}},
    ),
    "/api/chat": (
        "ChatRequest",
        {
            "model": "llama",
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"num_predict": 3},
        },
    ),
    "/api/show": ("ShowRequest", {"model": "llama"}),
    "/v1/chat/completions": (
        "ChatCompletionRequest",
        {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    ),
    "/v1/completions": ("CompletionRequest", {"model": "llama", "prompt": "hi", "max_tokens": 3}),
}


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    model = write_decodable_llama(tmp_path_factory.mktemp("tiny") / "llama")
    config = Settings(
        port=0,
        model=str(model),
        max_body_bytes=BODY_LIMIT,
        max_predict_tokens=4,
        max_context_tokens=256,
        shutdown_grace_seconds=0.5,
    )
    with background(config) as bg:
        with httpx.Client(base_url=bg.url, timeout=30) as client:
            yield client
        print(f"\nfuzz: {sum(TALLY.values())} cases; by status: {dict(sorted(TALLY.items()))}")
        assert httpx.get(f"{bg.url}/health").json() == {"status": "ok"}


def field_names(schema_name: str) -> list[str]:
    props = SCHEMAS[schema_name]["properties"]
    return sorted(props)


OPTION_NAMES = sorted(SCHEMAS["GenerateRequest"]["properties"]["options"]["properties"])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, -2, 1, 2**31, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, 1.5]),
    st.text(max_size=20),
    st.sampled_from(["", "llama", "smollm2", "\x00", "\u202e", "🦙" * 5]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


def nested(depth: int) -> object:
    value: object = "x"
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


@st.composite
def mutated_bodies(draw):
    path = draw(st.sampled_from(sorted(VALID)))
    schema, valid = VALID[path]
    body = json.loads(json.dumps(valid))
    names = [*field_names(schema), "unknown_field", "options", "messages", "stream"]
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "set", "option", "delete", "deep", "message"]))
        if action == "set":
            body[draw(st.sampled_from(names))] = draw(json_values)
        elif action == "option":
            options = body.setdefault("options", {})
            if isinstance(options, dict):
                options[draw(st.sampled_from([*OPTION_NAMES, "mystery"]))] = draw(json_values)
        elif action == "delete" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif action == "deep":
            body[draw(st.sampled_from(names))] = nested(draw(st.integers(30, 200)))
        elif action == "message":
            body["messages"] = [
                draw(
                    st.one_of(
                        json_values,
                        st.fixed_dictionaries({"role": json_values, "content": json_values}),
                    )
                )
            ]
    if draw(st.booleans()):
        body["stream"] = draw(st.booleans())
    return path, body


def check(r: httpx.Response, text: str) -> None:
    """The contract every answer keeps."""
    TALLY[r.status_code] += 1
    if r.status_code == 404:  # only for a model this server does not serve, as Ollama answers
        assert "not found (this server serves" in text, text[:200]
    if r.status_code >= 400:
        body = json.loads(text)  # an error always has a JSON body
        assert "error" in body, text[:200]
        assert r.status_code < 500, f"server error: {text[:300]}"
        return
    ctype = r.headers.get("content-type", "")
    if "ndjson" in ctype:
        for line in text.splitlines():
            json.loads(line)
    elif "event-stream" in ctype:
        events = [e for e in text.split("\n\n") if e]
        assert events and events[-1] == "data: [DONE]", text[-200:]
        for event in events[:-1]:
            json.loads(event.removeprefix("data: "))
    else:
        json.loads(text)


def send(client: httpx.Client, path: str, **kwargs) -> None:
    with client.stream("POST", path, **kwargs) as r:
        text = r.read().decode("utf-8")
    check(r, text)


FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(case=mutated_bodies())
def test_mutated_json_bodies(fuzz_server, case):
    path, body = case
    payload = json.dumps(body, allow_nan=True).encode()
    send(fuzz_server, path, content=payload, headers={"content-type": "application/json"})


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda b: b'{"model": "llama", "prompt": "' + b + b'"}', st.binary(max_size=16)),
    st.integers(1, 40).map(lambda n: b'{"model": "llama", "prompt": "\\ud800' * 1 + b'x"}' * n),
    st.integers(100, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(100, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4300, 6000).map(lambda n: b'{"model": "llama", "max_tokens": ' + b"9" * n + b"}"),
    st.sampled_from([b"null", b"[]", b'"x"', b"1", b"NaN", b"{}", b" ", b"{", b"\x00"]),
    st.integers(BODY_LIMIT - 64, BODY_LIMIT * 4).map(
        lambda n: b'{"model": "llama", "prompt": "' + b"a" * n + b'"}'
    ),
)


@settings(FUZZ, max_examples=100)
@given(path=st.sampled_from(sorted(VALID)), raw=raw_bodies)
def test_raw_bodies(fuzz_server, path, raw):
    send(fuzz_server, path, content=raw)


def test_special_cases_seen_by_the_fuzzer(fuzz_server):
    """Failures the fuzzer found once, kept as plain regression cases."""
    cases = [
        ("/api/generate", b'{"model": "llama", "prompt": "\\ud800"}', 400),
        ("/api/generate", b'{"model": "llama", "prompt": "hi", "raw": true, "options": 5}', 400),
        (
            "/v1/completions",
            b'{"model": "llama", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
            400,
        ),
        ("/api/chat", b"[" * 10_000, 400),
        ("/api/generate", b'{"model": "llama", "prompt": "x", "options": {"seed": 1e300}}', 400),
    ]
    for path, raw, status in cases:
        r = fuzz_server.post(path, content=raw)
        assert r.status_code == status and "error" in r.json(), (path, r.text[:200])
