"""The opt-in timeline (`--timeline-file`): a wave of requests over a real server is recorded
and `benchmarks/timeline.py` finds the wave and its phases in it."""

from __future__ import annotations

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kvgrove import timeline
from kvgrove.config import Settings
from kvgrove.serve import background
from tiny_models import write_decodable_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from timeline import load, report
from timeline import waves as split

ROWS = 8


def test_a_wave_is_recorded_and_summarized(tmp_path):
    model = write_decodable_llama(tmp_path / "llama")
    settings = Settings(
        port=0,
        model=str(model),
        shutdown_grace_seconds=0.5,
        kv_cache_dir=tempfile.mkdtemp(prefix="kvgrove-test-timeline-kv-"),
    )
    body = {"model": "llama", "options": {"temperature": 0, "num_predict": 12}, "stream": False}
    timeline.start()
    try:
        with background(settings) as bg:

            def ask(i: int) -> int:
                r = httpx.post(
                    f"{bg.url}/api/generate", json={**body, "prompt": f"w {i}"}, timeout=60
                )
                return r.json()["eval_count"]

            with ThreadPoolExecutor(ROWS) as pool:
                counts = list(pool.map(ask, range(ROWS)))
    finally:
        path = tmp_path / "t.jsonl"
        written = timeline.stop(str(path))
    assert timeline.recorder is None  # off again: nothing more is recorded
    assert written > 0 and counts == [12] * ROWS
    kinds = {e["kind"] for e in load(path)}
    assert {"submit", "plan", "exec", "step", "mlx", "store"} <= kinds
    submits = [e for e in load(path) if e["kind"] == "submit"]
    assert len(submits) == ROWS
    # The requests arrive from threads: a fast one may end before the last arrives, and the
    # batch emptying between them splits the burst into more waves. Together they hold all.
    waves = [w for w in split(load(path), 1) if any(e["kind"] == "submit" for e in w)]
    assert sum(e["kind"] == "submit" for w in waves for e in w) == ROWS
    text = report(path, min_requests=1)
    heads = [line for line in text.splitlines() if line.startswith("wave of ")]
    assert len(heads) == len(waves) >= 1, text
    assert sum(int(h.split()[2].rstrip(":")) for h in heads) == ROWS, text
    assert "MLX thread busy" in text and "pager rounds" in text


def test_a_timeline_file_that_cannot_be_written_fails_at_start_not_after_serving(tmp_path):
    from kvgrove import serve

    bad = tmp_path / "no such folder" / "t.jsonl"
    settings = Settings(port=0, timeline_file=str(bad))
    with pytest.raises(SystemExit, match="cannot write"):
        serve.main(settings)
    assert timeline.recorder is None and not bad.exists()
