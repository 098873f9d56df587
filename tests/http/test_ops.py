"""Health, memory, metrics; the load window and graceful shutdown on a tiny model."""

from __future__ import annotations

import json
import re
import threading
from functools import partial

import httpx
import pytest
import trio

from kvgrove.config import Settings
from kvgrove.models.loading import load
from kvgrove.serve import serve
from tiny_models import write_tiny_model

# Each server test as a whole, its model load and shutdown included: past it the test fails.
DEADLINE_SECONDS = 180


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


def test_health_memory_and_metrics(live_server):
    url = live_server.url
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    mem = httpx.get(f"{url}/api/memory").json()
    assert mem["weights_bytes"] > 100e6 and set(mem["cached_kv_bytes"]) == {
        "device",
        "host",
        "disk",
    }
    assert mem["mlx"]["active_bytes"] > 0 and mem["budgets_bytes"]["device"] > 0
    httpx.post(
        f"{url}/api/generate",
        json={"model": "smollm2", "prompt": "Hi", "stream": False, "options": {"num_predict": 2}},
        timeout=120,
    )
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "kvgrove_requests_total",
        'kvgrove_prompt_tokens_total{kind="computed"}',
        'kvgrove_prompt_tokens_total{kind="reused"}',
        "kvgrove_generated_tokens_total",
        "kvgrove_time_to_first_token_seconds_bucket",
        "kvgrove_inter_token_seconds_count",
        'kvgrove_memory_bytes{tier="host"}',
        'kvgrove_executor_steps{kind="overlapped"}',
        "kvgrove_mlx_thread_busy_seconds",
    ):
        assert name in text, name
    (busy,) = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kvgrove_mlx_thread_busy_seconds")
    ]
    assert busy > 0  # it ran the request's steps at least


async def test_health_is_503_while_loading_then_ok(tiny_llama):
    release = threading.Event()

    def slow_load(name):
        release.wait(30)
        return load(name)

    settings = Settings(port=0, model=tiny_llama, shutdown_grace_seconds=0.5)
    with trio.fail_after(DEADLINE_SECONDS):  # a hung start or shutdown fails the test
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve, settings, handle_signals=False, loader=slow_load)
            )
            async with httpx.AsyncClient(base_url=server.url) as c:
                r = await c.get("/health")
                assert r.status_code == 503 and r.json() == {"status": "loading"}
                r = await c.post("/api/generate", json={"model": "llama", "prompt": "x"})
                assert r.status_code == 503
                release.set()
                with trio.fail_after(30):
                    await server.ready.wait()
                r = await c.get("/health")
                assert r.status_code == 200 and r.json() == {"status": "ok"}
            server.shutdown.set()


async def test_graceful_shutdown_lets_a_stream_finish(tmp_path):
    # Its own cache folder: the session's live server owns the default one.
    settings = Settings(port=0, shutdown_grace_seconds=8, kv_cache_dir=str(tmp_path))
    with trio.fail_after(DEADLINE_SECONDS):  # a hung start or shutdown fails the test
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, settings, handle_signals=False))
            await server.ready.wait()
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                req = {"model": "smollm2", "prompt": "Hello", "options": {"num_predict": 6}}
                async with c.stream("POST", "/api/generate", json=req) as r:
                    lines = r.aiter_lines()
                    await lines.__anext__()
                    server.shutdown.set()
                    rest = [json.loads(line) async for line in lines]
                assert rest[-1]["done"] and rest[-1]["eval_count"] == 6
    # serve() returned on its own (within the grace period): the stream was let finish.


async def test_tokens_the_tokenizer_cannot_decode_end_the_stream_with_an_error(tmp_path):
    # A model whose vocabulary (4,000) is far larger than its tokenizer's (320): random weights
    # emit ids the tokenizer has no text for.
    folder = write_tiny_model(tmp_path / "wide", "llama", vocab_size=4000)
    settings = Settings(port=0, model=str(folder), shutdown_grace_seconds=0.5)
    with trio.fail_after(DEADLINE_SECONDS):  # a hung start or shutdown fails the test
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, settings, handle_signals=False))
            await server.ready.wait()
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                req = {
                    "model": "wide",
                    "prompt": "abc",
                    "raw": True,
                    "options": {"num_predict": 60},
                }
                r = await c.post("/api/generate", json=req)
                last = json.loads(r.text.splitlines()[-1])
                assert "outside the vocabulary" in last["error"]
                r = await c.get("/health")  # and the server goes on
                assert r.status_code == 200
            server.shutdown.set()


