"""Admission (429 + Retry-After, FIFO queue), body size (413), num_predict / max_tokens caps."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from kvgrove.config import Settings
from kvgrove.http.guard import Gate, TooBusy
from kvgrove.serve import background
from tiny_models import write_decodable_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_decodable_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def limited(model):
    settings = Settings(
        port=0,
        model=str(model),
        max_concurrent_requests=1,
        max_queued_requests=1,
        retry_after_seconds=3,
        max_body_bytes=4096,
        max_predict_tokens=400,
        reply_channel_items=1,
        shutdown_grace_seconds=0.5,
    )
    with background(settings) as bg:
        yield bg


def gate_stats(bg):
    return bg.on_server(bg.runtime.actors["gate"].statistics)


async def settled(bg):
    """The gate's statistics once nothing runs or queues. The server lets go of a slot when its
    handler finishes, just after the client has read the last byte: wait for that, don't race."""
    with trio.fail_after(10):
        while True:
            stats = await trio.to_thread.run_sync(gate_stats, bg)
            if stats.running == 0 and stats.queued == 0:
                return stats
            await trio.sleep(0.02)


async def test_gate_core():
    gate = Gate(max_running=1, max_queued=1)
    gate.acquire_nowait()
    order = []

    async def waiter(name):
        await gate.acquire()
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "first")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(TooBusy):
            await gate.acquire()
        assert gate.statistics().queued == 1 and gate.statistics().rejected == 1
        gate.release()
    assert order == ["first"] and gate.statistics().running == 1
    gate.release()
    assert gate.statistics().running == 0 and gate.statistics().admitted == 2


# Long enough that the first stream still holds its slot when the next request arrives (a short
# one can finish into the socket buffers before then, reader or not).
LONG = {"model": "llama", "prompt": "hello", "options": {"temperature": 0.8, "num_predict": 400}}


async def test_beyond_the_queue_is_429_with_retry_after(limited):
    url = limited.url
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as c1,
        httpx.AsyncClient(base_url=url, timeout=60) as c2,
        httpx.AsyncClient(base_url=url, timeout=60) as c3,
    ):
        # The first stream holds the only slot while its reader does not read.
        async with c1.stream("POST", "/api/generate", json=LONG) as first:
            assert first.status_code == 200
            result = {}

            async def queued():
                r = await c2.post("/api/generate", json={**LONG, "stream": False})
                result["queued"] = r

            async with trio.open_nursery() as nursery:
                nursery.start_soon(queued)
                with trio.fail_after(10):
                    while (await trio.to_thread.run_sync(gate_stats, limited)).queued != 1:
                        await trio.sleep(0.02)
                for path in ("/api/chat", "/v1/chat/completions"):
                    r = await c3.post(path, json={"model": "llama"})
                    assert r.status_code == 429 and r.headers["retry-after"] == "3"
                    error = r.json()["error"]
                    if path.startswith("/v1/"):
                        assert error["code"] == "rate_limit_exceeded" and error["message"]
                    else:
                        assert "too many requests" in error
                # Other routes are not admission-limited.
                assert (await c3.get("/api/tags")).status_code == 200
                assert (await c3.get("/health")).status_code == 200
                lines = [line async for line in first.aiter_lines()]
                assert '"done": true' in lines[-1]
        assert result["queued"].status_code == 200 and result["queued"].json()["done"]
    stats = await settled(limited)
    assert stats.rejected >= 2


async def test_a_client_that_leaves_the_queue_frees_its_place(limited):
    async with httpx.AsyncClient(base_url=limited.url, timeout=60) as c:
        async with c.stream("POST", "/api/generate", json=LONG) as first:
            async with trio.open_nursery() as nursery:  # queued, then gone
                nursery.start_soon(partial(c.post, "/api/generate", json={**LONG, "stream": False}))
                with trio.fail_after(10):
                    while (await trio.to_thread.run_sync(gate_stats, limited)).queued != 1:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            with trio.fail_after(10):
                while (await trio.to_thread.run_sync(gate_stats, limited)).queued:
                    await trio.sleep(0.02)
            await first.aread()
        r = await c.post("/api/generate", json={**LONG, "stream": False})
        assert r.status_code == 200
    await settled(limited)


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/v1/completions", "/api/show"])
def test_bodies_over_the_limit_get_413(limited, path):
    big = {"model": "llama", "prompt": "x" * 5000}
    r = httpx.post(limited.url + path, json=big, timeout=60)
    assert r.status_code == 413
    error = r.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert "4096 bytes" in message

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"model": "llama", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(limited.url + path, content=chunks(), timeout=60)
    assert r.status_code == 413 and "error" in r.json()


def test_num_predict_over_the_cap_is_400_naming_the_field(limited):
    url = limited.url
    r = httpx.post(f"{url}/api/generate", json={**LONG, "options": {"num_predict": 401}})
    assert r.status_code == 400 and "options.num_predict must be <= 400" in r.json()["error"]
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"model": "llama", "prompt": "hi", field: 10**6}
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_until_the_limit_stops_at_the_cap(limited):
    for options in ({"num_predict": -1}, {}, {"num_predict": -2}):
        body = {**LONG, "stream": False, "options": {"temperature": 0, **options}}
        r = httpx.post(f"{limited.url}/api/generate", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["eval_count"] <= 400
    r = httpx.post(
        f"{limited.url}/v1/completions", json={"model": "llama", "prompt": "hi"}, timeout=60
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 400
