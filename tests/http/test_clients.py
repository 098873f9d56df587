"""No client can stall the server: stalled readers, slowloris, idle and half-open connections,
queued disconnects. Raw sockets on loopback against a real server (tiny model); the server's
sockets get a small SO_SNDBUF and the clients a small SO_RCVBUF so a client that stops reading
fills its buffers within a few kilobytes, and the stall limit is short."""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

import httpx
import pytest
import trio

from kvgrove.config import Settings
from kvgrove.serve import background
from tiny_models import write_decodable_llama

MAX_RUNNING = 2
STALL = 0.5
# Long enough (400 NDJSON lines, ~45 KB) to fill a non-reader's buffers many times over.
LONG = {"model": "llama", "prompt": "hello", "options": {"temperature": 0, "num_predict": 400}}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_decodable_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _settings(model: Path, **overrides) -> Settings:
    values = dict(
        port=0,
        model=str(model),
        max_running_sequences=MAX_RUNNING,
        max_predict_tokens=400,
        reply_channel_items=2,
        socket_send_buffer_bytes=4096,
        stall_seconds=STALL,
        stall_limit_seconds=120,
        keep_alive_timeout_seconds=0.5,
        body_timeout_seconds=1.0,
        shutdown_grace_seconds=0.5,
        # Each server its own prefix-cache folder: a folder has one owner, and several of
        # these servers (same model) run at once.
        kv_cache_dir=tempfile.mkdtemp(prefix="kvgrove-test-clients-kv-"),
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server(model):
    with background(_settings(model)) as bg:
        yield bg


@pytest.fixture(scope="module")
def gated(model):
    """One generation at a time, one more may queue."""
    with background(_settings(model, max_concurrent_requests=1, max_queued_requests=1)) as bg:
        yield bg


def _stats(bg, name):
    return bg.on_server(bg.runtime.actors[name].statistics)


async def stats(bg, name):
    return await trio.to_thread.run_sync(_stats, bg, name)


async def until(bg, name, predicate, seconds=30):
    """The actor's statistics once `predicate` holds (polled, under a deadline)."""
    with trio.fail_after(seconds):
        while True:
            s = await stats(bg, name)
            if predicate(s):
                return s
            await trio.sleep(0.02)


async def connect(url: str, *, rcvbuf: int = 1024) -> trio.socket.SocketType:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect((host, int(port)))
    return sock


def request_bytes(path: str, body: dict, *, content_length: int | None = None) -> bytes:
    data = json.dumps(body).encode()
    n = len(data) if content_length is None else content_length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: loopback\r\nContent-Type: application/json\r\n"
        f"Content-Length: {n}\r\n\r\n"
    )
    return head.encode() + data


async def send_all(sock, data: bytes) -> None:
    while data:
        n = await sock.send(data)
        data = data[n:]


