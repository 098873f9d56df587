"""Validation as the APIs define it, through the real `ollama` and `openai` clients (raw HTTP
where a client refuses to send the request): chat roles, images on a model without vision,
keep_alive as Ollama parses it, and every request field honoured or rejected naming it."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from kvgrove.http import fields
from kvgrove.http.common import BadRequest

TINY_PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/"
    "PchI7wAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def oc(live_server) -> ollama.Client:
    return ollama.Client(host=live_server.url, timeout=120)


@pytest.fixture(scope="module")
def ai(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", timeout=120)


def ollama_400(call) -> str:
    with pytest.raises(ollama.ResponseError) as e:
        call()
    assert e.value.status_code == 400
    return e.value.error


def openai_400(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    return e.value.body


SHORT = {"num_predict": 2, "temperature": 0}


# -- roles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["system", "user", "assistant", "tool"])
def test_ollama_roles_are_accepted(oc, role):
    messages = [{"role": role, "content": "hi"}, {"role": "user", "content": "Say hi."}]
    assert oc.chat(model="smollm2", messages=messages, options=SHORT).done


def test_ollama_unknown_role_is_400(oc):
    error = ollama_400(
        lambda: oc.chat(model="smollm2", messages=[{"role": "hacker", "content": "x"}])
    )
    assert "messages[0].role" in error and "'hacker'" in error
    # OpenAI's developer role is not Ollama's.
    error = ollama_400(
        lambda: oc.chat(model="smollm2", messages=[{"role": "developer", "content": "x"}])
    )
    assert "messages[0].role" in error


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_openai_roles_are_accepted(ai, role):
    messages = [{"role": role, "content": "hi"}, {"role": "user", "content": "Say hi."}]
    if role == "tool":  # a tool message answers an earlier call (OpenAI requires its id)
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        messages = [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "hi"},
            messages[1],
        ]
    r = ai.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    assert r.choices[0].message.content is not None


def test_openai_unknown_role_is_400(ai):
    body = openai_400(
        lambda: ai.chat.completions.create(
            model="smollm2", messages=[{"role": "hacker", "content": "x"}], max_tokens=2
        )
    )
    assert body["param"] == "messages[0].role" and "hacker" in body["message"]


# -- images ------------------------------------------------------------------------------------


def test_ollama_images_on_a_model_without_vision_are_400(oc):
    error = ollama_400(
        lambda: oc.generate(model="smollm2", prompt="what is this?", images=[TINY_PNG])
    )
    assert "images" in error and "no vision" in error
    messages = [{"role": "user", "content": "what is this?", "images": [TINY_PNG]}]
    error = ollama_400(lambda: oc.chat(model="smollm2", messages=messages))
    assert "messages[0].images" in error and "no vision" in error


def test_openai_image_parts_on_a_model_without_vision_are_400(ai):
    part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{TINY_PNG}"}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what?"}, part]}]
    body = openai_400(
        lambda: ai.chat.completions.create(model="smollm2", messages=messages, max_tokens=2)
    )
    assert "no vision" in body["message"]


# -- keep_alive --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("300ms", 0.3),
        ("1.5h", 5400),
        ("2h45m30.5s", 9930.5),
        ("0", 0),
        ("+10s", 10),
        (".5s", 0.5),
        ("1µs", 1e-6),
    ],
)
def test_go_durations(text, seconds):
    assert fields.parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "forever-ish", "1d", "m", "1h-5m", ".s", "5 m", "1e3s"])
def test_go_duration_garbage(text):
    with pytest.raises(ValueError):
        fields.parse_go_duration(text)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10m", 600), (30, 30), (2.9, 2), (0, 0), (-1, math.inf), ("-1m", math.inf), (-0.5, math.inf)],
)
def test_keep_alive_as_ollama_reads_it(value, seconds):
    assert fields.keep_alive_seconds({"keep_alive": value}) == seconds


@pytest.mark.parametrize("value", ["5m", "1h30m", 30, -1, "-1s", 0])
def test_keep_alive_accepted_by_the_server(oc, value):
    r = oc.generate(model="smollm2", prompt="hi", keep_alive=value, options=SHORT)
    assert r.done


@pytest.mark.parametrize("value", ["forever-ish", "5", True, [1], {"m": 5}])
def test_keep_alive_garbage_is_400(live_server, value):
    for path in ("/api/generate", "/api/chat"):
        body = {"model": "smollm2", "prompt": "hi", "keep_alive": value}
        if path == "/api/chat":
            body = {"model": "smollm2", "messages": [], "keep_alive": value}
        r = httpx.post(live_server.url + path, json=body, timeout=60)
        assert r.status_code == 400 and "keep_alive" in r.json()["error"]
    # The ollama client sends the string as it is.
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=live_server.url).generate(
            model="smollm2", prompt="hi", keep_alive="forever-ish"
        )
    assert e.value.status_code == 400


# -- every field honoured or rejected ----------------------------------------------------------


def test_unknown_fields_are_400_naming_them(live_server):
    url = live_server.url
    cases = [
        ("/api/generate", {"model": "smollm2", "prompt": "hi", "bogus": 1}, "bogus"),
        ("/api/chat", {"model": "smollm2", "messages": [], "bogus": 1}, "bogus"),
        (
            "/api/generate",
            {"model": "smollm2", "prompt": "hi", "options": {"bogus": 1}},
            "options.bogus",
        ),
        (
            "/api/chat",
            {"model": "smollm2", "messages": [{"role": "user", "content": "x", "bogus": 1}]},
            "messages[0].bogus",
        ),
        ("/v1/completions", {"model": "smollm2", "prompt": "hi", "bogus": 1}, "bogus"),
        (
            "/v1/chat/completions",
            {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "bogus": 1},
            "bogus",
        ),
    ]
    for path, body, name in cases:
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400, (path, body)
        error = r.json()["error"]
        if path.startswith("/v1/"):
            assert error["param"] == name
        else:
            assert repr(name) in error


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ],
)
def test_openai_unimplemented_fields_are_400_naming_them(ai, kwargs, param):
    messages = [{"role": "user", "content": "hi"}]
    body = openai_400(
        lambda: ai.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=2, **kwargs
        )
    )
    assert body["param"] == param


def test_openai_neutral_values_and_ignored_fields_are_accepted(ai):
    messages = [{"role": "user", "content": "hi", "name": "ann"}]
    r = ai.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=2,
        logit_bias={},
        store=False,
        user="u1",
        metadata={"k": "v"},
        n=1,
    )
    assert r.choices
    body = openai_400(
        lambda: ai.completions.create(model="smollm2", prompt="hi", max_tokens=2, echo=True)
    )
    assert body["param"] == "echo"
    r = ai.completions.create(model="smollm2", prompt="hi", max_tokens=2, best_of=1, user="u")
    assert r.choices


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"template": "{{ .Prompt }}"}, "template"),
        ({"context": [1, 2, 3]}, "context"),
        ({"options": {"mirostat": 2}}, "options.mirostat"),
        ({"options": {"tfs_z": 0.5}}, "options.tfs_z"),
        ({"options": {"typical_p": 0.5}}, "options.typical_p"),
    ],
)
def test_ollama_unimplemented_fields_are_400_naming_them(oc, kwargs, name):
    error = ollama_400(lambda: oc.generate(model="smollm2", prompt="hi", **kwargs))
    assert name in error


def test_ollama_ignored_options_are_accepted(oc):
    options = {**SHORT, "num_thread": 2, "num_gpu": 1, "use_mmap": True, "num_keep": 4}
    assert oc.generate(model="smollm2", prompt="hi", options=options).done


def test_thinking_the_model_cannot_do_is_400_naming_the_field(oc, ai):
    """The bundled model's template knows no thinking: asking for it is a 400 naming the
    field, never free text passed off as reasoning; tools are supported (tests/http/
    test_tools.py) and their empty forms accepted."""
    hi = [{"role": "user", "content": "hi"}]
    assert "think" in ollama_400(lambda: oc.chat(model="smollm2", messages=hi, think=True))
    body = openai_400(
        lambda: ai.chat.completions.create(model="smollm2", messages=hi, reasoning_effort="high")
    )
    assert "reasoning_effort" in str(body)
    assert oc.chat(model="smollm2", messages=hi, options=SHORT).done  # tools=[] by the client
    assert oc.chat(model="smollm2", messages=hi, think=False, options=SHORT).done
    for table in (fields.OLLAMA_GENERATE, fields.OLLAMA_CHAT, fields.OPENAI_CHAT):
        names = ("format", "response_format", "logprobs", "grammar", "tools", "think")
        supported = [k for k in names if k in table]
        assert supported and all(table[k][0] == fields.SUPPORTED for k in supported)
    with pytest.raises(BadRequest):
        fields.check_fields({"logit_bias": {"1": 1}}, fields.OPENAI_CHAT)


def test_the_readme_table_is_the_code_table():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    begin, end = "<!-- fields:begin -->\n", "<!-- fields:end -->"
    assert readme[readme.index(begin) + len(begin) : readme.index(end)] == fields.markdown_table()
