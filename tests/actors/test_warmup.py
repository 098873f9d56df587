"""The start-up warm-up: it runs through the real scheduler before the server says ready, leaves
no trace a client can see (metrics, cached prompts), and `kvgrove serve` can skip it."""

from __future__ import annotations

import argparse
import json
from functools import partial

import httpx
import pytest
import trio

from kvgrove import timeline
from kvgrove.config import Settings, add_serve_arguments, settings_from_args
from kvgrove.serve import serve
from tiny_models import write_tiny_model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama"))


def test_serve_warms_up_unless_told_not_to(monkeypatch):
    monkeypatch.delenv("KVGROVE_WARM_UP", raising=False)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert settings_from_args(parser.parse_args([])).warm_up is True
    assert settings_from_args(parser.parse_args(["--no-warm-up"])).warm_up is False
    monkeypatch.setenv("KVGROVE_WARM_UP", "0")
    assert settings_from_args(parser.parse_args([])).warm_up is False
    assert Settings().warm_up is False  # servers built in code (the tests) skip it
    assert settings_from_args(parser.parse_args([])).cudnn_attention is False
    assert settings_from_args(parser.parse_args(["--cudnn-attention"])).cudnn_attention is True


async def _first_answer(tiny_llama: str, tmp_path, warm_up: bool) -> tuple[dict, dict, str]:
    settings = Settings(
        port=0,
        model=tiny_llama,
        shutdown_grace_seconds=0.5,
        kv_cache_dir=str(tmp_path / ("warm" if warm_up else "cold")),
        warm_up=warm_up,
    )
    body = {
        "model": "llama",
        "prompt": "Warm-up: the quick brown fox jumps over the lazy dog",
        "stream": False,
        "options": {"num_predict": 6, "temperature": 0},
    }
    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve, settings, handle_signals=False))
        with trio.fail_after(60):
            await server.ready.wait()
        scheduler = server.runtime.actors["scheduler"].statistics()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            answer = (await c.post("/api/generate", json=body)).json()
            metrics = (await c.get("/metrics")).text
        server.shutdown.set()
    return answer, {"completed": scheduler.completed}, metrics


def _partial_releases(events: list[dict]) -> int:
    """Steps that released rows while others stayed in the batch (a `begin` that released,
    then its step decoded rows)."""
    events = sorted(events, key=lambda e: e["at"])
    count, released = 0, False
    for e in events:
        if e["kind"] == "begin":
            released = e["release"] > 0
        elif e["kind"] == "step":
            count += released and e["decode"] > 0
            released = False
    return count


async def test_warm_up_runs_before_ready_and_changes_nothing_a_client_sees(tiny_llama, tmp_path):
    timeline.start()
    try:
        warm, warm_stats, metrics = await _first_answer(tiny_llama, tmp_path, warm_up=True)
    finally:
        path = tmp_path / "warm.jsonl"
        timeline.stop(str(path))
    events = [json.loads(line) for line in path.read_text().splitlines()]
    cold, cold_stats, _ = await _first_answer(tiny_llama, tmp_path, warm_up=False)
    # The warm-up's generations (one alone, then a wave of four) ran through the scheduler
    # before ready; the cold server had run none.
    assert warm_stats["completed"] == 5 and cold_stats["completed"] == 0
    # Rows left the batch while others stayed (their own kernels): only the warm-up's wave has
    # several rows (the one client request decodes alone).
    assert _partial_releases(events) >= 1, events
    assert warm["response"] == cold["response"]  # greedy output unchanged
    # Its prompts are cached under a namespace no request can name: nothing is reused.
    assert warm["prompt_cache_count"] == cold["prompt_cache_count"] == 0
    assert 'kvgrove_requests_total{api="ollama",outcome="ok"} 1' in metrics
