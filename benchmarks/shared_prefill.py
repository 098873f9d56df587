"""Prompts sharing a prefix arriving together, on the real actors (scheduler, pager, executor).

`requests` requests with the same `prompt_tokens`-token prompt arrive at once; each generates
`output_tokens`: computed once (kvgrove shares an in-flight prefill) or once per request (prefix
cache off). With `--question-tokens Q`, the shared prompt is a system prompt or document that
one earlier request already left in the prefix cache, and each request adds its own Q-token
question: the prefills of the questions after the restored prefix (prefilled together in one
pass where they fit, see `StepRunner._launch_prefill_together`). Printed per configuration: the
wall time until all are done, time to first token (median, max), the tokens the executor
computed (prompt and decode, the earlier request's not counted), and the cached tokens the
requests report.

    .venv/bin/python benchmarks/shared_prefill.py [--requests 3 --prompt-tokens 400 ...]
    .venv/bin/python benchmarks/shared_prefill.py --requests 8 --prompt-tokens 1700 \
        --question-tokens 20 --chunk-tokens 2048
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

from _common import FILLER, prompt_of, table
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
        prompts = wave_prompts(loaded.tokenizer, args)
        ttft, cached = [], []
        t0 = 0.0

        async def request(rid: int, prompt: tuple[int, ...], timed: bool = True) -> None:
            send, recv = trio.open_memory_channel(64)
            params = SamplingParams(temperature=0)
            submit = Submit(rid, prompt, params, args.output_tokens, 8192, frozenset(), send)
            await scheduler.inbox.send(submit)
            first = True
            async for msg in recv:
                if isinstance(msg, Token) and first and timed:
                    ttft.append(time.perf_counter() - t0)
                    first = False
                if isinstance(msg, Done):
                    if timed:
                        cached.append(msg.cached_tokens)
                    return
                if isinstance(msg, Failed):
                    raise RuntimeError(msg.message)

        before = 0
        if args.question_tokens:  # an earlier request leaves the shared prompt in the cache
            await request(0, prompts[0], timed=False)
            before = executor.statistics().tokens_computed
        t0 = time.perf_counter()
        async with trio.open_nursery() as inner:
            for rid, prompt in enumerate(prompts[1:], start=1):
                inner.start_soon(request, rid, prompt)
        wall = time.perf_counter() - t0
        computed = executor.statistics().tokens_computed - before
        nursery.cancel_scope.cancel()
    name = "kvgrove, prefix cache on" if prefix_cache else "kvgrove, prefix cache off"
    return [
        name,
        wall,
        statistics.median(ttft),
        max(ttft),
        computed,
        sum(len(p) + args.output_tokens - 1 for p in prompts[1:]),
        "/".join(str(c) for c in sorted(cached)),
    ]


def wave_prompts(tokenizer, args) -> list[tuple[int, ...]]:
    """The earlier request's prompt, then the wave's: the shared prompt alone (identical), or
    followed by each one's own question, whose first tokens differ (a common first token would
    make the others wait for one to prefill it, see `kvgrove.scheduling.sharing`)."""
    shared = tuple(prompt_of(tokenizer, args.prompt_tokens))
    if not args.question_tokens:
        return [shared] * (args.requests + 1)
    filler = tokenizer.encode(FILLER)
    firsts = list(dict.fromkeys(filler))
    assert len(firsts) > args.requests, "more requests than distinct first tokens"
    n = args.question_tokens
    return [
        (*shared, firsts[i], *(filler[(5 * i + j) % len(filler)] for j in range(1, n)))
        for i in range(args.requests + 1)
    ]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model (default: the bundled one)")
    p.add_argument("--requests", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=400)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--chunk-tokens", type=int, default=128)
    p.add_argument(
        "--question-tokens",
        type=int,
        default=0,
        help="each request's own question after the cached shared prompt (0: identical prompts)",
    )
    p.add_argument("--configs", default="off,on", help="prefix cache off / on, in this order")
    args = p.parse_args()
    rows = [await one_config(args, name == "on") for name in args.configs.split(",")]
    headers = ["config", "wall s", "TTFT p50 s", "TTFT max s", "tokens computed"]
    headers += ["without sharing", "cached tokens"]
    what = f"{args.requests} identical {args.prompt_tokens}-token prompts"
    if args.question_tokens:
        what = (
            f"{args.requests} prompts of a cached {args.prompt_tokens}-token prefix "
            f"+ {args.question_tokens} tokens each"
        )
    print(f"{what} at once, {args.output_tokens} tokens each, prefill chunk {args.chunk_tokens}")
    print(table(headers, rows))


if __name__ == "__main__":
    trio.run(main)
