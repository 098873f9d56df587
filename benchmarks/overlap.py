"""The decode overlap on the real actors: the executor launching step N+1 from step N's lazy
tokens (`decode_overlap="on"`) against waiting for each plan (off), in one run.

The actors are composed as serve.py does (accountant, executor, pager, scheduler; no HTTP), so
what is measured is the step loop: the executor's step, the scheduler's delivery and planning,
and the messages between them. At each concurrency c, c greedy requests with distinct prompts
start together and generate `--gen-tokens` each; aggregate tokens/s = generated tokens / wall
time of the wave (the best of `--repeats`). Also printed: the executor's overlapped steps, the
rows computed ahead and not taken (wasted row-steps), and whether both configurations produced
the same tokens (they must: greedy).

    .venv/bin/python benchmarks/overlap.py [--model FOLDER] [--levels 1,8,32] [--gen-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import trio

from _common import table
from kvgrove.actors.accountant import Accountant
from kvgrove.actors.executor import Executor
from kvgrove.actors.messages import Done, Failed, Submit, Token
from kvgrove.actors.pager import Pager
from kvgrove.actors.scheduler import Scheduler
from kvgrove.config import Settings
from kvgrove.sampling import SamplingParams


async def run_config(args, overlap: bool) -> tuple[list[list[object]], dict]:
    settings = Settings(
        model=args.model,
        decode_overlap="on" if overlap else "off",
        max_running_sequences=max(args.levels),
        kv_cache_dir=tempfile.mkdtemp(prefix="kvgrove-bench-"),
    )
    rows, outputs = [], {}
    async with trio.open_nursery() as nursery:
        accountant = Accountant(settings)
        await nursery.start(accountant.run)
        executor = Executor(settings, accountant=accountant.inbox.clone())
        loaded = await nursery.start(executor.run)
        pager = Pager(settings, mlx=executor.mlx, loaded=loaded, executor=executor.inbox.clone())
        await nursery.start(pager.run)
        scheduler = Scheduler(settings, executor=executor.inbox.clone(), pager=pager.inbox.clone())
        await nursery.start(scheduler.run)
        vocab = 256  # ids every tokenizer here has (the tiny test models have 320)
        rid = 0

        async def request(prompt: tuple[int, ...], key: tuple) -> None:
            nonlocal rid
            rid += 1
            send, recv = trio.open_memory_channel(args.gen_tokens + 8)
            params = SamplingParams(temperature=0)
            await scheduler.inbox.send(
                Submit(rid, prompt, params, args.gen_tokens, 4096, frozenset(), send)
            )
            got = []
            async for msg in recv:
                if isinstance(msg, Token):
                    got.append(msg.token)
                elif isinstance(msg, Done | Failed):
                    break
            outputs[key] = got

        for c in args.levels:
            best, before = 0.0, executor.statistics()
            for rep in range(args.repeats):
                # Distinct prompts (the unique tokens first: no prefix is shared).
                prompts = [
                    tuple((7919 * (i + 1) * (j + 3) + rep) % (vocab - 10) + 5 for j in range(24))
                    for i in range(c)
                ]
                t0 = time.perf_counter()
                async with trio.open_nursery() as wave:
                    for i, p in enumerate(prompts):
                        wave.start_soon(request, p, (c, rep, i))
                wall = time.perf_counter() - t0
                made = sum(len(outputs[(c, rep, i)]) for i in range(c))
                best = max(best, made / wall)
            after = executor.statistics()
            rows.append(
                [
                    c,
                    "on" if overlap else "off",
                    f"{best:.0f}",
                    after.overlapped_steps - before.overlapped_steps,
                    after.wasted_row_steps - before.wasted_row_steps,
                    after.steps - before.steps,
                ]
            )
        nursery.cancel_scope.cancel()
    return rows, outputs


async def main(args) -> None:
    on_rows, on_out = await run_config(args, True)
    off_rows, off_out = await run_config(args, False)
    rows = [r for pair in zip(off_rows, on_rows, strict=True) for r in pair]
    print(
        table(
            ["concurrency", "overlap", "tok/s", "overlapped steps", "wasted row-steps", "steps"],
            rows,
        )
    )
    print(f"greedy tokens identical with and without the overlap: {on_out == off_out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    parser.add_argument("--levels", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    trio.run(main, parser.parse_args())
