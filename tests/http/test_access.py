"""API keys, the open routes, cache namespaces, the bind warning, and /openapi.json."""

from __future__ import annotations

import argparse
import logging

import httpx
import ollama
import openai
import pytest

from kvgrove.config import Settings, add_serve_arguments, settings_from_args
from kvgrove.http.guard import OPEN_PATHS
from kvgrove.http.openapi import spec
from kvgrove.serve import background, is_loopback, warn_if_exposed
from tiny_models import write_decodable_llama

KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    model = write_decodable_llama(tmp_path_factory.mktemp("tiny") / "llama")
    settings = Settings(port=0, model=str(model), api_keys=KEYS, shutdown_grace_seconds=0.5)
    with background(settings) as bg:
        yield bg


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


GEN = {"model": "llama", "prompt": "hello", "stream": False, "options": {"num_predict": 2}}
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/tags", None),
        ("POST", "/api/generate", GEN),
        ("POST", "/api/chat", {"model": GEN["model"], "messages": []}),
        ("GET", "/api/memory", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"model": "llama", "prompt": "x", "max_tokens": 2}),
    ],
)
def test_routes_need_a_valid_key(keyed, method, path, body):
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic a2V5LW9uZQ=="}):
        r = httpx.request(method, keyed.url + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        if path.startswith("/v1/"):
            assert error["code"] == "invalid_api_key" and error["type"] and error["message"]
        else:
            assert isinstance(error, str) and "API key" in error
    for key in KEYS:
        r = httpx.request(method, keyed.url + path, json=body, headers=bearer(key), timeout=60)
        assert r.status_code == 200, (path, key, r.text)


def test_open_routes_need_no_key(keyed):
    assert {"/health", "/", "/openapi.json"} == OPEN_PATHS
    assert httpx.get(f"{keyed.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{keyed.url}/").status_code == 200
    assert httpx.head(f"{keyed.url}/").status_code == 200
    assert httpx.get(f"{keyed.url}/openapi.json").json()["openapi"].startswith("3.")


def test_official_clients_send_the_key(keyed):
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=KEYS[1], timeout=60)
    r = client.completions.create(model="llama", prompt="hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope").models.list()
    oc = ollama.Client(host=keyed.url, headers=bearer(KEYS[0]))
    assert oc.generate(model="llama", prompt="hello", options={"num_predict": 2}).done
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed.url).list()
    assert e.value.status_code == 401


def cached_tokens(url: str, path: str, prompt: str, key: str, salt: str | None) -> int:
    """Prompt tokens the request found in the prefix cache (raw prompts: the same ids on both
    APIs)."""
    salted = {"cache_salt": salt} if salt else {}
    if path == "/api/generate":
        body = {"model": "llama", "prompt": prompt, "raw": True, "stream": False}
        body["options"] = {"num_predict": 1}
    else:
        body = {"model": "llama", "prompt": prompt, "max_tokens": 1}
    r = httpx.post(url + path, json={**body, **salted}, headers=bearer(key), timeout=120)
    assert r.status_code == 200, r.text
    if path == "/api/generate":
        return r.json()["prompt_cache_count"]
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_each_key_and_salt_gets_its_own_namespace(keyed):
    """Cached prompts are shared within one (key, cache_salt) and with no other: a prompt one
    namespace cached is computed afresh in each other, and found again in its own, by either
    API."""
    prompt = "namespaces are kept apart " * 4
    for key, salt in ((KEYS[0], None), (KEYS[1], None), (KEYS[0], "s"), (KEYS[1], "s")):
        assert cached_tokens(keyed.url, "/api/generate", prompt, key, salt) == 0, (key, salt)
        assert cached_tokens(keyed.url, "/v1/completions", prompt, key, salt) > 0, (key, salt)
    r = httpx.post(
        f"{keyed.url}/api/generate", json={**GEN, "cache_salt": 5}, headers=bearer(KEYS[0])
    )
    assert r.status_code == 400 and "cache_salt" in r.json()["error"]


def test_without_keys_only_cache_salt_makes_a_namespace(live_server):
    url, prompt = live_server.url, "Only a cache salt sets a namespace apart here. " * 2
    body = {"model": "smollm2", "prompt": prompt, "raw": True, "stream": False}
    body["options"] = {"num_predict": 1}

    def cached(bearer_key: str, **extra) -> int:
        r = httpx.post(  # no keys configured: any bearer is accepted
            f"{url}/api/generate", json={**body, **extra}, headers=bearer(bearer_key), timeout=120
        )
        assert r.status_code == 200, r.text
        return r.json()["prompt_cache_count"]

    assert cached("anything") == 0
    assert cached("something else") > 0  # the bearer makes no namespace: the shared one
    assert cached("anything", cache_salt="a") == 0
    assert cached("anything", cache_salt="b") == 0
    assert cached("anything", cache_salt="a") > 0


def test_keys_from_flags_and_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    monkeypatch.setenv("KVGROVE_API_KEYS", "a, b c")
    assert settings_from_args(parser.parse_args([])).api_keys == ("a", "b", "c")
    args = parser.parse_args(["--api-key", "sekrit-1", "--api-key", "sekrit-2"])
    assert settings_from_args(args).api_keys == ("sekrit-1", "sekrit-2")
    assert "sekrit" not in repr(settings_from_args(args))  # keys stay out of logs


def test_bind_warning(caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with caplog.at_level(logging.WARNING, logger="kvgrove.serve"):
        assert not warn_if_exposed(Settings())
        assert not warn_if_exposed(Settings(host="0.0.0.0", api_keys=("k",)))
        assert warn_if_exposed(Settings(host="0.0.0.0"))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "no API keys" in caplog.records[0].getMessage()


def test_openapi_matches_the_route_table(keyed):
    app_routes: dict[str, set[str]] = {}
    # The route table is read from a fresh app: the same blueprints the server registers.
    from kvgrove.actors.api import Runtime
    from kvgrove.http.app import create_app

    app = create_app(Runtime(Settings()))
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = {m.lower() for m in rule.methods} - {"options"}
        if "get" in methods and rule.rule != "/":
            methods.discard("head")  # implied by GET
        app_routes.setdefault(rule.rule, set()).update(methods)
    described = {path: set(ops) for path, ops in spec()["paths"].items()}
    assert described == app_routes
    served = httpx.get(f"{keyed.url}/openapi.json").json()
    assert served == spec()
    for path, ops in served["paths"].items():
        for op in ops.values():
            assert "200" in op["responses"], path
            if op.get("security") == []:
                assert path in OPEN_PATHS


def test_a_second_key_gets_no_cached_tokens_from_the_first_keys_prompt(keyed):
    """The timing side channel vLLM closed with cache_salt: tenants never share cached KV."""
    prompt = "A long shared document about tides, moons and harbours. " * 6

    def cached(key: str, salt: str | None = None) -> int:
        body = {
            "model": "llama",
            "prompt": prompt,
            "max_tokens": 2,
            "temperature": 0,
            **({"cache_salt": salt} if salt else {}),
        }
        r = httpx.post(f"{keyed.url}/v1/completions", json=body, headers=bearer(key), timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert cached(KEYS[0]) == 0
    assert cached(KEYS[0]) > 0  # the same tenant hits its own cache
    assert cached(KEYS[1]) == 0  # another key: nothing from the first key's prompt
    assert cached(KEYS[0], salt="fresh") == 0  # a new salt is a new namespace too
    assert cached(KEYS[1]) > 0
