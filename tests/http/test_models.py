"""A server over a fake Ollama store, through the real `ollama` client: /api/tags lists the
store, a store model is served by name with its manifest's options, /api/pull answers."""

from __future__ import annotations

import httpx
import ollama
import pytest

from gguf_files import write_pair
from kvgrove import serve
from kvgrove.config import Settings
from model_stores import add_to_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = root / "ollama"
    _, llama = write_pair(root / "llama", "llama", "Q8_0", seed=1)
    _, qwen = write_pair(root / "qwen3", "qwen3", "Q4_K", seed=2)
    add_to_store(
        store,
        "registry.ollama.ai/library/tiny-llama/latest",
        llama,
        params={"num_predict": 3},
        template="{{ .Prompt }}",
    )
    add_to_store(store, "hf.co/someone/tiny-qwen3-GGUF/Q4_K_M", qwen)
    return store


@pytest.fixture(scope="module")
def server(store):
    mp = pytest.MonkeyPatch()
    mp.setenv("OLLAMA_MODELS", str(store))
    settings = Settings(port=0, model="tiny-llama", shutdown_grace_seconds=1.0)
    try:
        with serve.background(settings) as bg:
            yield bg
    finally:
        mp.undo()


def test_tags_list_the_store(server):
    listed = ollama.Client(host=server.url).list()
    names = [m.model for m in listed.models]
    assert names == ["tiny-llama:latest", "hf.co/someone/tiny-qwen3-GGUF:Q4_K_M"]
    qwen = listed.models[1]
    assert qwen.details.family == "qwen3"
    assert qwen.size > 0


def test_store_model_is_served_with_its_manifest_options(server):
    client = ollama.Client(host=server.url)
    reply = client.chat(
        model="tiny-llama", messages=[{"role": "user", "content": "hello"}], stream=False
    )
    assert reply.eval_count == 3  # the params layer's num_predict
    reply = client.chat(
        model="tiny-llama:latest",
        messages=[{"role": "user", "content": "hello"}],
        options={"num_predict": 5},
    )
    assert reply.eval_count == 5  # the request's option wins
    shown = client.show("tiny-llama")
    assert shown.template == "{{ .Prompt }}"


def test_pull_answers_for_what_is_here_and_refuses_what_it_cannot_fetch(server):
    client = ollama.Client(host=server.url)
    statuses = [p.status for p in client.pull("tiny-llama", stream=True)]
    assert statuses == ["pulling manifest", "success"]
    assert client.pull("hf.co/someone/tiny-qwen3-GGUF:Q4_K_M").status == "success"
    with pytest.raises(ollama.ResponseError, match=r"ollama pull llama3\.2:3b"):
        client.pull("llama3.2:3b")
    r = httpx.post(f"{server.url}/api/pull", json={}, timeout=30)
    assert r.status_code == 400 and "model is required" in r.json()["error"]
