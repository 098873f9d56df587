"""What a join or a leave costs the MLX thread, against the running batch's size.

A random-weight llama whose KV is not tiny (8 layers, 4 KV heads x 64, float32: 16 KiB per
token) and rows of `--prompt-tokens` tokens make the batch copies show on a CPU. For each batch
size B, kvgrove's running batch (`kvgrove.models.batching.RunningBatch`, what the step runner
decodes) of B rows:

- decode: one step of the B rows (the reference: the device's share of a step);
- join 1: one row prefilled on its own joins;
- leave 1: one row from the middle leaves (its per-sequence copy included);
- leave 4: four rows spread over the batch leave, as copies (rows move into their holes);
- leave all: every row leaves (as a wave does), as the prefix cache's views (`views=`) where
  the running batch offers them, else as copies.

Each time includes evaluating the batch's state after the call (the device's work), and each
`syncs` column counts the host's waits on the device inside the call alone (`mx.eval`,
`mx.synchronize`, reading an array: `tolist`, `item`, `int`...): on an accelerator each costs a
round trip behind whatever the device still has queued, which is what a step that releases rows
paid on the H200 (one per layer and more). Many thin layers (`--layers 32 --hidden 64
--prompt-tokens 32`) make those waits, not the copies, the cost on a CPU too.

The peer in the same run is mlx-lm's own batch cache (`BatchKVCache`, what mlx-lm's server's
BatchGenerator uses): `extend` by one prefilled row and `filter` out one row, on a batch of the
same size and length. Times are medians over `--repeats` in ms.

    .venv/bin/python benchmarks/joins.py [--sizes 8,32,64] [--prompt-tokens 256]
        [--layers 8] [--hidden 256]
"""

from __future__ import annotations

import argparse
import contextlib
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


def make_model(layers: int, hidden: int = 256) -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
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


@contextlib.contextmanager
def counting_syncs(counts: list[int]):
    """Count the host's waits on the device while inside (appended to `counts` at the end)."""
    n = [0]
    saved = {}

    def counted(target, name):
        orig = saved[target, name] = getattr(target, name)

        def wrapper(*args, **kwargs):
            n[0] += 1
            return orig(*args, **kwargs)

        setattr(target, name, wrapper)

    for name in ("eval", "synchronize"):
        counted(mx, name)
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "__index__"):
        counted(mx.array, name)
    try:
        yield
    finally:
        for (target, name), orig in saved.items():
            setattr(target, name, orig)
        counts.append(n[0])


def _state(batch: RunningBatch) -> list:
    return [[c.keys, c.values, c.offset, c.left_padding] for c in batch.cache or []]


def timed(batch: RunningBatch, times: list[float], syncs: list[int], call, *args, **kw) -> object:
    """`call(*args, **kw)`'s time with the batch state evaluated after it, and its syncs (the
    call's own)."""
    t = time.perf_counter()
    with counting_syncs(syncs):
        out = call(*args, **kw)
    left = [[c.keys, c.values] for cache in (out or {}).values() for c in cache]
    mx.eval(_state(batch), left)
    times.append(ms(t))
    return out


def kvgrove_costs(model, size: int, prompt_tokens: int, repeats: int) -> dict:
    ops = ("join 1", "leave 1", "leave 4", "leave all")
    out = {k: [] for k in ("decode", *ops)}
    syncs = {k: [] for k in ops}
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
            timed(batch, out["join 1"], syncs["join 1"], batch.join, [(1000 + rep, fresh)])
            mx.eval(batch.forward(model, [1] * len(batch)))
            middle = batch.ids[len(batch) // 2]
            timed(batch, out["leave 1"], syncs["leave 1"], batch.leave, [middle])
            mx.eval(batch.forward(model, [1] * len(batch)))
        if len(batch) > 8:
            spread = [batch.ids[i] for i in range(1, len(batch), len(batch) // 4)][:4]
            timed(batch, out["leave 4"], syncs["leave 4"], batch.leave, spread)
        everyone = list(batch.ids)
        kw = {"views": everyone} if views else {}
        timed(batch, out["leave all"], syncs["leave all"], batch.leave, everyone, **kw)
    return {k: median(v) for k, v in out.items()} | {
        f"{k} syncs": max(v, default=0) for k, v in syncs.items()
    }


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
    ap.add_argument("--hidden", type=int, default=256, help="model width (4 heads)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = make_model(args.layers, args.hidden)
    kv = 2 * args.layers * args.hidden * 4
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
                k["join 1 syncs"],
                m["extend 1"],
                k["join 1"] / m["extend 1"],
                k["leave 1"],
                k["leave 1 syncs"],
                m["filter 1"],
                k["leave 1"] / m["filter 1"],
                k["leave 4"],
                k["leave 4 syncs"],
                k["leave all"],
                k["leave all syncs"],
            ]
        )
    headers = ["rows", "decode ms", "join 1 ms", "syncs", "mlx-lm extend 1 ms", "ratio"]
    headers += ["leave 1 ms", "syncs", "mlx-lm filter 1 ms", "ratio", "leave 4 ms", "syncs"]
    headers += ["leave all ms", "syncs"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
