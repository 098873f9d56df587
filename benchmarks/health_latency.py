"""/health latency while a 2,000-token prompt is being prefilled.

Starts `python -m kvgrove.serve` on a free loopback port with the default model, sends one
generation whose prompt is ~2,000 tokens (num_predict 1), and polls /health every 20 ms until
it finishes. Prints p50 / p99 / max of the health round trips, next to an idle baseline.

    .venv/bin/python benchmarks/health_latency.py [--prompt-tokens 2000] [--chunk-tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import httpx
import trio

from _servers import free_port, pct


async def poll(client: httpx.AsyncClient, until: trio.Event, out: list[float]) -> None:
    while not until.is_set():
        start = time.perf_counter()
        r = await client.get("/health")
        out.append(time.perf_counter() - start)
        assert r.status_code == 200, r.text
        await trio.sleep(0.02)


async def run(url: str, prompt_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        idle: list[float] = []
        done = trio.Event()
        with trio.move_on_after(2):
            await poll(client, done, idle)
        # "hello " is one token per repeat for SmolLM2's tokenizer (raw, no template).
        body = {
            "model": "smollm2",
            "prompt": "hello " * prompt_tokens,
            "raw": True,
            "stream": False,
            "options": {"temperature": 0, "num_predict": 1, "num_ctx": prompt_tokens + 64},
        }
        busy: list[float] = []
        result: dict = {}

        async def generate() -> None:
            r = await client.post("/api/generate", json=body)
            result.update(r.json())
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(generate)
            nursery.start_soon(poll, client, done, busy)

    prefill_s = result["prompt_eval_duration"] / 1e9
    print(f"prompt: {result['prompt_eval_count']} tokens, prefill {prefill_s:.2f} s")
    print(f"{'phase':<10} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, values in (("idle", idle), ("prefill", busy)):
        ms = [v * 1000 for v in values]
        print(
            f"{name:<10} {len(ms):>5} {statistics.median(ms):>8.1f} {pct(ms, 0.99):>8.1f} "
            f"{max(ms):>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--chunk-tokens", type=int, default=2048)
    args = parser.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "kvgrove.serve", "--port", str(port)]
    cmd += ["--prefill-chunk-tokens", str(args.chunk_tokens)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        trio.run(run, url, args.prompt_tokens)
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
