"""A server over a fake Ollama store, through the real `ollama` client: /api/tags lists the
store, a store model is served by name with its manifest's options, /api/pull answers."""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import httpx
import ollama
import pytest
import trio

from gguf_files import write_pair
from kvgrove import serve
from kvgrove.config import Settings
from kvgrove.models.loading import load
from model_stores import add_to_store
from waiting import wait_until

QWEN = "hf.co/someone/tiny-qwen3-GGUF:Q4_K_M"


def held_loader(gate: threading.Event, entered: threading.Event | None = None):
    """A loader that holds QWEN's load (reporting no progress) until `gate` is set."""

    def loader(name):
        if name == QWEN:
            if entered is not None:
                entered.set()
            assert gate.wait(60), "the test never released the load"
        return load(name)

    return loader


async def serve_in_process(nursery, settings, loader):
    """serve.serve in this trio run, ready; returns it and an Ollama client of it."""
    srv = await nursery.start(partial(serve.serve, settings, handle_signals=False, loader=loader))
    await srv.ready.wait()
    return srv, ollama.AsyncClient(host=srv.url)


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
    _, qwen2 = write_pair(root / "qwen2", "qwen2", "Q6_K", seed=3)
    add_to_store(store, "registry.ollama.ai/library/tiny-qwen2/latest", qwen2)
    broken = root / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 20)  # the magic, then nothing a reader accepts
    add_to_store(store, "registry.ollama.ai/library/broken/latest", broken)
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
    assert names[0] == "tiny-llama:latest"  # the server's own model first, then the store's
    assert sorted(names[1:]) == [
        "broken:latest",
        "hf.co/someone/tiny-qwen3-GGUF:Q4_K_M",
        "tiny-qwen2:latest",
    ]
    qwen = listed.models[names.index("hf.co/someone/tiny-qwen3-GGUF:Q4_K_M")]
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
    assert shown.parameters == "num_predict 3"
    ids = [m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]]
    assert ids[0] == "tiny-llama:latest" and "tiny-qwen2:latest" in ids


def test_pull_answers_for_what_is_here_and_refuses_what_it_cannot_fetch(server):
    client = ollama.Client(host=server.url)
    statuses = [p.status for p in client.pull("tiny-llama", stream=True)]
    assert statuses == ["pulling manifest", "success"]
    assert client.pull("hf.co/someone/tiny-qwen3-GGUF:Q4_K_M").status == "success"
    with pytest.raises(ollama.ResponseError, match=r"ollama pull llama3\.2:3b"):
        client.pull("llama3.2:3b")
    r = httpx.post(f"{server.url}/api/pull", json={}, timeout=30)
    assert r.status_code == 400 and "model is required" in r.json()["error"]


def _wait_on_server(bg, afn, seconds: float = 60):
    """Run `afn()` on the server's trio thread, with a deadline."""
    import trio

    async def run():
        with trio.fail_after(seconds):
            return await afn()

    return trio.from_thread.run(run, trio_token=bg.token)


def test_two_models_at_once_and_keep_alive_zero_unloads(server):
    client = ollama.Client(host=server.url)
    messages = [{"role": "user", "content": "hello"}]
    qwen = "hf.co/someone/tiny-qwen3-GGUF:Q4_K_M"
    first = client.chat(model=qwen, messages=messages, options={"num_predict": 4})
    assert first.model == qwen and first.eval_count == 4
    other = client.chat(model="tiny-llama", messages=messages, options={"num_predict": 4})
    assert other.eval_count == 4
    # Greedy on each model, twice: each answers from its own weights, the same each time.
    greedy = {"num_predict": 6, "temperature": 0}
    a1 = client.chat(model=qwen, messages=messages, options=greedy).message.content
    b1 = client.chat(model="tiny-llama", messages=messages, options=greedy).message.content
    a2 = client.chat(model=qwen, messages=messages, options=greedy).message.content
    b2 = client.chat(model="tiny-llama", messages=messages, options=greedy).message.content
    assert (a1, b1) == (a2, b2)
    assert a1 != b1
    ps = {m.model: m for m in client.ps().models}
    assert set(ps) == {"tiny-llama:latest", qwen}
    assert ps[qwen].size > 0 and ps[qwen].expires_at is not None

    registry = server.runtime.registry
    group = server.on_server(lambda: registry.groups[0])
    assert group.name == qwen
    client.chat(model=qwen, messages=messages, options={"num_predict": 2}, keep_alive=0)

    async def stopped():
        await group.stopped.wait()

    _wait_on_server(server, stopped)
    assert server.on_server(lambda: registry.groups) == []
    assert [m.model for m in client.ps().models] == ["tiny-llama:latest"]
    # And it loads again on the next request.
    again = client.chat(model=qwen, messages=messages, options=greedy, keep_alive="5m")
    assert again.message.content == a1
    assert server.on_server(lambda: registry.loads) == 2


