"""Identical prompts arriving together: computed once (kvgrove shares an in-flight prefill) or
once per request (prefix cache off), on the real actors (scheduler, pager, executor).

`requests` requests with the same `prompt_tokens`-token prompt arrive at once; each generates
`output_tokens`. Printed per configuration: the wall time until all are done, time to first
token (median, max), the tokens the executor computed (prompt and decode), and the cached tokens
the requests report.

    .venv/bin/python benchmarks/shared_prefill.py [--requests 3 --prompt-tokens 400 ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import trio

from _common import prompt_of, table
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import Done, Failed, Submit, Token
from kvgrove.config import Settings
from kvgrove.sampling import SamplingParams


async def one_config(args, prefix_cache: bool) -> list[object]:
    settings = Settings(
        model=args.model,
        prefix_cache=prefix_cache,
        prefill_chunk_tokens=args.chunk_tokens,
        kv_cache_dir=tempfile.mkdtemp(prefix="kvgrove-bench-"),
    )
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings)  # the actors as served
        loaded, executor, scheduler = engine.loaded, engine.executor, engine.scheduler
        prompt = tuple(prompt_of(loaded.tokenizer, args.prompt_tokens))
        ttft, cached = [], []
        t0 = time.perf_counter()

        async def request(rid: int) -> None:
            send, recv = trio.open_memory_channel(64)
            params = SamplingParams(temperature=0)
            submit = Submit(rid, prompt, params, args.output_tokens, 8192, frozenset(), send)
            await scheduler.inbox.send(submit)
            first = True
            async for msg in recv:
                if isinstance(msg, Token) and first:
                    ttft.append(time.perf_counter() - t0)
                    first = False
                if isinstance(msg, Done):
                    cached.append(msg.cached_tokens)
                    return
                if isinstance(msg, Failed):
                    raise RuntimeError(msg.message)

        async with trio.open_nursery() as inner:
            for rid in range(1, args.requests + 1):
                inner.start_soon(request, rid)
        wall = time.perf_counter() - t0
        computed = executor.statistics().tokens_computed
        nursery.cancel_scope.cancel()
    name = "kvgrove, prefix cache on" if prefix_cache else "kvgrove, prefix cache off"
    return [
        name,
        wall,
        statistics.median(ttft),
        max(ttft),
        computed,
        args.requests * (args.prompt_tokens + args.output_tokens - 1),
        "/".join(str(c) for c in sorted(cached)),
    ]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model (default: the bundled one)")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--chunk-tokens", type=int, default=128)
    args = p.parse_args()
    rows = [await one_config(args, on) for on in (False, True)]
    headers = ["config", "wall s", "TTFT p50 s", "TTFT max s", "tokens computed"]
    headers += ["without sharing", "cached tokens"]
    print(
        f"{args.requests} identical {args.prompt_tokens}-token prompts at once, "
        f"{args.output_tokens} tokens each, prefill chunk {args.chunk_tokens}"
    )
    print(table(headers, rows))


if __name__ == "__main__":
    trio.run(main)