async def test_cache_check_reports_and_repairs_over_http(tiny_llama, tmp_path):
    settings = Settings(
        port=0,
        model=tiny_llama,
        device_cache_bytes=1,
        host_budget_bytes=1,
        kv_cache_dir=str(tmp_path),
        shutdown_grace_seconds=0.5,
    )
    with trio.fail_after(DEADLINE_SECONDS):  # a hung start or shutdown fails the test
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, settings, handle_signals=False))
            await server.ready.wait()
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
                req = {"model": "llama", "prompt": "a prompt long enough to cache", "raw": True}
                req |= {"stream": False, "options": {"num_predict": 2}}
                assert (await c.post("/api/generate", json=req)).status_code == 200
                # The sequence's KV is stored when the executor releases it.
                with trio.fail_after(30):
                    while not (await c.get("/api/cache")).json()["bytes"]["disk"]:
                        await trio.sleep(0.05)
                files = list(tmp_path.rglob("*.safetensors"))
                assert files
                for f in files:
                    f.unlink()
                r = await c.get("/api/cache", params={"check": "1"})
                assert r.status_code == 200
                report = r.json()["integrity"]
                assert not report["clean"] and report["repaired"] and not report["unrepaired"]
                assert (await c.get("/api/cache", params={"check": "1"})).json()["integrity"][
                    "clean"
                ]
                assert (await c.get("/health")).json() == {"status": "ok"}
                assert (await c.post("/api/generate", json=req)).status_code == 200
                text = (await c.get("/metrics")).text
                assert 'kvgrove_prefix_cache_disk_degraded{tier="disk"} 0' in text, text
            server.shutdown.set()


async def test_a_second_server_on_a_cache_folder_fails_at_start_naming_it(tiny_llama, tmp_path):
    from kvgrove.memory.ledger import Budgets
    from kvgrove.memory.prefix_cache import CacheDirBusy, PrefixCache

    fingerprint = load(tiny_llama).info.fingerprint
    owner = PrefixCache(("span",), Budgets(1, 1, 1), fingerprint=fingerprint, cache_dir=tmp_path)
    settings = Settings(port=0, model=tiny_llama, kv_cache_dir=str(tmp_path))
    try:
        with pytest.raises(BaseException) as caught:  # a trio exception group
            async with trio.open_nursery() as nursery:
                server = await nursery.start(partial(serve, settings, handle_signals=False))
                with trio.fail_after(60):
                    await server.ready.wait()
                raise AssertionError("the server started on a folder another one owns")
        where = re.escape(str(tmp_path / fingerprint))
        if isinstance(caught.value, BaseExceptionGroup):
            assert caught.group_contains(CacheDirBusy, match=where), caught.value
        else:
            assert isinstance(caught.value, CacheDirBusy) and caught.match(where)
    finally:
        owner.close()


def test_kvgrove_serve_on_an_owned_cache_folder_exits_naming_it(tiny_llama, tmp_path):
    import os
    import subprocess
    import sys

    from kvgrove.memory.ledger import Budgets
    from kvgrove.memory.prefix_cache import PrefixCache

    fingerprint = load(tiny_llama).info.fingerprint
    owner = PrefixCache(("span",), Budgets(1, 1, 1), fingerprint=fingerprint, cache_dir=tmp_path)
    try:
        cmd = [sys.executable, "-m", "kvgrove.cli", "serve", "--model", tiny_llama]
        cmd += ["--port", "0", "--kv-cache-dir", str(tmp_path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        owner.close()
    assert out.returncode == 2, out
    assert f"error: the prefix cache folder {tmp_path / fingerprint} is in use" in out.stderr
