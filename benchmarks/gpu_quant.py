"""Batched decode matmuls of Llama-3.1-8B's shape on the GPU: 4-bit kernels vs bf16, by batch.

One decode step's weight matmuls (q, k, v, o, gate, up, down for 32 layers, then the vocabulary
head) as MLX runs them, at batch 1 / 2 / 4 / 8 / 16 / 32 / 64, for: bf16 weights (what a
dense copy of quantized weights runs: kvgrove.models.quant); `mx.quantized_matmul` at 4 bits
with group 32 / 64 / 128 (and 8 bits, group 64); the same split into chunks of at most 7 rows
(MLX 0.32 on CUDA takes its `qmv` kernel below 8 rows, `qmm_sm80` from 8); and
dequantize-then-matmul each step (what "dequantize for large batches" costs when no bf16 copy
is kept). Steps are chained (each layer's output feeds the next, as in a model) and pipelined
with async_eval, so what is timed is the device's rate, not Python's.

`--first-use` first times, per quantized kind and per `qmm_sm80` tile (MLX picks the tile from
the rows: 16 for up to 16 rows, 32 up to 32, 64 above), the first quantized matmul of a fresh
process and the second one: `qmm_sm80` is compiled by NVRTC at its first use (MLX 0.32.4
caches the result under MLX_PTX_CACHE_DIR, default /tmp/mlx/<version>/ptx), and `qmv` (fewer
than 8 rows) is compiled ahead. One process per kernel, `--jobs` at once; `--py-spy` dumps the
native stack of one of them while it compiles.

    python3 benchmarks/gpu_quant.py [--batches 1,2,4,8,16,32,64] [--steps 20] [--first-use]
        [--py-spy PATH] [--jobs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

# (in, out) of one layer's matmuls in Llama-3.1-8B (GQA: k, v are 1,024 wide).
LAYER = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336)]
DOWN = (14336, 4096)
LAYERS = 32
VOCAB = 128256
QMV_ROWS = 7  # MLX 0.32's CUDA quantized matmul runs `qmv` below 8 rows (quantized.cpp)
TILE_ROWS = (16, 32, 64)  # rows that pick each of qmm_sm80's three tiles (qmm_sm80.cu)


def set_layers(n: int) -> None:
    global LAYERS
    LAYERS = n


def parse_kind(kind: str) -> tuple[int, int]:
    """ "q:BITS:GROUP" -> (bits, group)."""
    bits, group = (int(x) for x in kind.split(":")[1:])
    return bits, group


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
            bits, group = parse_kind(kind)
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
    if mode == "qmv" and x.shape[0] > QMV_ROWS:
        parts = [matmul(x[i : i + QMV_ROWS], w, "q") for i in range(0, x.shape[0], QMV_ROWS)]
        return mx.concatenate(parts, axis=0)
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


# -- first use: NVRTC compiles qmm_sm80 --------------------------------------------------------


def first_use(kind: str, rows: int, stall_dump_s: float) -> None:
    """In this (fresh) process: the seconds of the first and of the second quantized matmul of
    `rows` rows on 8B's up-projection; prints one FIRST json line. A Python stack goes to
    stderr if the first one takes longer than `stall_dump_s`."""
    import faulthandler

    bits, group = parse_kind(kind)
    w = (mx.random.normal((14336, 4096)) * 0.02).astype(mx.bfloat16)
    q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    x = mx.random.normal((rows, 4096)).astype(mx.bfloat16)
    mx.eval(q, scales, biases, x)
    times = []
    faulthandler.dump_traceback_later(stall_dump_s, exit=False)
    for _ in range(2):
        t = time.perf_counter()
        y = mx.quantized_matmul(x, q, scales, biases, transpose=True, group_size=group, bits=bits)
        mx.eval(y)
        times.append(time.perf_counter() - t)
        faulthandler.cancel_dump_traceback_later()
    result = {"kind": kind, "rows": rows, "first": times[0], "second": times[1]}
    print("FIRST " + json.dumps(result), flush=True)


def first_uses(kinds: list[str], jobs: int, py_spy: str | None, log_dir: Path) -> list[dict]:
    """Every (kind, rows) of `kinds` x (1, *TILE_ROWS) in its own process, `jobs` at once."""
    todo = [(k, r) for k in kinds for r in (1, *TILE_ROWS)]
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, Path, float]] = []
    results: list[dict] = []
    spied = False
    start = time.perf_counter()

    def reap(block: bool) -> None:
        for entry in list(running):
            proc, log, _ = entry
            if proc.poll() is None and not block:
                continue
            proc.wait()
            running.remove(entry)
            for line in log.read_text().splitlines():
                if line.startswith("FIRST "):
                    results.append(json.loads(line[6:]))
            if proc.returncode:
                print(f"  {log.name}: exit {proc.returncode}\n{log.read_text()[-2000:]}")

    while todo or running:
        while todo and len(running) < jobs:
            kind, rows = todo.pop(0)
            log = log_dir / f"first-{kind.replace(':', '_')}-m{rows}.log"
            argv = [sys.executable, __file__, "--_first", kind, str(rows)]
            with open(log, "w") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
            running.append((proc, log, time.perf_counter()))
        if py_spy and not spied and running and time.perf_counter() - start > 25:
            spied = True
            proc, log, _ = running[-1]
            dump = subprocess.run(
                [py_spy, "dump", "--native", "--pid", str(proc.pid)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            (log_dir / "py-spy-dump.txt").write_text(dump.stdout + dump.stderr)
            print(f"  py-spy dump --native of {log.name} at +{time.perf_counter() - start:.0f} s:")
            print("\n".join(dump.stdout.splitlines()[:40]) + dump.stderr[-500:], flush=True)
        time.sleep(0.5)
        reap(block=False)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kinds", default="bf16,q:4:64,q:4:32,q:4:128,q:8:64")
    ap.add_argument("--layers", type=int, default=LAYERS, help="fewer: faster, same per-layer rate")
    ap.add_argument("--first-use", action="store_true", help="time qmm_sm80's first use first")
    ap.add_argument("--jobs", type=int, default=12, help="--first-use processes at once")
    ap.add_argument("--py-spy", help="py-spy binary: a native stack of a compiling process")
    ap.add_argument("--log-dir", type=Path, default=Path("/tmp/kvg-gpu-quant"))
    ap.add_argument("--stall-dump-seconds", type=float, default=20)
    ap.add_argument("--_first", nargs=2, metavar=("KIND", "ROWS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._first:
        first_use(a._first[0], int(a._first[1]), a.stall_dump_seconds)
        return
    set_layers(a.layers)
    batches = [int(b) for b in a.batches.split(",")]
    kinds = a.kinds.split(",")
    if a.first_use:
        t = time.perf_counter()
        quantized = [k for k in kinds if k != "bf16"]
        firsts = first_uses(quantized, a.jobs, a.py_spy, a.log_dir)
        print(
            f"\nfirst use, {len(firsts)} kernels, {a.jobs} processes at once, "
            f"{time.perf_counter() - t:.0f} s in all "
            f"(cache: {os.environ.get('MLX_PTX_CACHE_DIR', '/tmp/mlx/<version>/ptx')})"
        )
        print("\n| weights | rows (kernel) | first call s | second call s |\n|---|---|---|---|")
        for r in sorted(firsts, key=lambda r: (r["kind"], r["rows"])):
            kernel = "qmv" if r["rows"] <= QMV_ROWS else f"qmm_sm80 tile {r['rows']}"
            cells = f"{r['first']:.2f} | {r['second']:.4f}"
            print(f"| {r['kind']} | {r['rows']} ({kernel}) | {cells} |")
        sys.stdout.flush()
    rows = []
    for kind in kinds:
        weights = make(kind)
        modes = ["bf16"] if kind == "bf16" else ["q", "qmv", "deq"] if kind == "q:4:64" else ["q"]
        for mode in modes:
            label = (
                kind
                + {
                    "bf16": "",
                    "q": "",
                    "qmv": " in <=7-row qmv calls",
                    "deq": " dequantize+matmul",
                }[mode]
            )
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
