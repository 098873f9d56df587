"""Batched decode matmuls of Llama-3.1-8B's shape on the GPU: 4-bit kernels vs bf16, by batch.

One decode step's weight matmuls (q, k, v, o, gate, up, down for 32 layers, then the vocabulary
head) as MLX runs them, at batch 1 / 8 / 32 / 64, for: bf16 weights; `mx.quantized_matmul` at
4 bits with group 32 / 64 / 128 (and 8 bits, group 64); and dequantize-then-matmul each step
(what "dequantize for large batches" costs when no bf16 copy is kept). Steps are chained
(each layer's output feeds the next, as in a model) and pipelined with async_eval, so what is
timed is the device's rate, not Python's.

    python3 benchmarks/gpu_quant.py [--batches 1,8,32,64] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

# (in, out) of one layer's matmuls in Llama-3.1-8B (GQA: k, v are 1,024 wide).
LAYER = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336)]
DOWN = (14336, 4096)
LAYERS = 32
VOCAB = 128256


def set_layers(n: int) -> None:
    global LAYERS
    LAYERS = n


def make(kind: str) -> list:
    """Weights for every matmul of one step, in the form `kind` uses: per layer q, k, v, o,
    gate, up, down; then the head."""
    shapes = [s for _ in range(LAYERS) for s in [*LAYER, DOWN]] + [(4096, VOCAB)]
    out = []
    for k_in, n_out in shapes:
        w = (mx.random.normal((n_out, k_in)) * 0.02).astype(mx.bfloat16)
        if kind == "bf16":
            out.append((w,))
        else:
            bits, group = (int(x) for x in kind.split(":")[1:])
            q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
            out.append((q, scales, biases, group, bits))
        mx.eval(out[-1][:3])
    return out


def matmul(x: mx.array, w: tuple, mode: str) -> mx.array:
    if mode == "bf16":
        return x @ w[0].T
    q, scales, biases, group, bits = w
    if mode == "deq":
        return x @ mx.dequantize(q, scales, biases, group_size=group, bits=bits).T
    return mx.quantized_matmul(x, q, scales, biases, transpose=True, group_size=group, bits=bits)


def step(x: mx.array, weights: list, mode: str) -> mx.array:
    for i in range(LAYERS):
        wq, wk, wv, wo, wg, wu, wd = weights[7 * i : 7 * i + 7]
        q = matmul(x, wq, mode)
        k, v = matmul(x, wk, mode), matmul(x, wv, mode)
        h = x + matmul(q * 1e-2, wo, mode) + (k.sum() + v.sum()) * 1e-6
        x = h + matmul(matmul(h, wg, mode) * matmul(h, wu, mode) * 1e-2, wd, mode)
        x = (x * 0.5).astype(mx.bfloat16)
    logits = matmul(x, weights[-1], mode)
    return x + logits[:, :4096] * 1e-6


def rate(weights, mode: str, batch: int, steps: int) -> float:
    x = mx.random.normal((batch, 4096)).astype(mx.bfloat16)
    for _ in range(3):
        x = step(x, weights, mode)
        mx.eval(x)
    t = time.perf_counter()
    for _ in range(steps):
        x = step(x, weights, mode)
        mx.async_eval(x)
    mx.eval(x)
    return steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kinds", default="bf16,q:4:64,q:4:32,q:4:128,q:8:64")
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer: faster, same per-layer rate")
    a = ap.parse_args()
    set_layers(a.layers)
    batches = [int(b) for b in a.batches.split(",")]
    rows = []
    for kind in a.kinds.split(","):
        weights = make(kind)
        modes = ["bf16"] if kind == "bf16" else ["q", "deq"] if kind == "q:4:64" else ["q"]
        for mode in modes:
            label = kind if mode != "deq" else kind + " dequantize+matmul"
            r = [rate(weights, mode, b, a.steps) for b in batches]
            rows.append((label, r))
            cells = "  ".join(
                f"b{b}: {s:6.1f} steps/s {s * b:7.0f} tok/s"
                for b, s in zip(batches, r, strict=True)
            )
            print(f"{label:28} {cells}  ({LAYERS} layers)", flush=True)
        del weights
        mx.clear_cache()
    print("\n| weights | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |")
    print("|---|" + "---|" * len(batches))
    for label, r in rows:
        print(
            f"| {label} | "
            + " | ".join(f"{s * b:,.0f}" for b, s in zip(batches, r, strict=True))
            + " |"
        )


if __name__ == "__main__":
    main()
