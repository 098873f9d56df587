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
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import httpx
import trio

from _common import FILLER, table

ROOT = Path(__file__).resolve().parent.parent
MLX_LM_SERVER = "import kvgrove, runpy; runpy.run_module('mlx_lm.server', run_name='__main__')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mlx_folder(model: str | None) -> tuple[str, Path]:
    """The model as an MLX folder (weights, config, tokenizer), written once into the cache."""
    from mlx_lm.utils import save_config, save_model

    from kvgrove.models.loading import load
    from kvgrove.paths import cache_dir

    lm = load(model)
    folder = cache_dir() / "bench" / f"{lm.info.name}-{lm.info.fingerprint}-mlx"
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, lm.model)
        lm.tokenizer.backend.tok.save(str(folder / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": lm.tokenizer.eos_token,
            "bos_token": lm.tokenizer.bos_token,
            "chat_template": lm.tokenizer.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        save_config(dict(lm.config), folder / "config.json")  # last: marks the folder complete
    return lm.info.name, folder


def start(kind: str, port: int, model: str | None, folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if kind == "mlx-lm server":
        argv = [sys.executable, "-c", MLX_LM_SERVER, "--model", str(folder)]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
    else:
        argv = [sys.executable, "-m", "kvgrove.serve", "--port", str(port)]
        argv += ["--model", model] if model else []
        if kind == "kvgrove (max batch 1)":
            argv += ["--max-running-sequences", "1"]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        with trio.fail_after(300):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}")
                try:
                    if (await client.get("/v1/models")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.25)


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
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": gen_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
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
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


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
