"""What a join or a leave costs the MLX thread, against the running batch's size.

A random-weight llama whose KV is not tiny (8 layers, 4 KV heads x 64, float32: 16 KiB per
token) and rows of `--prompt-tokens` tokens make the batch copies show on a CPU. For each batch
size B, kvgrove's running batch (`kvgrove.models.batching.RunningBatch`, what the step runner
decodes) of B rows:

- decode: one step of the B rows (the reference: the device's share of a step);
- join 1: one row prefilled on its own joins (the time of the join alone, evaluated);
- leave 1: one row from the middle leaves (its per-sequence copy included);
- leave all: every row leaves (as a wave does), as the prefix cache's views (`views=`) where
  the running batch offers them, else as copies.

The peer in the same run is mlx-lm's own batch cache (`BatchKVCache`, what mlx-lm's server's
BatchGenerator uses): `extend` by one prefilled row and `filter` out one row, on a batch of the
same size and length. Times are medians over `--repeats` in ms.

    .venv/bin/python benchmarks/joins.py [--sizes 8,32,64] [--prompt-tokens 256]
"""

from __future__ import annotations

import argparse
import inspect
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import mlx.core as mx
from mlx_lm.models import cache as mlx_cache
from mlx_lm.models import llama

from _common import median, table
from kvgrove.models.batching import RunningBatch
from kvgrove.models.caches import make_cache
from kvgrove.models.generate import prefill_chunks

VOCAB = 512


def make_model(layers: int) -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=256,
        num_hidden_layers=layers,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def prompt(rid: int, n: int) -> list[int]:
    return [(rid * 7 + i) % (VOCAB - 1) + 1 for i in range(n)]


def row(model, rid: int, n: int) -> list:
    cache = make_cache(model)
    for _ in prefill_chunks(model, cache, prompt(rid, n)):
        pass
    mx.eval([c.keys for c in cache])
    return cache


def ms(since: float) -> float:
    return (time.perf_counter() - since) * 1e3


def kvgrove_costs(model, size: int, prompt_tokens: int, repeats: int) -> dict:
    out = {k: [] for k in ("decode", "join 1", "leave 1", "leave all")}
    views = "views" in inspect.signature(RunningBatch.leave).parameters
    one = row(model, 0, prompt_tokens)
    for _ in range(repeats):
        batch = RunningBatch()
        batch.join([(r, [_copy(c) for c in one]) for r in range(size)])
        mx.eval(batch.forward(model, [1] * size))
        for rep in range(3):
            t = time.perf_counter()
            mx.eval(batch.forward(model, [1] * len(batch)))
            out["decode"].append(ms(t))
            fresh = row(model, 1000 + rep, prompt_tokens)
            t = time.perf_counter()
            batch.join([(1000 + rep, fresh)])
            out["join 1"].append(ms(t))
            mx.eval(batch.forward(model, [1] * len(batch)))
            t = time.perf_counter()
            batch.leave([batch.ids[len(batch) // 2]])
            out["leave 1"].append(ms(t))
        everyone = list(batch.ids)
        t = time.perf_counter()
        batch.leave(everyone, **({"views": everyone} if views else {}))
        out["leave all"].append(ms(t))
    return {k: median(v) for k, v in out.items()}


def _copy(c):
    fresh = type(c)()
    fresh.keys, fresh.values, fresh.offset = mx.array(c.keys), mx.array(c.values), c.offset
    return fresh


def mlx_lm_costs(model, size: int, prompt_tokens: int, repeats: int) -> dict:
    """mlx-lm's BatchKVCache: extend by one prefilled row, filter out one row."""
    n_layers = len(model.layers)
    prompts = mx.array([prompt(r, prompt_tokens) for r in range(size + 1)])
    batch = [mlx_cache.BatchKVCache([0] * size) for _ in range(n_layers)]
    model(prompts[:size], cache=batch)
    mx.eval([c.keys for c in batch] + [c.values for c in batch])
    out = {"extend 1": [], "filter 1": []}
    for _ in range(repeats * 3):
        one = [mlx_cache.BatchKVCache([0]) for _ in range(n_layers)]
        model(prompts[size:], cache=one)
        mx.eval([c.keys for c in one])

        t = time.perf_counter()
        for mine, theirs in zip(batch, one, strict=True):
            mine.extend(theirs)
        mx.eval([c.keys for c in batch] + [c.values for c in batch])
        out["extend 1"].append(ms(t))
        keep = mx.array([i for i in range(size + 1) if i != size // 2])
        t = time.perf_counter()
        mx.eval([c.extract(size // 2).keys for c in batch])  # the leaver's copy, as ours
        for c in batch:
            c.filter(keep)
        mx.eval([c.keys for c in batch] + [c.values for c in batch])
        out["filter 1"].append(ms(t))
    return {k: median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="8,32,64")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = make_model(args.layers)
    kv = 2 * args.layers * 4 * 64 * 4
    print(
        f"llama, {args.layers} layers, {kv // 1024} KiB KV per token, "
        f"{args.prompt_tokens}-token rows, device {mx.default_device()}"
    )
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        k = kvgrove_costs(model, size, args.prompt_tokens, args.repeats)
        m = mlx_lm_costs(model, size, args.prompt_tokens, args.repeats)
        rows.append(
            [
                size,
                k["decode"],
                k["join 1"],
                m["extend 1"],
                k["join 1"] / m["extend 1"],
                k["leave 1"],
                m["filter 1"],
                k["leave 1"] / m["filter 1"],
                k["leave all"],
            ]
        )
    headers = ["rows", "decode ms", "join 1 ms", "mlx-lm extend 1 ms", "ratio"]
    headers += ["leave 1 ms", "mlx-lm filter 1 ms", "ratio", "leave all ms"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
