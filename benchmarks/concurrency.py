"""Aggregate throughput and time to first token under concurrency: kvgrove vs mlx-lm's server.

Three servers on free loopback ports, one after another (never two at once, so they do not
share the CPU), each with the same model: kvgrove with continuous batching, kvgrove with
batching disabled (`--max-running-sequences 1`), and `mlx_lm.server` (which batches too), run
with kvgrove's OpenBLAS preload so both use the same BLAS. mlx-lm needs a model folder: the
loaded default model is written once as an MLX folder into kvgrove's cache.

At each concurrency c, c streaming /v1/completions requests with distinct prompts (the unique
part first, so no prefix cache helps) start together; aggregate tokens/s = all generated tokens
/ wall time of the wave, TTFT from each request's send to its first text chunk. Greedy.

    .venv/bin/python benchmarks/concurrency.py [--gen-tokens 32] [--levels 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import httpx
import trio

from _client import completion_body
from _common import FILLER, table
from _servers import free_port, mlx_folder, pct, start_kvgrove, start_mlx_lm, stop, wait_ready


def start(kind: str, port: int, model: str | None, folder: Path) -> subprocess.Popen:
    if kind == "mlx-lm server":
        return start_mlx_lm(port, folder)
    flags = ["--max-running-sequences", "1"] if kind == "kvgrove (max batch 1)" else []
    return start_kvgrove(port, model, flags)


# mlx-lm's server (socketserver, listen backlog 5) resets some of 16 simultaneous connections:
# such a request is retried, its TTFT still counted from the first send, and the resets reported.
RETRIES = 5


async def one(client, model: str, prompt: str, gen_tokens: int, resets: list[int]):
    """(TTFT seconds, generated tokens) of one streaming completion."""
    sent = time.perf_counter()
    for attempt in range(RETRIES + 1):
        try:
            return await _one(client, model, prompt, gen_tokens, sent)
        except httpx.TransportError:
            if attempt == RETRIES:
                raise
            resets.append(1)
            await trio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def _one(client, model: str, prompt: str, gen_tokens: int, sent: float):
    body = completion_body(model, prompt, gen_tokens)
    ttft = None
    chunks = 0
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                usage = msg["usage"]
            if any(c.get("text") for c in msg.get("choices", [])):
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - sent
    generated = usage["completion_tokens"] if usage else chunks
    return ttft if ttft is not None else float("nan"), generated


async def wave(url: str, model: str, c: int, gen_tokens: int, tag: int) -> dict:
    results: list[tuple[float, int]] = []
    resets: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def run(i: int) -> None:
            prompt = f"Note {tag}-{i}. " + FILLER
            results.append(await one(client, model, prompt, gen_tokens, resets))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(c):
                nursery.start_soon(run, i)
        wall = time.perf_counter() - start
    ttfts = [t for t, _ in results]
    generated = sum(n for _, n in results)
    return {
        "tokens_per_second": generated / wall,
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p90": pct(ttfts, 0.9),
        "generated": generated,
        "wall": wall,
        "resets": len(resets),
    }


async def bench(kind, model, name, folder, levels, gen_tokens) -> dict[int, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(kind, port, model, folder)
    try:
        await wait_ready(url, proc)
        served = str(folder) if kind == "mlx-lm server" else name
        await wave(url, served, 1, 4, tag=0)  # warm up
        out = {}
        for c in levels:
            out[c] = await wave(url, served, c, gen_tokens, tag=c)
            r = out[c]
            print(
                f"{kind:24} c={c:<3} {r['tokens_per_second']:7.1f} tok/s  "
                f"TTFT p50 {r['ttft_p50']:.2f}s p90 {r['ttft_p90']:.2f}s  "
                f"({r['generated']} tokens in {r['wall']:.1f}s, {r['resets']} resets)",
                flush=True,
            )
        return out
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="kvgrove model name (default: bundled)")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,16")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    name, folder = mlx_folder(args.model)
    kinds = ("kvgrove", "kvgrove (max batch 1)", "mlx-lm server")
    results = {
        kind: trio.run(bench, kind, args.model, name, folder, levels, args.gen_tokens)
        for kind in kinds
    }
    kv, one_, ml = (results[k] for k in kinds)
    rows = []
    for c in levels:
        rows.append(
            [
                c,
                kv[c]["tokens_per_second"],
                one_[c]["tokens_per_second"],
                ml[c]["tokens_per_second"],
                f"{kv[c]['tokens_per_second'] / kv[levels[0]]['tokens_per_second']:.2f}x",
                f"{kv[c]['tokens_per_second'] / one_[c]['tokens_per_second']:.2f}x",
                f"{kv[c]['tokens_per_second'] / ml[c]['tokens_per_second']:.2f}x",
            ]
        )
    print(f"\nModel {name}, {args.gen_tokens} generated tokens per request, greedy.\n")
    print("Aggregate generated tokens/s\n")
    print(
        table(
            [
                "concurrency",
                "kvgrove",
                "kvgrove max batch 1",
                "mlx-lm server",
                f"kvgrove vs c={levels[0]}",
                "kvgrove / max batch 1",
                "kvgrove / mlx-lm",
            ],
            rows,
        )
    )
    print("\nTime to first token, p50 / p90 (seconds)\n")
    print(
        table(
            ["concurrency", *kinds],
            [
                [c, *(f"{r[c]['ttft_p50']:.2f} / {r[c]['ttft_p90']:.2f}" for r in (kv, one_, ml))]
                for c in levels
            ],
        )
    )
    resets = {k: sum(results[k][c]["resets"] for c in levels) for k in kinds}
    print(f"\nConnections reset by the server and retried: {resets}")


if __name__ == "__main__":
    main()
