"""On a GPU: does a second evaluation per token cost the host? One greedy decode loop, three ways.

    python3 benchmarks/evals_per_token.py [--shape llama-3.1-8b] [--batches 1,64] [--steps 64]

- one graph: forward and argmax in one graph, one async_eval per token (mlx-lm's generate_step);
- split, in order: the forward async_eval'd, then the argmax async_eval'd (two per token);
- run ahead (kvgrove's runner): the argmax of step k async_eval'd, the forward of step k+1 built
  on its lazy tokens and async_eval'd, then step k's tokens read.

Random bf16 weights of the shape, in memory; a plain KVCache with the batch as its first axis.
Prints tok/s per way and batch, each after a run that compiles.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from gpu_server import SHAPES, VOCAB, random_model


def run(model, way: str, b: int, steps: int) -> float:
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.random.randint(0, VOCAB - 1, (b, 16)), cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    t = time.perf_counter()
    if way == "one graph":
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.async_eval(y)
        for _ in range(steps - 1):
            nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
    elif way == "split":
        for _ in range(steps):
            logits = model(y[:, None], cache=cache)
            mx.async_eval(logits)
            nxt = mx.argmax(logits[:, -1], axis=-1)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
    else:  # run ahead
        logits = model(y[:, None], cache=cache)
        mx.async_eval(logits)
        for _ in range(steps):
            tok = mx.argmax(logits[:, -1], axis=-1)
            mx.async_eval(tok)
            logits = model(tok[:, None], cache=cache)
            mx.async_eval(logits)
            tok.tolist()
    return steps * b / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    model, _ = random_model(args.shape)
    ways = ("one graph", "split", "run ahead")
    print("| batch | " + " | ".join(ways) + " | run ahead / one graph |")
    print("|---|---|---|---|---|")
    for b in (int(x) for x in args.batches.split(",")):
        got = {}
        for way in ways:
            run(model, way, b, 8)  # compiles
            got[way] = max(run(model, way, b, args.steps) for _ in range(3))
        cells = " | ".join(f"{got[w]:,.0f}" for w in ways)
        print(f"| {b} | {cells} | {got['run ahead'] / got['one graph']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
