"""Is a short cached or shared prefix worth restoring? (`Settings.min_prefix_tokens`)

A wave of `--requests` prompts arrives at once, each `k` shared tokens + `--unique` tokens of
its own, one greedy token each (so the wave is its admission and prefill). Two cases:

- cached: the k shared tokens are in the prefix cache (an earlier prompt): with the minimum
  off each prompt restores k tokens and prefills the rest on its own; with it on, all prefill
  in one left-padded pass;
- cold: nothing is cached, the prompts share k tokens among themselves: with the minimum off
  the followers wait for the first one's prefill, match again, restore k and prefill the rest
  on their own; with it on, all prefill together.

Each (case, k) runs `--waves` waves per setting, the two settings alternating on one engine (the
minimum is switched on its running scheduler core between waves; the machine is shared: a ratio
within one run holds, absolute figures move with the load). Printed: the median wave time,
restore / recompute, the executor's steps and the model's prefill passes per wave.

    PYTHONPATH=src .venv/bin/python benchmarks/min_prefix.py [--ks 4,8,16,32,64,128]
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import tempfile
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import trio

from _common import table
from kvgrove.actors.engine import start_engine
from kvgrove.actors.messages import Done, Failed, Submit
from kvgrove.config import Settings
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams

OFF = 0  # restore and wait for any prefix (the behaviour before the setting)
NEVER = 10**9  # restore nothing: recompute every prompt in full


class Counting:
    """The model, its prefill passes (more than one position) counted: on an accelerator each
    costs about the same whatever it holds, so their number is what the wave costs there."""

    def __init__(self, inner):
        self.inner = inner
        self.prefills = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, inputs, cache=None):
        self.prefills += inputs.shape[1] > 1
        return self.inner(inputs, cache=cache)


def counting_load(name):
    loaded = load(name)
    loaded.model = Counting(loaded.model)
    return loaded


async def wave(engine, prompts, rids) -> float:
    async def one(rid, prompt):
        send, recv = trio.open_memory_channel(8)
        params = SamplingParams(temperature=0)
        await engine.scheduler.inbox.send(
            Submit(rid, tuple(prompt), params, 1, 4096, frozenset(), send)
        )
        async for msg in recv:
            if isinstance(msg, Failed):
                raise RuntimeError(msg.message)
            if isinstance(msg, Done):
                return

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for rid, p in zip(rids, prompts, strict=True):
            nursery.start_soon(one, rid, p)
    return time.perf_counter() - t0


async def main(args) -> None:
    settings = Settings(
        model=args.model,
        kv_cache_dir=tempfile.mkdtemp(prefix="kvgrove-bench-"),
        max_running_sequences=max(32, args.requests),
        prefill_chunk_tokens=args.chunk_tokens,
    )
    rng = random.Random(0)
    vocab = (1000, 20000)

    def toks(n):
        return [rng.randrange(*vocab) for _ in range(n)]

    rids = itertools.count(1)
    rows = []
    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings, loader=counting_load)
        core = engine.scheduler.core
        model = engine.loaded.model
        # Warm-up: compile what both paths use.
        for minimum in (OFF, NEVER, OFF):
            core.min_prefix_tokens = minimum
            shared = toks(16)
            await wave(engine, [shared + toks(args.unique)], [next(rids)])
            ps = [shared + toks(args.unique) for _ in range(args.requests)]
            await wave(engine, ps, [next(rids) for _ in ps])
        for case in args.cases.split(","):
            for k in (int(x) for x in args.ks.split(",")):
                times = {OFF: [], NEVER: []}
                steps = {OFF: [], NEVER: []}
                passes = {OFF: [], NEVER: []}
                shared = toks(k)
                for _ in range(args.waves):
                    for minimum in (OFF, NEVER):
                        core.min_prefix_tokens = minimum
                        if case == "cold":
                            shared = toks(k)
                        else:  # the shared tokens are cached (restore points inside them too)
                            await wave(engine, [shared + toks(args.unique)], [next(rids)])
                        ps = [shared + toks(args.unique) for _ in range(args.requests)]
                        before = engine.executor.statistics().steps, model.prefills
                        times[minimum].append(await wave(engine, ps, [next(rids) for _ in ps]))
                        steps[minimum].append(engine.executor.statistics().steps - before[0])
                        passes[minimum].append(model.prefills - before[1])
                off, never = (statistics.median(times[m]) for m in (OFF, NEVER))
                rows.append(
                    [
                        case,
                        k,
                        off * 1000,
                        never * 1000,
                        off / never,
                        statistics.median(steps[OFF]),
                        statistics.median(steps[NEVER]),
                        statistics.median(passes[OFF]),
                        statistics.median(passes[NEVER]),
                    ]
                )
                print(
                    case, k, {m: [round(t, 2) for t in ts] for m, ts in times.items()}, flush=True
                )
        nursery.cancel_scope.cancel()
    print(
        f"\n{args.requests} prompts of k shared + {args.unique} own tokens, 1 token each, "
        f"median of {args.waves} waves\n"
    )
    headers = [
        "case",
        "k",
        "restore ms",
        "recompute ms",
        "restore / recompute",
        "steps (restore)",
        "steps (recompute)",
        "prefill passes (restore)",
        "prefill passes (recompute)",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--unique", type=int, default=40)
    p.add_argument("--chunk-tokens", type=int, default=2048)
    p.add_argument("--waves", type=int, default=5)
    p.add_argument("--ks", default="4,8,16,32,64,128")
    p.add_argument("--cases", default="cached,cold")
    trio.run(main, p.parse_args())
