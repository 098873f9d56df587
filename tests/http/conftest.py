"""One live kvgrove on a loopback port for the whole session, with the real default model.

It is serve.py's own `background`: the server runs trio in its own thread; tests reach it over
HTTP with real clients, and read its actors' statistics on its own trio thread through
`on_server`. `oa` and `ol` are the real `openai` and `ollama` clients of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import openai
import pytest

from kvgrove.config import Settings
from kvgrove.serve import Background, background


@pytest.fixture(scope="session")
def live_server() -> Iterator[Background]:
    settings = Settings(port=0, prefill_chunk_tokens=256, shutdown_grace_seconds=1.0)
    with background(settings) as bg:
        yield bg


@pytest.fixture(scope="module")
def oa(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def ol(live_server) -> ollama.Client:
    return ollama.Client(host=live_server.url, timeout=120)
