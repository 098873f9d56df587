"""The door: bearer-key authentication and admission limits, as ASGI middleware around the app.

It runs before Quart sees the request, so a request without a valid key or beyond the queue
costs no body read, no JSON parse and no queue slot. Admission covers the whole exchange,
streamed body included: the slot is held from the start of the ASGI call until it returns, so
however the exchange ends (finished, client gone before or during the stream, error) it is
given back exactly once.

- Keys: `Authorization: Bearer <key>` on every route but the open ones (/health, GET/HEAD /
  and /openapi.json). A missing or wrong key gets 401 in the route's API's error shape.
- Admission (generation routes only): up to `max_concurrent_requests` run; up to
  `max_queued_requests` more wait in FIFO order; beyond that, 429 with Retry-After. A client
  that disconnects while queued leaves the queue at once (its disconnect is read while it
  waits, whole body in or not).
- Bodies first: a generation request is admitted only once its whole body is in, and a body
  not in within `body_timeout_seconds` gets 408 (a slowloris body holds no slot, and not for
  long its connection). Slow headers and idle keep-alive connections are hypercorn's
  `keep_alive_timeout` (serve.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
from typing import Any

import attrs
import trio

from kvgrove.config import Settings
from kvgrove.http.errors import error_body, is_openai

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/", "/openapi.json"})
GENERATION_PATHS = frozenset(
    {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"}
)
# The ASGI scope key under which the request's key identity travels to the routes.
KEY_ID_SCOPE = "kvgrove.key_id"


def key_id(key: str) -> str:
    """A key's identity for cache namespacing: a hash, so the key itself is never stored."""
    return hashlib.sha256(b"kvgrove-key\0" + key.encode()).hexdigest()[:32]


@attrs.frozen
class GateStats:
    running: int
    queued: int
    admitted: int
    rejected: int
    max_running: int
    max_queued: int


class TooBusy(Exception):
    pass


class Gate:
    """Up to `max_running` holders at once, up to `max_queued` waiting (FIFO), the rest refused."""

    def __init__(self, max_running: int, max_queued: int) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._slots = trio.Semaphore(max_running)
        self._running = 0
        self._queued = 0
        self._admitted = 0
        self._rejected = 0

    @classmethod
    def for_settings(cls, settings: Settings) -> Gate:
        return cls(settings.max_concurrent_requests, settings.max_queued_requests)

    def acquire_nowait(self) -> None:
        """Take a free slot or raise trio.WouldBlock (a waiter, if any, is served first)."""
        self._slots.acquire_nowait()
        self._taken()

    async def acquire(self) -> None:
        """Take a slot, waiting in line if need be; raise TooBusy when the line is full."""
        try:
            self.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        if self._queued >= self.max_queued:
            self._rejected += 1
            raise TooBusy
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        self._taken()

    def _taken(self) -> None:
        self._running += 1
        self._admitted += 1

    def release(self) -> None:
        assert self._running > 0, "gate: release without acquire"
        self._running -= 1
        self._slots.release()

    def statistics(self) -> GateStats:
        return GateStats(
            running=self._running,
            queued=self._queued,
            admitted=self._admitted,
            rejected=self._rejected,
            max_running=self.max_running,
            max_queued=self.max_queued,
        )


