"""A short soak (benchmarks/soak.py): ~150 requests over both APIs with random disconnects,
slow readers and hostile requests; afterwards nothing leaked, integrity holds, and the greedy
answer is unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from kvgrove.serve import background

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import soak


async def test_short_soak(tmp_path):
    model = soak.write_model(tmp_path / "llama")
    args = soak.parser().parse_args(["--requests", "150", "--clients", "12", "--seconds", "60"])
    with background(soak.soak_settings(model)) as bg:
        with trio.fail_after(120):
            report = await soak.run_soak(bg, args)
    print("\n" + report.table())
    assert report.bare_500s == 0
    assert report.memory_leaks == {}, report.memory_leaks
    assert report.integrity == [], report.integrity
    assert report.greedy_before == report.greedy_after
    assert report.requests >= 150
    out = report.outcomes
    assert out.get("errors", 0) == 0, report.details
    assert out.get("served", 0) > 0 and out.get("cancelled", 0) > 0 and out.get("rejected", 0) > 0


async def test_short_adversarial_soak(tmp_path):
    """Non-readers, slowloris, idle floods and queued leavers at 2x max-running beside normal
    traffic: normal requests keep being served, and afterwards nothing is held."""
    model = soak.write_model(tmp_path / "llama")
    args = soak.parser().parse_args(["--adversarial", "--phase-seconds", "3"])
    with background(soak.adversarial_settings(model)) as bg:
        with trio.fail_after(120):
            text, ok = await soak.run_adversarial(bg, args)
    print("\n" + text)
    assert ok, text
