"""One live kvgrove on a loopback port for the whole session, with the real default model.

The server runs trio in its own thread; tests reach it over HTTP with real clients, and read its
actors' statistics on its own trio thread through `on_server`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
import trio

from kvgrove.config import Settings
from kvgrove.serve import Server, serve


class LiveServer:
    def __init__(self, server: Server, token: trio.lowlevel.TrioToken) -> None:
        self.server = server
        self.token = token
        self.url = server.url

    def on_server(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's trio thread (its actors' state is only read there)."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    @property
    def runtime(self):
        return self.server.runtime


@pytest.fixture(scope="session")
def live_server() -> Iterator[LiveServer]:
    settings = Settings(port=0, prefill_chunk_tokens=256, shutdown_grace_seconds=1.0)
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, settings, handle_signals=False))
            box["server"] = server
            box["token"] = trio.lowlevel.current_trio_token()
            await server.ready.wait()
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # surface startup failures to the fixture
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=run, name="kvgrove-test-server", daemon=True)
    thread.start()
    assert ready.wait(300), "server did not become ready"
    if "error" in box:
        raise box["error"]
    live = LiveServer(box["server"], box["token"])
    yield live
    live.token.run_sync_soon(live.server.shutdown.set)
    thread.join(30)