class Guard:
    """ASGI middleware: authentication, then admission, then the app."""

    def __init__(self, app: Any, settings: Settings, gate: Gate | None = None) -> None:
        self.app = app
        self.settings = settings
        self._keys = {key_id(k): k.encode() for k in settings.api_keys}
        self.gate = gate if gate is not None else Gate.for_settings(settings)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _shield_last(send)
        path = scope.get("path", "")
        if self._keys and path not in OPEN_PATHS:
            kid = self._authenticate(scope)
            if kid is None:
                body = error_body(
                    "a valid API key is required (Authorization: Bearer <key>)",
                    openai=is_openai(path),
                    kind="invalid_request_error",
                    code="invalid_api_key",
                )
                await _respond(send, 401, body, [(b"www-authenticate", b"Bearer")])
                return
            scope = {**scope, KEY_ID_SCOPE: kid}
        if path not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        kept, state = await self._read_body(receive)
        if state == "gone":  # the client left before its body was in
            return
        if state == "timeout":
            body = error_body(
                f"the request body was not received within "
                f"{self.settings.body_timeout_seconds:g} seconds",
                openai=is_openai(path),
                kind="invalid_request_error",
                code="request_timeout",
            )
            await _respond(send, 408, body, [])
            return
        receive, admitted = await self._admit(_replay(kept, receive), receive)
        if admitted is None:  # the client left while queued
            return
        if not admitted:
            body = error_body(
                "too many requests: the server is at its concurrency and queue limits",
                openai=is_openai(path),
                kind="rate_limit_error",
                code="rate_limit_exceeded",
            )
            retry = str(self.settings.retry_after_seconds).encode()
            await _respond(send, 429, body, [(b"retry-after", retry)])
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.release()

    def _authenticate(self, scope: dict) -> str | None:
        """The key id of a valid bearer key in the request, else None (constant-time compare)."""
        for name, value in scope.get("headers", ()):
            if name.lower() != b"authorization":
                continue
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                continue
            token = token.strip()
            found = None
            for kid, key in self._keys.items():
                if hmac.compare_digest(token, key):
                    found = kid
            if found is not None:
                return found
        return None

    async def _read_body(self, receive: Any) -> tuple[list[dict], str]:
        """Read the request body (kept for the app) before admission: (messages, state), state
        "complete", "large" (over max_body_bytes: the app answers 413), "gone" (disconnected)
        or "timeout" (not all in within body_timeout_seconds)."""
        kept: list[dict] = []
        size = 0
        deadline = self.settings.body_timeout_seconds or math.inf
        with trio.move_on_after(deadline):
            while True:
                message = await receive()
                kept.append(message)
                if message["type"] == "http.disconnect":
                    return kept, "gone"
                if message["type"] != "http.request":
                    continue
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    return kept, "complete"
                if size > self.settings.max_body_bytes:
                    return kept, "large"
        return kept, "timeout"

    async def _admit(self, receive: Any, raw_receive: Any) -> tuple[Any, bool | None]:
        """Take a gate slot: (receive, True) when admitted, (receive, False) when refused,
        (receive, None) when the client disconnected while queued.

        The body is already in (`receive` replays it). While queued, the connection's further
        messages are read from `raw_receive` (and kept for the app) so a disconnect is seen at
        once rather than when a slot frees up.
        """
        try:
            self.gate.acquire_nowait()
        except trio.WouldBlock:
            pass
        else:
            return receive, True
        kept: list[dict] = []
        gone = False
        admitted = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                while True:
                    message = await raw_receive()
                    kept.append(message)
                    if message["type"] == "http.disconnect":
                        gone = True
                        nursery.cancel_scope.cancel()
                        return

            async def wait() -> None:
                nonlocal admitted
                try:
                    await self.gate.acquire()
                except TooBusy:
                    pass
                else:
                    admitted = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(wait)
        if gone:
            if admitted:
                self.gate.release()
            return receive, None
        if not kept:
            return receive, admitted
        return _replay(kept, receive), admitted


def _shield_last(send: Any) -> Any:
    """`send`, with the response's last body message shielded from cancellation. hypercorn
    re-arms the connection's keep-alive timer inside that call; Quart cancels its request task
    right after it, and a cancelled re-arm leaves the idle connection open forever."""

    async def shielded(message: dict) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return shielded


def _replay(kept: list[dict], receive: Any) -> Any:
    """A receive that hands out `kept` first, then reads on."""
    if not kept:
        return receive
    kept = list(kept)

    async def replay() -> dict:
        if kept:
            return kept.pop(0)
        return await receive()

    return replay


async def _respond(send: Any, status: int, body: dict, headers: list) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                # The body was not read: a connection reused after it could hang behind it.
                (b"connection", b"close"),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})