def test_unknown_and_unloadable_models_are_clear_errors(server, tmp_path):
    client = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError, match="not found") as missing:
        client.chat(model="nothing-like-this", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404  # as Ollama answers it
    with pytest.raises(ollama.ResponseError, match=r"failed to load: .*version 0"):
        client.chat(model="broken", messages=[{"role": "user", "content": "x"}])
    # A file path is not a model name a request may use (no opening files of its choosing).
    path = str(server.runtime.default_loaded.info.path)
    with pytest.raises(ollama.ResponseError, match="not found"):
        client.chat(model=str(Path(path).parent), messages=[{"role": "user", "content": "x"}])
    # Another name of the server's own model (here its manifest path's full form) loads
    # nothing new.
    reply = client.chat(
        model="registry.ollama.ai/library/tiny-llama:latest",
        messages=[{"role": "user", "content": "x"}],
    )
    assert reply.done
    assert server.on_server(lambda: [g.name for g in server.runtime.registry.groups]) == [
        "hf.co/someone/tiny-qwen3-GGUF:Q4_K_M"
    ]
    # The server keeps serving.
    assert client.chat(model="tiny-llama", messages=[{"role": "user", "content": "x"}]).done


async def test_a_load_never_blocks_the_loaded_model(store, monkeypatch, tmp_path):
    """While one model's load is held open, the server's own model keeps answering; requests
    for the loading one wait and then get it."""
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    qwen = QWEN
    entered, gate = threading.Event(), threading.Event()
    # Its own cache folder: the module's `server` serves the same model and owns the default one.
    settings = Settings(
        port=0, model="tiny-llama", shutdown_grace_seconds=1.0, kv_cache_dir=str(tmp_path / "kv")
    )
    messages = [{"role": "user", "content": "hello"}]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            srv, client = await serve_in_process(nursery, settings, held_loader(gate, entered))
            replies = {}
            answered = trio.Event()

            async def ask_qwen(i):
                replies[i] = await client.chat(
                    model=qwen, messages=messages, options={"num_predict": 3}
                )
                if len(replies) == 3:
                    answered.set()

            for i in range(3):  # three first requests at once: one load
                nursery.start_soon(ask_qwen, i)
            assert await trio.to_thread.run_sync(entered.wait, 60)
            for _ in range(3):
                r = await client.chat(
                    model="tiny-llama", messages=messages, options={"num_predict": 3}
                )
                assert r.eval_count == 3
            assert [m.model for m in (await client.ps()).models] == ["tiny-llama:latest"]
            assert not replies
            gate.set()
            await answered.wait()
            assert [replies[i].eval_count for i in range(3)] == [3, 3, 3]
            assert srv.runtime.registry.loads == 1
            srv.shutdown.set()


def test_pull_streams_progress_for_a_hugging_face_repo(server, store, tmp_path, monkeypatch):
    """The network is the one thing faked: huggingface_hub.snapshot_download is replaced by one
    that lays the files into the cache and drives the progress bar it is given, as the real one
    does per file; kvgrove's progress adapter, the stream and the resolution are real."""
    import huggingface_hub

    from model_stores import fake_hf_cache

    gguf = max((store / "blobs").iterdir(), key=lambda p: p.stat().st_size)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    calls = []
    real = huggingface_hub.snapshot_download

    def fake_snapshot_download(repo, *, cache_dir, allow_patterns=None, tqdm_class=None, **kw):
        if kw.get("local_files_only"):  # cache lookups run for real
            return real(repo, cache_dir=cache_dir, **kw)
        calls.append((repo, allow_patterns, cache_dir))
        total = gguf.stat().st_size
        bar = tqdm_class(total=total, unit="B", unit_scale=True)
        for _ in range(4):
            bar.update(total // 4)
        bar.update(total - bar.n)
        bar.close()
        return str(fake_hf_cache(Path(cache_dir), repo, {"tiny.Q8_0.gguf": gguf}))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    client = ollama.Client(host=server.url)
    lines = list(client.pull("hf.co/org/tiny-GGUF:Q8_0", stream=True))
    assert lines[0].status == "pulling manifest"
    assert lines[-1].status == "success"
    progress = [p for p in lines if p.total]
    assert progress and progress[-1].completed == progress[-1].total == gguf.stat().st_size
    assert [p.completed for p in progress] == sorted(p.completed for p in progress)
    assert calls == [("org/tiny-GGUF", ["*Q8_0*.gguf", "*q8_0*.gguf"], cache)]
    # Now it is in the cache: pulling again is immediate, and it serves by that name.
    assert client.pull("hf.co/org/tiny-GGUF:Q8_0").status == "success"
    assert len(calls) == 1
    reply = client.generate(model="org/tiny-GGUF:Q8_0", prompt="hi", options={"num_predict": 2})
    assert reply.eval_count == 2


def test_least_recently_used_idle_model_unloads_to_make_room(store, monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    settings = Settings(
        port=0,
        model="tiny-llama",
        max_loaded_models=1,
        shutdown_grace_seconds=1.0,
        kv_cache_dir=str(tmp_path / "kv"),  # the module's `server` owns the default folder
    )
    messages = [{"role": "user", "content": "hello"}]
    qwen3 = "hf.co/someone/tiny-qwen3-GGUF:Q4_K_M"
    with serve.background(settings) as bg:
        client = ollama.Client(host=bg.url)
        registry = bg.runtime.registry
        assert client.chat(model=qwen3, messages=messages, options={"num_predict": 2}).done
        first = bg.on_server(lambda: registry.groups[0])
        assert client.chat(model="tiny-qwen2", messages=messages, options={"num_predict": 2}).done

        async def first_stopped():
            await first.stopped.wait()

        _wait_on_server(bg, first_stopped)
        loaded = [m.model for m in client.ps().models]
        assert loaded == ["tiny-llama:latest", "tiny-qwen2:latest"]
        assert bg.on_server(lambda: (registry.loads, registry.unloads)) == (2, 1)
        # The server's own model answered throughout and is still there.
        assert client.chat(model="tiny-llama", messages=messages, options={"num_predict": 2}).done


async def test_a_load_without_progress_times_out_and_the_server_keeps_serving(
    store, monkeypatch, tmp_path
):
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    qwen = QWEN
    gate = threading.Event()
    settings = Settings(
        port=0,
        model="tiny-llama",
        model_load_timeout_seconds=0.5,
        shutdown_grace_seconds=1.0,
        kv_cache_dir=str(tmp_path / "kv"),  # the module's `server` owns the default folder
    )
    messages = [{"role": "user", "content": "hello"}]
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            srv, client = await serve_in_process(nursery, settings, held_loader(gate))
            with pytest.raises(ollama.ResponseError, match="made no loading progress"):
                await client.chat(model=qwen, messages=messages)
            r = await client.chat(model="tiny-llama", messages=messages, options={"num_predict": 2})
            assert r.eval_count == 2
            gate.set()  # the load completes; the next request gets the model
            # The held load reports no progress, so wait for it to finish before asking again
            # (on a loaded machine it can take longer than the 0.5 s no-progress limit).
            await wait_until(
                lambda: any(g.ready.is_set() for g in srv.runtime.registry.groups),
                what="the held load to finish",
                seconds=60,
            )
            r = await client.chat(model=qwen, messages=messages, options={"num_predict": 2})
            assert r.eval_count == 2
            srv.shutdown.set()
