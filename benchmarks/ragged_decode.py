"""On a CUDA GPU: a ragged batch's decode attention, kvgrove's kernel against MLX's masked path.

    python3 benchmarks/ragged_decode.py [--shape llama-3.1-8b] [--batches 8,32,64] [--steps 64]

First checks `kvgrove.models.attention.ragged_decode` against MLX's attention with the same
left-padding mask, in float32 (random inputs, several batch sizes, lengths and paddings, the
query laid out as mlx-lm's llama lays it out). Then one greedy decode loop per way, random bf16
weights of the shape in memory, prompts of --prompt-tokens less 0..15 tokens per row (a ragged
batch: rows left-padded) unless said:

- MLX loop: mlx-lm's `BatchKVCache`, every row --prompt-tokens long (MLX's own batched loop, as
  benchmarks/gpu_server.py runs it: an array mask even with no padding);
- plain KVCache: the same uniform batch in one `KVCache` (no mask: MLX's fused decode kernel);
- kvgrove masked: kvgrove's `RunningBatch` over the ragged rows, the kernel not installed
  (MLX's masked fallback, as before);
- kvgrove kernel: the same with `attention.install` (the kernel);
- kvgrove uniform, mask: `RunningBatch`, every row --prompt-tokens long, with the mask
  mlx-lm's `BatchKVCache` makes (as kvgrove did before; at batch 1 this is the c=1 path);
- kvgrove uniform: the same with no mask (`SlotKVCache.make_mask` now).

Prints the median tok/s of --repeats runs per way and batch, the ways interleaved (the lent
machine's speed drifts from minute to minute), each after a run that compiles.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models import llama
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from gpu_server import SHAPES, VOCAB, random_model
from kvgrove.models import attention
from kvgrove.models.batching import RunningBatch, SlotKVCache, prefill_together


def check(seed: int = 0) -> float:
    """The kernel's worst relative error against MLX's masked attention in float32."""
    mx.random.seed(seed)
    worst = 0.0
    for b, hq, hkv, d, t, room in (
        (1, 32, 8, 128, 7, 256),
        (5, 32, 8, 128, 300, 512),
        (64, 32, 8, 128, 130, 256),
        (3, 14, 2, 64, 1000, 1024),
        (2, 8, 8, 96, 33, 256),
        (4, 16, 4, 256, 70, 256),
    ):
        # The query as mlx-lm's llama makes it: (B, L, H, D) transposed to (B, H, L, D).
        q = mx.random.normal((b, 1, hq, d)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
        kbuf = mx.random.normal((b, hkv, room, d)).astype(mx.bfloat16)
        vbuf = mx.random.normal((b, hkv, room, d)).astype(mx.bfloat16)
        k, v = kbuf[..., :t, :], vbuf[..., :t, :]
        pads = mx.random.randint(0, t, (b,)).astype(mx.int32)
        pads = mx.concatenate([mx.array([0], mx.int32), pads[1:]])  # a row with no padding
        scale = d**-0.5
        got = attention.ragged_decode(q, k, v, pads, scale).astype(mx.float32)
        mask = (mx.arange(t)[None, :] >= pads[:, None])[:, None, None, :]
        want = mx.fast.scaled_dot_product_attention(
            q.astype(mx.float32),
            k.astype(mx.float32),
            v.astype(mx.float32),
            scale=scale,
            mask=mask,
        )
        err = (mx.abs(got - want).max() / (mx.abs(want).max() + 1e-6)).item()
        print(f"  check B={b} Hq={hq} Hkv={hkv} D={d} T={t}: relative error {err:.2e}")
        worst = max(worst, err)
    return worst


def mlx_loop(model, b: int, plen: int, steps: int) -> float:
    cache = [BatchKVCache([0] * b) for _ in model.layers]
    return _loop(model, cache, mx.random.randint(0, VOCAB - 1, (b, plen)), steps)


def plain_loop(model, b: int, plen: int, steps: int) -> float:
    cache = make_prompt_cache(model)
    return _loop(model, cache, mx.random.randint(0, VOCAB - 1, (b, plen)), steps)


def _loop(model, cache, prompt, steps: int) -> float:
    def step(y):
        return mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)

    return _timed(step, mx.argmax(model(prompt, cache=cache)[:, -1, :], axis=-1), steps)


def kvgrove_loop(model, b: int, plen: int, steps: int, ragged: bool) -> float:
    lengths = [plen - (i % 16 if ragged else 0) for i in range(b)]
    prompts = [[int(x) for x in mx.random.randint(3, VOCAB - 1, (n,)).tolist()] for n in lengths]
    logits, cache = prefill_together(model, prompts, len(model.layers))
    batch = RunningBatch()
    batch.join_batch(list(range(b)), lengths, cache)

    def step(y):
        return mx.argmax(batch.forward(model, y), axis=-1).astype(mx.uint32)

    return _timed(step, mx.argmax(logits, axis=-1).astype(mx.uint32), steps)


def _timed(step, y: mx.array, steps: int) -> float:
    """tok/s of `steps` greedy steps from the first tokens `y`, each step's graph launched
    before the previous tokens are read (mlx-lm's generate_step order)."""
    mx.eval(y)
    t = time.perf_counter()
    y = step(y)
    mx.async_eval(y)
    for _ in range(steps - 1):
        nxt = step(y)
        mx.async_eval(nxt)
        y.tolist()
        y = nxt
    y.tolist()
    return steps * y.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="8,32,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    assert attention.available(), "needs MLX on a CUDA GPU"
    worst = check()
    print(f"kernel vs MLX masked attention (float32): worst relative error {worst:.2e}")
    model, _ = random_model(args.shape)
    plen, steps = args.prompt_tokens, args.steps
    original_sdpa, original_mask = llama.scaled_dot_product_attention, SlotKVCache.make_mask
    ways = {
        "MLX loop": lambda b: mlx_loop(model, b, plen, steps),
        "plain KVCache": lambda b: plain_loop(model, b, plen, steps),
        "kvgrove masked": lambda b: kvgrove_loop(model, b, plen, steps, True),
        "kvgrove kernel": lambda b: kvgrove_loop(model, b, plen, steps, True),
        "kvgrove uniform, mask": lambda b: kvgrove_loop(model, b, plen, steps, False),
        "kvgrove uniform": lambda b: kvgrove_loop(model, b, plen, steps, False),
    }

    def measure(way: str, b: int) -> float:
        # Each way as it was or is: the kernel installed or not, the uniform batch's mask
        # made as mlx-lm's BatchKVCache makes it (before) or not (now).
        llama.scaled_dot_product_attention = original_sdpa
        SlotKVCache.make_mask = original_mask
        if way == "kvgrove kernel":
            assert attention.install(model)
        if way == "kvgrove uniform, mask":
            SlotKVCache.make_mask = BatchKVCache.make_mask
        try:
            return ways[way](b)
        finally:
            llama.scaled_dot_product_attention = original_sdpa
            SlotKVCache.make_mask = original_mask
            mx.clear_cache()

    print(f"median of {args.repeats} interleaved runs per way (the machine's speed drifts)")
    print("| batch | " + " | ".join(ways) + " | kernel / kvgrove masked | no mask / mask |")
    print("|---" * (len(ways) + 3) + "|")
    for b in (int(x) for x in args.batches.split(",")):
        for way in ways:
            measure(way, b)  # compiles
        runs: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(args.repeats):
            for way in ways:
                runs[way].append(measure(way, b))
        got = {w: statistics.median(r) for w, r in runs.items()}
        cells = " | ".join(f"{got[w]:,.0f}" for w in ways)
        kernel = got["kvgrove kernel"] / got["kvgrove masked"]
        unmasked = got["kvgrove uniform"] / got["kvgrove uniform, mask"]
        print(f"| {b} | {cells} | {kernel:.2f}x | {unmasked:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