async def read_response(sock) -> tuple[int, bytes]:
    """Status and de-chunked body of one HTTP/1.1 response (chunked or Content-Length)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await sock.recv(65536)
        assert chunk, f"connection closed before the headers: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    async def more() -> bytes:
        chunk = await sock.recv(65536)
        assert chunk, "connection closed mid-body"
        return chunk

    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            rest += await more()
        return status, rest[:n]
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += await more()
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += await more()
        body, rest = body + rest[:size], rest[size + 2 :]
        if size == 0:
            return status, body


async def closed_by_server(sock) -> None:
    """Read (discarding) until the server closes the connection."""
    while True:
        try:
            data = await sock.recv(65536)
        except ConnectionResetError:
            return
        if not data:
            return


def ndjson_text(body: bytes) -> tuple[str, dict]:
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    return "".join(m.get("response", "") for m in lines), lines[-1]


async def test_stalled_readers_give_their_slots_back_and_resume_with_the_same_tokens(server):
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        ref = (await client.post("/api/generate", json={**LONG, "stream": False})).json()
        assert ref["eval_count"] == 400
        base = await stats(server, "scheduler")
        # 2x max-running clients send their whole request and then read nothing.
        stalled = []
        for _ in range(2 * MAX_RUNNING):
            sock = await connect(server.url)
            await send_all(sock, request_bytes("/api/generate", LONG))
            stalled.append(sock)
        # Each fills its buffers, leaves the batch after STALL, and the next one runs.
        s = await until(server, "scheduler", lambda s: s.stall_parked == 2 * MAX_RUNNING)
        assert s.running == 0 and s.stall_parks >= base.stall_parks + 2 * MAX_RUNNING
        # Their live caches are given up in the executor's next step, and charged after it.
        with trio.fail_after(30):
            while (await client.get("/api/memory")).json()["live_cache_bytes"] != 0:
                await trio.sleep(0.05)
        # A normal request is served meanwhile.
        with trio.fail_after(60):
            r = await client.post("/api/generate", json={**LONG, "stream": False})
        assert r.status_code == 200 and r.json()["response"] == ref["response"]
        # The stalled ones read now: each resumes and gets exactly the tokens it would have.
        for sock in stalled:
            with trio.fail_after(60):
                status, body = await read_response(sock)
            assert status == 200
            text, last = ndjson_text(body)
            assert last["done"] is True and last["eval_count"] == 400
            assert text == ref["response"]
            sock.close()
        s = await until(server, "scheduler", lambda s: s.running == 0 and s.waiting == 0)
        assert s.stall_parked == 0
        assert (await client.get("/api/memory")).json()["live_cache_bytes"] == 0


async def test_a_slow_but_steady_reader_is_not_parked(server):
    base = await stats(server, "scheduler")
    sock = await connect(server.url)
    await send_all(sock, request_bytes("/api/generate", LONG))
    await until(server, "scheduler", lambda s: s.running == 1)
    with trio.fail_after(60):
        status, body = await read_response(sock)  # reads as fast as it can: never stalled
    sock.close()
    assert status == 200 and ndjson_text(body)[1]["done"] is True
    assert (await stats(server, "scheduler")).stall_parks == base.stall_parks


async def test_a_client_stalled_past_the_limit_gets_an_in_stream_error(model):
    with background(_settings(model, stall_limit_seconds=1.5)) as bg:
        sock = await connect(bg.url)
        await send_all(sock, request_bytes("/api/generate", LONG))
        s = await until(bg, "scheduler", lambda s: s.stall_ended == 1)
        assert s.running == 0 and s.waiting == 0
        with trio.fail_after(60):
            status, body = await read_response(sock)
        sock.close()
        assert status == 200
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        assert "stall limit" in lines[-1]["error"]
        assert not any(m.get("done") for m in lines)


async def test_a_queued_client_that_disconnects_frees_its_place(gated):
    # The only slot: a client that reads nothing (its handler stays, its stream stalled).
    holder = await connect(gated.url)
    await send_all(holder, request_bytes("/api/generate", LONG))
    await until(gated, "gate", lambda s: s.running == 1)
    # The one queue place: a client that sends its whole body, then goes away.
    leaver = await connect(gated.url)
    await send_all(leaver, request_bytes("/api/generate", {**LONG, "stream": False}))
    await until(gated, "gate", lambda s: s.queued == 1)
    leaver.close()
    s = await until(gated, "gate", lambda s: s.queued == 0)
    assert s.running == 1  # the holder still holds the slot: the leaver's place is free
    async with httpx.AsyncClient(base_url=gated.url, timeout=60) as client:
        async with trio.open_nursery() as nursery:
            result = {}

            async def next_request():
                result["r"] = await client.post("/api/generate", json={**LONG, "stream": False})

            nursery.start_soon(next_request)
            await until(gated, "gate", lambda s: s.queued == 1)  # queued, not refused
            with trio.fail_after(60):
                status, _ = await read_response(holder)
            holder.close()
        assert status == 200 and result["r"].status_code == 200
    await until(gated, "gate", lambda s: s.running == 0 and s.queued == 0)


async def test_idle_and_half_sent_connections_are_closed_and_hold_nothing(server):
    # Idle from the start, idle after a response (keep-alive), and headers never finished.
    idle = await connect(server.url)
    after = await connect(server.url)
    await send_all(after, b"GET /health HTTP/1.1\r\nHost: loopback\r\n\r\n")
    status, _ = await read_response(after)
    assert status == 200
    partial = await connect(server.url)
    await send_all(partial, b"POST /api/generate HTTP/1.1\r\nHost: loopback\r\nContent-")
    for sock in (idle, after, partial):
        with trio.fail_after(30):
            await closed_by_server(sock)
        sock.close()


async def test_slowloris_headers_are_timed_out(server):
    sock = await connect(server.url)
    await send_all(sock, b"POST /api/generate HTTP/1.1\r\nHost: loopback\r\n")
    async with trio.open_nursery() as nursery:

        async def drip():  # the adversary: one header byte every 50 ms, forever
            with trio.move_on_after(60):
                while True:
                    try:
                        await sock.send(b"X")
                    except OSError:
                        return
                    await trio.sleep(0.05)

        nursery.start_soon(drip)
        with trio.fail_after(30):
            await closed_by_server(sock)
        nursery.cancel_scope.cancel()
    sock.close()


async def test_a_slow_body_holds_no_slot_and_gets_408(server):
    data = request_bytes("/api/generate", LONG)
    head, body = data.split(b"\r\n\r\n", 1)
    sock = await connect(server.url)
    await send_all(sock, head + b"\r\n\r\n" + body[:5])
    # The body is not in: no admission slot, no sequence.
    gate = await stats(server, "gate")
    assert gate.running == 0 and gate.queued == 0
    assert (await stats(server, "scheduler")).waiting == 0
    for i in range(5, 10):  # dripping, and still not admitted
        await sock.send(body[i : i + 1])
        assert (await stats(server, "gate")).running == 0
    with trio.fail_after(30):
        status, reply = await read_response(sock)
    assert status == 408 and "not received within" in json.loads(reply)["error"]
    sock.close()
    # A half-open socket mid-body (the client vanished without a FIN) ends the same way.
    sock = await connect(server.url)
    await send_all(sock, head + b"\r\n\r\n" + body[:5])
    with trio.fail_after(30):
        status, _ = await read_response(sock)
    assert status == 408
    sock.close()
    gate = await stats(server, "gate")
    assert gate.running == 0 and gate.queued == 0
