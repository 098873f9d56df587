"""The official `openai` client against a live kvgrove."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", timeout=120)


MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_chat_completion_not_streaming(client):
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0, seed=1
    )
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens


def test_chat_completion_streaming_with_usage_matches(client):
    whole = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=MESSAGES,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason


def test_completions_streaming_and_not(client):
    whole = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert whole.choices[0].text and whole.usage.completion_tokens <= 6
    parts = list(
        client.completions.create(
            model="smollm2",
            prompt="The capital of France is",
            max_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text


def test_stop_strings(client):
    whole = client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0
    )
    text = whole.choices[0].text
    stop = text[1:3]
    cut = client.completions.create(
        model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models(client):
    (model,) = client.models.list().data
    assert model.id == "smollm2"


def test_errors_have_openai_shape(client, live_server):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, temperature=5)
    assert info.value.body["type"] == "invalid_request_error"
    assert info.value.body["param"] == "temperature"
    r = httpx.post(f"{live_server.url}/v1/chat/completions", content="{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # An unknown model is a 404 with OpenAI's code, as OpenAI answers it.
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="other", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"
    assert missing.value.body["param"] == "model"
