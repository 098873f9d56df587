"""Names that resolve through a fake Ollama store and a fake Hugging Face cache in temp folders."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from gguf_files import write_pair
from kvgrove.models import hf_hub, loading, ollama_store
from model_stores import add_to_store, fake_hf_cache


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    return {arch: write_pair(root / arch, arch, "Q8_0") for arch in ("llama", "qwen3")}


@pytest.fixture
def store(tmp_path, monkeypatch, pairs):
    store = tmp_path / "ollama"
    add_to_store(
        store,
        "registry.ollama.ai/library/tiny-llama/latest",
        pairs["llama"][1],
        params={"temperature": 0.2, "stop": ["<|im_end|>"]},
        template="{{ .Prompt }}",
    )
    add_to_store(store, "hf.co/someone/tiny-qwen3-GGUF/Q8_0", pairs["qwen3"][1])
    # Not loadable: a manifest whose model blob is missing, and a stray non-manifest.
    (store / "manifests/registry.ollama.ai/library/broken").mkdir(parents=True)
    (store / "manifests/registry.ollama.ai/library/broken/latest").write_text(
        json.dumps(
            {
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": "sha256:00",
                        "size": 1,
                    }
                ]
            }
        )
    )
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    return store


def test_names_split_like_ollamas():
    assert ollama_store.split_name("llama3.2") == (
        "registry.ollama.ai",
        "library",
        "llama3.2",
        "latest",
    )
    assert ollama_store.split_name("llama3.2:3b") == (
        "registry.ollama.ai",
        "library",
        "llama3.2",
        "3b",
    )
    assert ollama_store.split_name("me/model:q4") == ("registry.ollama.ai", "me", "model", "q4")
    assert ollama_store.split_name("hf.co/org/repo:Q4_K_M") == ("hf.co", "org", "repo", "Q4_K_M")


def test_store_lists_and_resolves_by_name(store, pairs):
    names = [m.name for m in ollama_store.list_models()]
    assert names == ["hf.co/someone/tiny-qwen3-GGUF:Q8_0", "tiny-llama:latest"]
    m = ollama_store.lookup("tiny-llama")
    assert m == ollama_store.lookup("tiny-llama:latest")
    assert m.gguf.read_bytes() == pairs["llama"][1].read_bytes()
    assert m.params == {"temperature": 0.2, "stop": ["<|im_end|>"]}
    assert m.template == "{{ .Prompt }}"
    assert m.size > m.gguf.stat().st_size
    assert ollama_store.lookup("broken") is None
    assert ollama_store.lookup("nothing:here") is None
    assert ollama_store.lookup("../../etc/passwd") is None


def test_store_models_load_through_their_blobs(store, pairs):
    lm = loading.load("tiny-llama")
    assert lm.info.name == "tiny-llama:latest"
    assert lm.info.origin == "ollama"
    assert lm.info.source_format == "gguf"
    assert lm.info.params["temperature"] == 0.2
    assert lm.info.template == "{{ .Prompt }}"
    lm2 = loading.load("hf.co/someone/tiny-qwen3-GGUF:Q8_0")
    assert lm2.info.architecture == "qwen3"
    ref = loading.load(pairs["qwen3"][0])
    ids = ref.tokenizer.encode("hello world")
    diff = mx.abs(ref.model(mx.array([ids])) - lm2.model(mx.array([ids]))).max()
    assert float(diff) < 1e-3


def test_unknown_name_says_where_it_looked(store):
    with pytest.raises(FileNotFoundError, match="Ollama's store"):
        loading.load("no-such-model:7b")


def test_hf_cache_resolves_offline(tmp_path, monkeypatch, pairs):
    cache = tmp_path / "hub"
    folder, gguf = pairs["llama"]
    fake_hf_cache(cache, "org/tiny-llama", {p.name: p for p in folder.iterdir()})
    fake_hf_cache(
        cache,
        "org/tiny-GGUF",
        {"tiny.Q8_0.gguf": gguf, "tiny.F16.gguf": gguf},
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = hf_hub.lookup("org/tiny-llama")
    assert found is not None and (found / "config.json").is_file()
    assert hf_hub.lookup("org/tiny-GGUF:q8_0").name == "tiny.Q8_0.gguf"
    assert hf_hub.lookup("org/tiny-GGUF") is None  # two candidates: the name must pick one
    assert hf_hub.lookup("org/absent") is None
    lm = loading.load("org/tiny-llama")
    assert lm.info.origin == "huggingface"
    assert lm.info.source_format == "hf"
    assert loading.load("org/tiny-GGUF:Q8_0").info.source_format == "gguf"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub is the same folder
    assert hf_hub.lookup("org/tiny-llama") == found


def test_pull_rejects_what_is_not_a_repo():
    with pytest.raises(ValueError, match="not a Hugging Face repo name"):
        hf_hub.pull("just-a-name")
