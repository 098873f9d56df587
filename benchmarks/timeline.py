"""Where a wave's time goes: reads the timeline `kvgrove serve --timeline-file` writes.

    python benchmarks/timeline.py TIMELINE.jsonl [--min-requests 8]

A wave is a burst of submitted requests (the next burst starts after a step with no decode
rows left); for each, with at least --min-requests requests, it prints one line per phase:

- admission: first submit to the first step whose batch holds every request of the wave, the
  steps in between (prefill groups, joins);
- decode: the steps where the whole wave decodes (per step: wall, the part the MLX thread waits
  on the device, the launch, the run-ahead's launch, the host's gap between steps);
- tail: from the last such step to the end of the wave's last step (releases, stores).

And the MLX thread's busy seconds by function over the wave, with its idle share, and Python's
garbage collections during the wave (they stop every thread).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
from pathlib import Path


def load(path: Path) -> list[dict]:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    events.sort(key=lambda e: e["at"])
    return events


def waves(events: list[dict], min_requests: int) -> list[list[dict]]:
    """Events split where a burst of submits starts after the batch emptied."""
    out: list[list[dict]] = []
    current: list[dict] = []
    idle = True  # no decode rows since the last burst
    for e in events:
        if e["kind"] in ("submit", "request") and idle and current:
            out.append(current)
            current = []
        if e["kind"] in ("submit", "request"):
            idle = False
        if e["kind"] == "step" and e["decode"] == 0 and e["others"] == 0:
            idle = True
        current.append(e)
    out.append(current)
    return [w for w in out if sum(e["kind"] == "submit" for e in w) >= min_requests]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def summarize(wave: list[dict]) -> list[str]:
    submits = [e for e in wave if e["kind"] == "submit"]
    steps = [e for e in wave if e["kind"] == "step"]
    n = len(submits)
    lines = []
    t0 = submits[0]["at"]
    end = max(e.get("end", e["at"]) for e in wave if e["kind"] in ("step", "mlx", "store"))
    lines.append(
        f"wave of {n}: {ms(end - t0)} ms from first submit to the last step's end; submits "
        f"spread over {ms(submits[-1]['at'] - t0)} ms"
    )
    if requests := [e for e in wave if e["kind"] == "request"]:
        # The HTTP handlers' starts (before the body is read): the client's and the HTTP
        # server's share of the spread, against the handlers' (parse, tokenize, submit).
        lines.append(
            f"  HTTP requests: {len(requests)} handlers started over "
            f"{ms(requests[-1]['at'] - requests[0]['at'])} ms, the first "
            f"{ms(t0 - requests[0]['at'])} ms before the first submit, the last "
            f"{ms(submits[-1]['at'] - requests[-1]['at'])} ms before the last"
        )
    full = [i for i, s in enumerate(steps) if s["decode"] >= n]
    first_full = full[0] if full else len(steps)
    admit = steps[:first_full]
    if admit:
        lines.append(
            f"  admission: {ms(steps[first_full]['at'] - t0 if full else end - t0)} ms, "
            f"{len(admit)} steps; prefill items {sum(s['others'] for s in admit)} "
            f"({sum(s['together'] for s in admit)} together); "
            f"step walls (ms) {', '.join(ms(s['end'] - s['at']) for s in admit[:12])}"
        )
    dec = [s for s in steps[first_full:] if s["decode"] >= n and s["others"] == 0]
    if dec:
        walls = [s["end"] - s["at"] for s in dec]
        # phases: decode launched, together launched, alone done, prefilled, ahead, decoded
        launch = [s["phases"][0] - s["at"] for s in dec]
        ahead = [s["phases"][4] - s["phases"][3] for s in dec]
        wait = [s["phases"][5] - s["phases"][4] for s in dec]
        gaps = [b["at"] - a["end"] for a, b in itertools.pairwise(dec)]
        span = dec[-1]["end"] - dec[0]["at"]
        lines.append(
            f"  decode: {len(dec)} steps of {n} rows in {ms(span)} ms = {ms(span / len(dec))} ms "
            f"per step; per step (median ms) wall {ms(med(walls))}, launch {ms(med(launch))}, "
            f"ahead launch {ms(med(ahead))}, device wait {ms(med(wait))}, gap between steps "
            f"{ms(med(gaps))} (max {ms(max(gaps, default=0))}); ran ahead "
            f"{sum(s['ran_ahead'] for s in dec)}, fused {sum(s['fused'] for s in dec)}"
        )
        tail_start = dec[-1]["end"]
        tail = [s for s in steps if s["at"] >= tail_start]
        stores = [e for e in wave if e["kind"] == "store" and e["at"] >= tail_start]
        keeps, seconds = sum(e["keeps"] for e in stores), sum(e["end"] - e["at"] for e in stores)
        lines.append(
            f"  tail: {ms(end - tail_start)} ms, {len(tail)} steps; stores {len(stores)} "
            f"({keeps} keeps) {ms(seconds)} ms"
        )
    busy: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for e in wave:
        if e["kind"] == "mlx":
            busy[e["label"]] += e["end"] - e["at"]
            calls[e["label"]] += 1
    total = sum(busy.values())
    lines.append(
        f"  MLX thread busy {ms(total)} ms of {ms(end - t0)} ({100 * total / (end - t0):.0f}%): "
        + ", ".join(f"{k} {ms(v)} ({calls[k]})" for k, v in busy.most_common(6))
    )
    stores = [e for e in wave if e["kind"] == "store"]
    restores = [e for e in wave if e["kind"] == "restore"]
    lines.append(
        f"  pager rounds: {len(stores)} stores {ms(sum(e['end'] - e['at'] for e in stores))} ms, "
        f"{len(restores)} restores {ms(sum(e['end'] - e['at'] for e in restores))} ms; steps "
        f"{len(steps)}, plans {sum(e['kind'] == 'plan' for e in wave)}"
    )
    collections_ = [e for e in wave if e["kind"] == "gc"]
    if collections_:
        longest = max(collections_, key=lambda e: e["end"] - e["at"])
        per_gen = collections.Counter(e["generation"] for e in collections_)
        lines.append(
            f"  garbage collections: {len(collections_)} "
            f"({', '.join(f'gen {g}: {k}' for g, k in sorted(per_gen.items()))}), "
            f"{ms(sum(e['end'] - e['at'] for e in collections_))} ms in all, longest "
            f"{ms(longest['end'] - longest['at'])} ms (gen {longest['generation']})"
        )
    return lines


def report(path: Path, min_requests: int = 8) -> str:
    out = []
    for w in waves(load(path), min_requests):
        out.extend(summarize(w))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("timeline", type=Path)
    ap.add_argument("--min-requests", type=int, default=8)
    args = ap.parse_args()
    print(report(args.timeline, args.min_requests))


if __name__ == "__main__":
    main()
