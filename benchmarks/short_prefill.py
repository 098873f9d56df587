"""Where a later turn's short prefill over a long cached context goes (SmolLM2-135M, CPU).

Restores a 1,700-token context into kvgrove's live caches and times 20 new tokens fed the ways
the executor could: one 19-token chunk then a 1-token forward (the executor before issue 13),
one 20-token forward with the head on the last position only (`forward`, what the executor
does now) or on all 20 (`forward_all20_fullhead`, before), the chunk alone; against 1 token at
that context and 20 with no context; and the attention of one layer alone (`sdpa1layer_*`, x30:
MLX's fused SDPA over the cache's view with a causal mask, as mlx-lm's models call it). Six
users' turns over the same restored context (each its own 20 new tokens): one by one, as
`forward` each (`rows6_alone`), or in one left-padded pass (`rows6_together`,
`kvgrove.models.batching.prefill_together`).
Usage: PYTHONPATH=src python benchmarks/short_prefill.py [variant ...]
"""

import random
import statistics
import sys
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)
import mlx.core as mx

# isort: on
from kvgrove.models.batching import prefill_together
from kvgrove.models.caches import make_cache
from kvgrove.models.generate import forward, generation_stream, prefill_chunks
from kvgrove.models.loading import load

lm = load(None)
model = lm.model
N, T = 1700, 20

random.seed(0)
ctx = [random.randrange(1000, 20000) for _ in range(N)]
new = [random.randrange(1000, 20000) for _ in range(T)]
ROWS = 6
news = [[random.randrange(1000, 20000) for _ in range(T)] for _ in range(ROWS)]

with mx.stream(generation_stream()):
    base = make_cache(model)
    for _ in prefill_chunks(model, base, ctx, chunk_tokens=2048):
        pass
    snaps = [c.snapshot(0, N) for c in base]

    def fresh():
        c = make_cache(model)
        for layer, s in zip(c, snaps, strict=True):
            layer.restore([s], N)
        return c

    def variant(name):
        c = fresh()
        t0 = time.perf_counter()
        if name == "forward_all20":
            lg = forward(model, c, mx.array(new, dtype=mx.uint32)[None])
            mx.eval(lg)
        elif name == "forward_all20_fullhead":
            lg = model(mx.array(new, dtype=mx.uint32)[None], cache=c)[:, -1, :]
            mx.eval(lg)
        elif name.startswith("sdpa1layer"):
            layer = c[0]
            q = mx.random.normal((1, 9, T, 64))
            mx.eval(q)
            k, v = layer.keys[..., : N + T, :], layer.values[..., : N + T, :]
            mask = None if name.endswith("nomask") else "causal"
            t0 = time.perf_counter()
            outs = [
                mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
                for _ in range(30)
            ]
            mx.eval(outs)
        elif name == "chunks19+1":
            for _ in prefill_chunks(model, c, new[:-1], chunk_tokens=T):
                pass
            lg = forward(model, c, mx.array(new[-1:], dtype=mx.uint32)[None])
            mx.eval(lg)
        elif name == "prefill20_only":
            for _ in prefill_chunks(model, c, new, chunk_tokens=T):
                pass
        elif name.startswith("rows6"):
            caches = [c] + [fresh() for _ in range(ROWS - 1)]
            t0 = time.perf_counter()
            if name == "rows6_alone":
                for c, tokens in zip(caches, news, strict=True):
                    mx.eval(forward(model, c, mx.array(tokens, dtype=mx.uint32)[None]))
            else:
                lg, _ = prefill_together(model, news, len(model.layers), caches)
                mx.eval(lg)
        elif name == "decode1":
            lg = forward(model, c, mx.array(new[:1], dtype=mx.uint32)[None])
            mx.eval(lg)
        elif name == "nocontext20":
            c = make_cache(model)
            t0 = time.perf_counter()
            for _ in prefill_chunks(model, c, new, chunk_tokens=T):
                pass
        elif name == "decode_after":
            for _ in prefill_chunks(model, c, new, chunk_tokens=T):
                pass
            t0 = time.perf_counter()
            lg = forward(model, c, mx.array(new[:1], dtype=mx.uint32)[None])
            mx.eval(lg)
        return (time.perf_counter() - t0) * 1000

    names = sys.argv[1:] or [
        "decode1",
        "nocontext20",
        "prefill20_only",
        "chunks19+1",
        "forward_all20",
        "forward_all20_fullhead",
        "decode_after",
        "sdpa1layer_causal",
        "sdpa1layer_nomask",
    ]
    res = {n: [] for n in names}
    for n in names:
        variant(n)  # warm
    for _ in range(5):
        for n in names:
            res[n].append(variant(n))
    for n in names:
        print(f"{n:16s} median {statistics.median(res[n]):7.1f} ms  {[round(x) for x in res[n]]}")
