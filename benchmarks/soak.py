"""Soak: many concurrent clients over both APIs, random disconnects, slow readers, bad requests.

Serves a tiny random-weight llama (tests/tiny_models.py, its tokenizer padded to the model's
vocabulary so every token decodes) on a free loopback port, in this process, with API keys and
small admission limits so 401s and 429s happen too. `--requests` requests (bounded also by
`--seconds`) are spread over `--clients` concurrent clients:

- valid generations over /api/generate, /api/chat, /v1/chat/completions, /v1/completions,
  streaming or not; a `--cancel-fraction` of them are cut at a random point (before the
  response, after a few lines, or after a random delay) and a `--slow-fraction` read slowly;
- an `--invalid-fraction` of hostile requests: bad JSON, invalid UTF-8, deep nesting, wrong
  types, oversized bodies, unknown models, a wrong key, num_predict over the cap.

A poller measures /health throughout. Afterwards it checks: /api/memory is back at its idle
baseline, the server's integrity (scheduler, executor and gate idle; the pager's
`check_integrity()` once the prefix cache has one) and that the greedy answer to a fixed prompt
is what it was before. Prints a Markdown table; exits 1 if a check fails.

    .venv/bin/python benchmarks/soak.py [--requests 2000] [--clients 32] [--seconds 600]
    .venv/bin/python benchmarks/soak.py --small-budgets   # force paging (once the cache pages)

    .venv/bin/python benchmarks/soak.py --adversarial [--phase-seconds 20]  # see run_adversarial

Loopback only; nothing else is contacted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

import kvgrove  # noqa: F401  (first: it preloads OpenBLAS before mlx is imported)
from kvgrove.config import Settings
from kvgrove.serve import Background, background

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("soak-key-a", "soak-key-b")
FIXED_PROMPT = "The capital of France is"
PROMPTS = [
    "hello world",
    "The capital of France is Paris.",
    "def f(x): return x",
    "hello " * 40,
    "The capital of France is Paris. " * 8,
]
# Back at their idle values once every request is over. Cached KV (the prefix cache) is kept by
# design: it is checked against its tier budgets instead.
MEMORY_KEYS = ("weights_bytes", "live_cache_bytes")


def write_model(folder: Path) -> Path:
    """The tiny llama whose every token decodes (the tests' own helper)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import write_decodable_llama

    return write_decodable_llama(folder)


def soak_settings(model: Path, *, small_budgets: bool = False, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        port=0,
        model=str(model),
        api_keys=KEYS,
        max_concurrent_requests=8,
        max_queued_requests=48,
        max_body_bytes=64 * 1024,
        max_predict_tokens=64,
        prefill_chunk_tokens=64,
        shutdown_grace_seconds=1.0,
    )
    if small_budgets:  # the prefix cache pages under these (no-op until it exists)
        values.update(device_budget_bytes=256 * 1024, host_budget_bytes=512 * 1024)
    values.update(overrides)
    return Settings(**values)


@attrs.define
class Tally:
    outcomes: Counter = attrs.field(factory=Counter)
    details: Counter = attrs.field(factory=Counter)
    health_seconds: list[float] = attrs.field(factory=list)
    bare_500s: int = 0  # 5xx without a JSON error body: must stay 0
    retries: int = 0  # 429s answered to valid requests (each retried after a back-off)

    def add(self, outcome: str, detail: str) -> None:
        self.outcomes[outcome] += 1
        self.details[f"{outcome}: {detail}"] += 1


def _auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def valid_request(rng: random.Random) -> tuple[str, dict, str]:
    """(path, body, api) of a random well-formed generation."""
    prompt = rng.choice(PROMPTS)
    n = rng.randint(1, 24)
    stream = rng.random() < 0.7
    temp = rng.choice([0.0, 0.7])
    salt = rng.choice([None, None, "tenant-x"])
    extra = {"cache_salt": salt} if salt else {}
    match rng.randrange(4):
        case 0:
            opts = {"temperature": temp, "num_predict": n}
            return (
                "/api/generate",
                {"model": "llama", "prompt": prompt, "stream": stream, "options": opts, **extra},
                "ollama",
            )
        case 1:
            msgs = [{"role": "user", "content": prompt}]
            opts = {"temperature": temp, "num_predict": n}
            return (
                "/api/chat",
                {"model": "llama", "messages": msgs, "stream": stream, "options": opts, **extra},
                "ollama",
            )
        case 2:
            msgs = [{"role": "user", "content": prompt}]
            return (
                "/v1/chat/completions",
                {
                    "model": "llama",
                    "messages": msgs,
                    "stream": stream,
                    "max_tokens": n,
                    "temperature": temp,
                    **extra,
                },
                "openai",
            )
        case _:
            return (
                "/v1/completions",
                {
                    "model": "llama",
                    "prompt": prompt,
                    "stream": stream,
                    "max_tokens": n,
                    "temperature": temp,
                    **extra,
                },
                "openai",
            )


def invalid_request(rng: random.Random) -> tuple[str, dict[str, Any], set[int]]:
    """(path, httpx kwargs, acceptable statuses) of a random hostile request."""
    path = rng.choice(["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"])
    kinds = [
        ({"content": b'{"model": "llama", "prompt": '}, {400}),
        ({"content": b'{"model": "llama", "prompt": "\xff\xfe"}'}, {400}),
        ({"content": b"[" * 10_000}, {400}),
        ({"json": {"model": "llama", "prompt": 5, "messages": "x", "stream": "yes"}}, {400}),
        ({"json": {"model": "no-such-model", "prompt": "hi", "messages": []}}, {400}),
        ({"content": b'{"prompt": "' + b"a" * 70_000 + b'"}'}, {413}),
        (
            {
                "json": {
                    "model": "llama",
                    "prompt": "hi",
                    "options": {"num_predict": 10**6},
                    "max_tokens": 10**6,
                    "messages": [{"role": "user", "content": "hi"}],
                }
            },
            {400},
        ),
        ({"json": {"model": "llama", "prompt": "hi"}, "headers": _auth("wrong")}, {401}),
        ({"json": {"model": "llama", "prompt": "hi"}, "headers": {}}, {401}),
    ]
    kwargs, ok = rng.choice(kinds)
    kwargs = {"headers": _auth(), **kwargs}
    return path, kwargs, ok | {429}


def _is_json_error(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and "error" in body


RETRIES_ON_429 = 3


async def one_request(client: httpx.AsyncClient, rng: random.Random, args, tally: Tally) -> None:
    """One logical request; a 429 is retried after a short back-off (counted in `retries`)."""
    roll = rng.random()
    if roll < args.invalid_fraction:
        path, kwargs, ok = invalid_request(rng)
        r = await client.post(path, **kwargs)
        if r.status_code >= 500 and not _is_json_error(r):
            tally.bare_500s += 1
        if r.status_code in ok and _is_json_error(r):
            tally.add("rejected", f"{r.status_code} (hostile)")
        else:
            tally.add("errors", f"hostile got {r.status_code}: {r.text[:80]}")
        return
    path, body, api = valid_request(rng)
    cancel = roll < args.invalid_fraction + args.cancel_fraction
    slow = not cancel and rng.random() < args.slow_fraction
    cut_lines = cut_seconds = None
    if cancel:
        body["stream"] = True
        cut_lines = rng.choice([0, 1, 2, 3, None])
        cut_seconds = rng.uniform(0, 0.3) if cut_lines is None else None
    key = rng.choice(KEYS)
    for attempt in range(RETRIES_ON_429 + 1):
        with trio.move_on_after(cut_seconds if cut_seconds is not None else 1e9) as scope:
            outcome = await _exchange(client, path, body, api, key, cut_lines, slow, rng, tally)
        if scope.cancelled_caught:
            outcome = ("cancelled", "after a delay")
        if outcome is None and attempt < RETRIES_ON_429:
            tally.retries += 1
            await trio.sleep(rng.uniform(0.05, 0.3))  # a (short) Retry-After back-off
            continue
        tally.add(*(outcome or ("rejected", "429 (busy, retries spent)")))
        return


async def _exchange(client, path, body, api, key, cut_lines, slow, rng, tally: Tally):
    """(outcome, detail), or None for a 429."""
    async with client.stream("POST", path, json=body, headers=_auth(key)) as r:
        if r.status_code != 200:
            await r.aread()
            if r.status_code >= 500 and not _is_json_error(r):
                tally.bare_500s += 1
            if r.status_code == 429 and _is_json_error(r) and r.headers.get("retry-after"):
                return None
            return "errors", f"{r.status_code}: {r.text[:80]}"
        if cut_lines == 0:
            return "cancelled", "before reading"
        lines = 0
        last = error = None
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            lines += 1
            last = line
            if '"error"' in line and error is None:
                error = line
            if cut_lines is not None and lines >= cut_lines:
                return "cancelled", f"after {lines} lines"
            if slow:
                await trio.sleep(rng.uniform(0.01, 0.05))
        return _judge(api, body, error or last)


def _judge(api: str, body: dict, last: str | None) -> tuple[str, str]:
    """Classify a completed 200 response by its last line."""
    if last is None:
        return "errors", "empty 200"
    if api == "openai" and body.get("stream"):
        return ("served", "openai stream") if last == "data: [DONE]" else ("errors", last[:80])
    if last.startswith("data: "):
        last = last[6:]
    try:
        msg = json.loads(last)
    except ValueError:
        return "errors", f"unparsable: {last[:80]}"
    if "error" in msg:
        return "errors", f"stream error: {str(msg['error'])[:80]}"
    if api == "ollama" and msg.get("done"):
        return "served", "ollama"
    if api == "openai" and msg.get("choices"):
        return "served", "openai"
    return "errors", f"unexpected: {last[:80]}"


async def poll_health(url: str, stop: trio.Event, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await c.get("/health")
            tally.health_seconds.append(time.perf_counter() - t0)
            if r.status_code != 200:
                tally.add("errors", f"/health {r.status_code}")
            await trio.sleep(0.05)


async def greedy_answer(client: httpx.AsyncClient) -> str:
    body = {
        "model": "llama",
        "prompt": FIXED_PROMPT,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 16},
    }
    r = await client.post("/api/generate", json=body, headers=_auth())
    r.raise_for_status()
    return r.json()["response"]


async def memory(client: httpx.AsyncClient) -> dict:
    r = await client.get("/api/memory", headers=_auth())
    r.raise_for_status()
    return r.json()


def integrity(bg: Background) -> list[str]:
    """Problems in the server's state once idle (empty = all holds). Call from a thread."""
    actors = bg.runtime.actors

    def read() -> dict:
        out = {
            "scheduler": actors["scheduler"].statistics(),
            "executor": actors["executor"].statistics(),
            "gate": actors["gate"].statistics(),
        }
        check = getattr(actors["pager"], "check_integrity", None)  # the prefix cache's hook
        if check is not None:
            try:
                check()
            except AssertionError as e:
                out["pager"] = f"check_integrity failed: {e}"
        return out

    state = bg.on_server(read)
    problems = []
    s, e, g = state["scheduler"], state["executor"], state["gate"]
    if s.waiting or s.running or s.parked:
        problems.append(f"scheduler not idle: {s}")
    if e.live_sequences:
        problems.append(f"executor holds {e.live_sequences} live sequences")
    if g.running or g.queued:
        problems.append(f"gate not idle: {g}")
    if "pager" in state:
        problems.append(state["pager"])
    return problems


@attrs.define
class Report:
    requests: int
    seconds: float
    outcomes: dict
    details: dict
    bare_500s: int
    retries_after_429: int
    health_p99_ms: float
    health_max_ms: float
    memory_leaks: dict
    integrity: list
    greedy_before: str
    greedy_after: str

    @property
    def ok(self) -> bool:
        return (
            not self.memory_leaks
            and not self.integrity
            and self.bare_500s == 0
            and self.greedy_before == self.greedy_after
        )

    def table(self) -> str:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _common import table

        n = max(self.requests, 1)
        rows = [
            ("requests", self.requests),
            ("wall seconds", round(self.seconds, 1)),
            *(
                (
                    name,
                    f"{self.outcomes.get(name, 0)} ({100 * self.outcomes.get(name, 0) / n:.1f}%)",
                )
                for name in ("served", "cancelled", "rejected", "errors")
            ),
            ("429s retried (Retry-After)", self.retries_after_429),
            ("500s without a JSON body", self.bare_500s),
            ("/health p99 ms", round(self.health_p99_ms, 1)),
            ("/health max ms", round(self.health_max_ms, 1)),
            ("memory leaks after", self.memory_leaks or "none"),
            ("integrity", "; ".join(self.integrity) or "holds"),
            ("greedy answer unchanged", self.greedy_before == self.greedy_after),
        ]
        return table(["soak", "value"], rows)


async def run_soak(bg: Background, args: argparse.Namespace) -> Report:
    rng = random.Random(args.seed)
    tally = Tally()
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=bg.url, timeout=120, limits=limits) as client:
        greedy_before = await greedy_answer(client)
        baseline = await memory(client)
        stop_health = trio.Event()
        started = time.perf_counter()
        issued = 0

        async def worker(seed: int) -> None:
            nonlocal issued
            wrng = random.Random(seed)
            while issued < args.requests:
                issued += 1
                try:
                    await one_request(client, wrng, args, tally)
                except httpx.HTTPError as e:
                    tally.add("errors", f"transport: {type(e).__name__}: {e}"[:100])

        async with trio.open_nursery() as outer:
            outer.start_soon(poll_health, bg.url, stop_health, tally)
            with trio.move_on_after(args.seconds):
                async with trio.open_nursery() as nursery:
                    for i in range(args.clients):
                        nursery.start_soon(worker, rng.randrange(2**32) + i)
            stop_health.set()
        seconds = time.perf_counter() - started

        # Disconnects reach the scheduler at its next step: wait for idle, then compare.
        leaks: dict = {}
        with trio.move_on_after(30):
            while True:
                now = await memory(client)
                # More than at the start is a leak (less is fine: a live cache kept hot after the
                # warm-up request may have been released since).
                leaks = {k: (baseline[k], now[k]) for k in MEMORY_KEYS if now[k] > baseline[k]}
                if now.get("live_sequences", 0):
                    leaks["live_sequences"] = (0, now["live_sequences"])
                for tier, held in now["cached_kv_bytes"].items():
                    if held > now["budgets_bytes"][tier]:
                        leaks[f"cached_kv_bytes.{tier} over budget"] = (
                            now["budgets_bytes"][tier],
                            held,
                        )
                if not leaks and not await trio.to_thread.run_sync(integrity, bg):
                    break
                await trio.sleep(0.1)
        problems = await trio.to_thread.run_sync(integrity, bg)
        # The prefix cache's own check_integrity(), where the server has one (/api/cache?check=1).
        r = await client.get("/api/cache", params={"check": "1"}, headers=_auth())
        if r.status_code >= 500:
            problems.append(f"/api/cache?check=1: {r.status_code} {r.text[:200]}")
        greedy_after = await greedy_answer(client)

    health = sorted(tally.health_seconds) or [float("nan")]
    return Report(
        requests=sum(tally.outcomes.values()) - tally.details.get("errors: /health 503", 0),
        seconds=seconds,
        outcomes=dict(tally.outcomes),
        details=dict(tally.details),
        bare_500s=tally.bare_500s,
        retries_after_429=tally.retries,
        health_p99_ms=1000 * health[min(len(health) - 1, int(0.99 * len(health)))],
        health_max_ms=1000 * health[-1],
        memory_leaks=leaks,
        integrity=problems,
        greedy_before=greedy_before,
        greedy_after=greedy_after,
    )


# -- the adversarial soak ---------------------------------------------------------------------
#
# Normal streaming traffic alone for `--phase-seconds`, then the same traffic alongside
# adversaries at 2x max-running each: clients that stop reading, slowloris headers and bodies,
# idle keep-alive floods, and clients that disconnect while queued. Normal TTFT (first NDJSON
# line, client side) is reported for both phases of the same run; afterwards the adversaries
# go and nothing may be held.

ADVERSARY_RUNNING = 4


def adversarial_settings(model: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        max_running_sequences=ADVERSARY_RUNNING,
        max_concurrent_requests=4 * ADVERSARY_RUNNING,
        max_queued_requests=4 * ADVERSARY_RUNNING,
        max_predict_tokens=400,
        reply_channel_items=2,
        socket_send_buffer_bytes=4096,
        stall_seconds=1.0,
        stall_limit_seconds=8.0,
        keep_alive_timeout_seconds=1.0,
        body_timeout_seconds=2.0,
    )
    values.update(overrides)
    return soak_settings(model, **values)


def _request(path: str, body: dict, *, key: str = KEYS[0]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: loopback\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _connect(url: str) -> Any:
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    await sock.connect((host, int(port)))
    return sock


async def _send(sock: Any, data: bytes) -> None:
    while data:
        data = data[await sock.send(data) :]


async def _until_closed(sock: Any) -> None:
    while True:
        try:
            if not await sock.recv(65536):
                return
        except OSError:
            return


LONG_BODY = {"model": "llama", "prompt": "hello", "options": {"temperature": 0, "num_predict": 400}}


async def adversary(kind: str, url: str, stop: trio.Event, counts: Counter) -> None:
    """One adversary of `kind`, repeating until `stop`; `counts` tallies what happened."""
    while not stop.is_set():
        try:
            sock = await _connect(url)
        except OSError:
            counts[f"{kind}: connect failed"] += 1
            await trio.sleep(0.1)
            continue
        with sock:
            try:
                if kind == "non-reader":  # sends its request, never reads, until the end
                    await _send(sock, _request("/api/generate", LONG_BODY))
                    counts[kind] += 1
                    await stop.wait()
                elif kind == "slowloris headers":
                    await _send(sock, b"POST /api/generate HTTP/1.1\r\nHost: x\r\n")

                    async def drip(sock=sock) -> None:
                        with contextlib.suppress(OSError):
                            while True:
                                await sock.send(b"X")
                                await trio.sleep(0.1)

                    with trio.move_on_after(30):
                        async with trio.open_nursery() as n:
                            n.start_soon(drip)
                            await _until_closed(sock)
                            n.cancel_scope.cancel()
                    counts[f"{kind}: closed by the server"] += 1
                elif kind == "slowloris body":
                    data = _request("/api/generate", LONG_BODY)
                    cut = data.index(b"\r\n\r\n") + 4
                    await _send(sock, data[:cut])
                    for byte in data[cut : cut + 20]:
                        await sock.send(bytes([byte]))
                        await trio.sleep(0.2)
                    try:
                        reply = (await sock.recv(200))[:12].decode(errors="replace")
                    except OSError:
                        reply = "reset after the server's 408"
                    counts[f"{kind}: {reply}"] += 1
                elif kind == "idle keep-alive":
                    await _until_closed(sock)
                    counts[f"{kind}: closed by the server"] += 1
                elif kind == "queued leaver":  # its whole body, then gone at once
                    await _send(sock, _request("/api/generate", {**LONG_BODY, "stream": False}))
                    await trio.sleep(0.05)
                    counts[kind] += 1
                    await trio.sleep(0.2)  # then again (each leaver ~4/s)
            except OSError:
                counts[f"{kind}: connection error"] += 1
        if stop.is_set():
            return


async def normal_traffic(client, stop: trio.Event, ttfts: list, tally: Counter) -> None:
    body = {"model": "llama", "prompt": "hello world", "options": {"num_predict": 16}}
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            async with client.stream("POST", "/api/generate", json=body, headers=_auth()) as r:
                if r.status_code != 200:
                    tally[f"normal {r.status_code}"] += 1
                    await r.aread()
                    await trio.sleep(0.05)
                    continue
                first = True
                async for line in r.aiter_lines():
                    if first and line.strip():
                        ttfts.append(time.perf_counter() - t0)
                        first = False
                    if '"done": true' in line:
                        tally["normal served"] += 1
        except httpx.HTTPError as e:
            tally[f"normal transport error: {type(e).__name__}"] += 1


def _pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def run_adversarial(bg: Background, args: argparse.Namespace) -> tuple[str, bool]:
    """The adversarial soak; returns (its table, whether everything held)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _common import table

    n = 2 * ADVERSARY_RUNNING
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    rows, counts = [], Counter()
    async with httpx.AsyncClient(base_url=bg.url, timeout=120) as client:
        await greedy_answer(client)
        baseline = await memory(client)
        for phase in ("normal only", "normal + adversaries"):
            ttfts: list = []
            tally: Counter = Counter()
            stop_normal, stop_adv = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(args.normal_clients):
                    nursery.start_soon(normal_traffic, client, stop_normal, ttfts, tally)
                if phase != "normal only":
                    for kind in kinds:
                        for _ in range(n):
                            nursery.start_soon(adversary, kind, bg.url, stop_adv, counts)
                await trio.sleep(args.phase_seconds)
                stop_normal.set()
                stop_adv.set()
            errors = sum(v for k, v in tally.items() if k != "normal served")
            rows.append(
                (
                    phase,
                    tally["normal served"],
                    errors,
                    round(_pct(ttfts, 0.5), 1),
                    round(_pct(ttfts, 0.99), 1),
                )
            )
        sched = await trio.to_thread.run_sync(
            lambda: bg.on_server(bg.runtime.actors["scheduler"].statistics)
        )
        # Afterwards: nothing held (ledger at baseline, idle actors, no locks, nothing parked).
        problems: list = []
        leaks: dict = {}
        with trio.move_on_after(30):
            while True:
                now = await memory(client)
                leaks = {k: (baseline[k], now[k]) for k in MEMORY_KEYS if now[k] > baseline[k]}
                problems = await trio.to_thread.run_sync(integrity, bg)
                if not leaks and not problems:
                    break
                await trio.sleep(0.1)
        r = await client.get("/api/cache", params={"check": "1"}, headers=_auth())
        if r.status_code >= 500:
            problems.append(f"/api/cache?check=1: {r.status_code}")
    out = table(["phase", "normal served", "normal errors", "TTFT p50 ms", "TTFT p99 ms"], rows)
    adv_rows = [(k, v) for k, v in sorted(counts.items())]
    adv_rows += [
        ("stalled sequences parked (times)", sched.stall_parks),
        ("stalled sequences ended at the limit", sched.stall_ended),
        ("memory leaks after", leaks or "none"),
        ("integrity after", "; ".join(problems) or "holds"),
    ]
    out += "\n\n" + table([f"adversaries (each kind x{n})", "count"], adv_rows)
    return out, not leaks and not problems and all(row[1] > 0 for row in rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=600, help="stop issuing after this long")
    p.add_argument("--cancel-fraction", type=float, default=0.35)
    p.add_argument("--invalid-fraction", type=float, default=0.10)
    p.add_argument("--slow-fraction", type=float, default=0.10)
    p.add_argument("--small-budgets", action="store_true", help="tiny tier budgets (paging)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--details", action="store_true", help="also print outcomes by detail")
    p.add_argument(
        "--adversarial", action="store_true", help="the adversarial soak (see run_adversarial)"
    )
    p.add_argument("--phase-seconds", type=float, default=20, help="adversarial: per phase")
    p.add_argument("--normal-clients", type=int, default=4, help="adversarial: normal clients")
    p.add_argument(
        "--kinds",
        default="non-reader,slowloris headers,slowloris body,idle keep-alive,queued leaver",
        help="adversarial: which adversaries (comma-separated)",
    )
    return p


def main() -> int:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model(Path(tmp) / "llama")
        if args.adversarial:
            with background(adversarial_settings(model)) as bg:
                text, ok = trio.run(run_adversarial, bg, args)
            print(text)
            return 0 if ok else 1
        with background(soak_settings(model, small_budgets=args.small_budgets)) as bg:
            report = trio.run(run_soak, bg, args)
    print(report.table())
    if args.details or not report.ok:
        print()
        for detail, count in sorted(report.details.items()):
            print(f"- {detail}: {count}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
