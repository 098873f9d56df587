"""The official `ollama` client (and raw HTTP for the edges) against a live kvgrove."""

from __future__ import annotations

import json
import re

import httpx
import ollama
import pytest

GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def client(live_server) -> ollama.Client:
    return ollama.Client(host=live_server.url, timeout=120)


def test_generate_not_streaming_and_streaming_agree(client):
    whole = client.generate(model="smollm2", prompt="Name a colour.", options=GREEDY)
    assert whole.done and whole.done_reason == "length"
    assert whole.eval_count == 8 and whole.prompt_eval_count > 5
    assert whole.total_duration > whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    parts = list(
        client.generate(model="smollm2", prompt="Name a colour.", options=GREEDY, stream=True)
    )
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == whole.response
    assert whole.response.strip()


def test_chat_not_streaming_and_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat(model="smollm2", messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content
    parts = list(client.chat(model="smollm2", messages=messages, options=GREEDY, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == whole.done_reason


def test_list_show_ps_version(client, live_server):
    (model,) = client.list().models
    assert model.model.startswith("smollm2") and model.size > 0
    shown = client.show("smollm2")
    assert shown.details.family == "llama" and "im_start" in shown.template
    (running,) = client.ps().models
    assert running.model.startswith("smollm2")
    assert httpx.get(f"{live_server.url}/api/version").json()["version"]
    assert httpx.head(f"{live_server.url}/").status_code == 200
    assert httpx.get(f"{live_server.url}/").text == "Ollama is running"


def test_stop_string_is_honoured_and_not_emitted(client):
    base = client.generate(model="smollm2", prompt="Count: 1, 2, 3,", raw=True, options=GREEDY)
    text = base.response
    assert len(text) > 4
    stop = text[2:4]  # cut inside the output, likely across a token boundary
    cut = client.generate(
        model="smollm2", prompt="Count: 1, 2, 3,", raw=True, options={**GREEDY, "stop": [stop]}
    )
    assert cut.done_reason == "stop"
    assert cut.response == text[: text.index(stop)]
    streamed = client.generate(
        model="smollm2",
        prompt="Count: 1, 2, 3,",
        raw=True,
        options={**GREEDY, "stop": [stop]},
        stream=True,
    )
    assert "".join(p.response for p in streamed) == cut.response


def test_context_limit_stops_with_length(client):
    prompt = "Tell me a story."
    n = client.generate(model="smollm2", prompt=prompt, options={**GREEDY, "num_predict": 1})
    limit = n.prompt_eval_count + 3
    r = client.generate(
        model="smollm2", prompt=prompt, options={"temperature": 0, "num_ctx": limit}
    )
    assert r.done_reason == "length" and r.eval_count == 3


def test_over_long_prompt_is_400_with_the_exact_message(live_server):
    r = httpx.post(
        f"{live_server.url}/api/generate",
        json={"model": "smollm2", "prompt": "word " * 50, "raw": True, "options": {"num_ctx": 10}},
    )
    assert r.status_code == 400
    assert re.fullmatch(
        r"input length \(\d+ tokens\) exceeds the model's maximum context length \(10 tokens\)",
        r.json()["error"],
    )


def test_load_only_call(live_server):
    r = httpx.post(f"{live_server.url}/api/generate", json={"model": "smollm2"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load"


@pytest.mark.parametrize(
    "body, field",
    [
        ('{"model": "smollm2", "prompt": ', "JSON"),
        ({"model": "smollm2", "prompt": 5}, "prompt"),
        ({"model": "smollm2", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "smollm2", "prompt": "x", "options": {"temperature": -1}}, "temperature"),
        ({"model": "smollm2", "prompt": "x", "options": {"top_k": "many"}}, "options.top_k"),
        ({"model": "smollm2", "prompt": "x", "options": {"num_predict": -5}}, "num_predict"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_bad_requests_are_400_naming_the_field(live_server, body, field):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{live_server.url}/api/generate", content=content)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


def test_an_unknown_model_is_404_as_in_ollama(live_server):
    r = httpx.post(f"{live_server.url}/api/generate", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404, r.text
    assert "model 'nope' not found" in r.json()["error"]


def test_chat_with_bad_messages_is_400(live_server):
    r = httpx.post(
        f"{live_server.url}/api/chat",
        json={"model": "smollm2", "messages": [{"role": "user", "content": 3}]},
    )
    assert r.status_code == 400 and "messages[0].content" in r.json()["error"]


def test_client_errors_surface_as_response_errors(client):
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="missing-model", prompt="hi")
    assert "missing-model" in str(info.value)
