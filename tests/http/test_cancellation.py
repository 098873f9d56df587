"""Clients that go away or stop reading, against the live server."""

from __future__ import annotations

import json
import random

import httpx
import trio

PROMPT_SHORT = "Write a sentence about the sea."
PROMPT_LONG = "Summarize the following notes. " + "The tide comes in and goes out. " * 90


def body(prompt: str, n: int = 6) -> dict:
    return {
        "model": "smollm2",
        "prompt": prompt,
        "options": {"temperature": 0, "num_predict": n},
    }


async def reference(url: str, prompt: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        r = await c.post("/api/generate", json={**body(prompt), "stream": False})
        return r.json()["response"]


async def stream_request(url, prompt, *, disconnect_after_lines=None, delay=0.0):
    """Returns (request id, text, last message) or (request id, None, None) if disconnected."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as c,
        c.stream("POST", "/api/generate", json=body(prompt)) as r,
    ):
        rid = int(r.headers["x-request-id"])
        if disconnect_after_lines == 0:
            await trio.sleep(delay)
            return rid, None, None
        text, lines = "", 0
        async for line in r.aiter_lines():
            msg = json.loads(line)
            lines += 1
            if disconnect_after_lines is not None and lines >= disconnect_after_lines:
                return rid, None, None
            text += msg.get("response", "")
            if msg.get("done"):
                return rid, text, msg
    raise AssertionError("stream ended without done")


async def memory(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url) as c:
        return (await c.get("/api/memory")).json()


async def idle_memory(url: str) -> dict:
    """/api/memory once no sequence holds a live cache (the last release step has run)."""
    with trio.fail_after(30):
        while True:
            now = await memory(url)
            if now["live_cache_bytes"] == 0 and now["live_sequences"] == 0:
                return now
            await trio.sleep(0.1)


async def test_half_of_twenty_streams_disconnect(live_server):
    url = live_server.url
    rng = random.Random(1234)
    expected = {p: await reference(url, p) for p in (PROMPT_SHORT, PROMPT_LONG)}
    baseline = await idle_memory(url)
    results: list = [None] * 20

    async def one(i: int) -> None:
        prompt = PROMPT_LONG if i % 4 == 0 else PROMPT_SHORT
        if i % 2:
            # Cancelled: before the first token (mid-prefill or queued) or mid-decode.
            cut = rng.choice([0, 0, 1, 2, 3])
            delay = rng.uniform(0, 1.5)
            results[i] = (
                "cancelled",
                await stream_request(url, prompt, disconnect_after_lines=cut, delay=delay),
            )
        else:
            results[i] = ("kept", prompt, await stream_request(url, prompt))

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)

    for entry in results:
        if entry[0] == "kept":
            _, prompt, (_, text, last) = entry
            assert text == expected[prompt]
            assert last["done_reason"] == "length" and last["eval_count"] == 6

    # Memory returns to its idle baseline once the server has seen every disconnect. (The
    # prefix cache already holds these prompts and their greedy continuations from the reference
    # runs, so what the streams store adds no bytes.)
    now = await idle_memory(url)
    for key in ("weights_bytes", "live_cache_bytes", "cached_kv_bytes", "device_used_bytes"):
        assert now[key] == baseline[key], key

    scheduler = live_server.runtime.actors["scheduler"]
    executor = live_server.runtime.actors["executor"]
    cancel_log, step_log, stats = await trio.to_thread.run_sync(
        live_server.on_server,
        lambda: (dict(scheduler.cancel_log), list(executor.step_log), executor.statistics()),
    )
    cancelled = [entry[1][0] for entry in results if entry[0] == "cancelled"]
    assert len(cancelled) == 10
    for rid in cancelled:
        if rid not in cancel_log:
            continue  # finished before the client let go
        late = [start for r, start, _ in step_log if r == rid and start > cancel_log[rid]]
        assert len(late) <= 1, f"request {rid}: {len(late)} steps after its cancellation"
    assert stats.live_sequences == 0


async def test_a_reader_that_stops_stalls_only_its_own_stream(live_server):
    url = live_server.url
    expected = await reference(url, PROMPT_SHORT)
    async with (
        httpx.AsyncClient(base_url=url, timeout=300) as slow_client,
        slow_client.stream("POST", "/api/generate", json=body(PROMPT_SHORT)) as slow,
    ):
        lines = slow.aiter_lines()
        first = json.loads(await lines.__anext__())
        # The slow reader now stops reading; another request runs to completion meanwhile.
        with trio.fail_after(120):
            _, text, last = await stream_request(url, PROMPT_SHORT)
        assert text == expected and last["done"]
        rest = [json.loads(line) async for line in lines]
    assert first["response"] + "".join(m["response"] for m in rest) == expected
    assert rest[-1]["done"]
