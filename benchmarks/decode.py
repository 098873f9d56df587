"""Prefill and decode speed: kvgrove's generation core against mlx-lm's stream_generate.

Both run the same loaded model object (same weights, same dtype, same machine, same process),
greedy, so the difference is the generation loop itself. Usage:

    .venv/bin/python benchmarks/decode.py [--model M] [--prompt-tokens 512] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import time

import mlx.core as mx

import kvgrove  # noqa: F401  (loads OpenBLAS before mlx)
from _common import median, mlx_lm_tokenizer, prompt_of, table
from kvgrove import blas
from kvgrove.models.generate import Timings, generate
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams


def run_kvgrove(lm, prompt, gen_tokens) -> tuple[float, float]:
    timings = Timings()
    steps = generate(
        lm.model, prompt, SamplingParams(temperature=0), max_tokens=gen_tokens, timings=timings
    )
    n = sum(1 for _ in steps)
    assert n == gen_tokens
    return timings.prefill_tokens_per_second, timings.decode_tokens_per_second


def run_mlx_lm(lm, wrapper, prompt, gen_tokens) -> tuple[float, float]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    last = None
    for response in stream_generate(
        lm.model,
        wrapper,
        mx.array(prompt),
        max_tokens=gen_tokens,
        sampler=make_sampler(temp=0.0),
    ):
        last = response
    assert last is not None and last.generation_tokens == gen_tokens
    return last.prompt_tps, last.generation_tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    lm = load(args.model)
    wrapper = mlx_lm_tokenizer(lm.tokenizer)
    print(
        f"model {lm.info.name} ({lm.info.dtype}, {lm.info.nbytes / 2**20:.0f} MiB) on "
        f"{mx.default_device()}, {platform.processor() or platform.machine()}, "
        f"BLAS: {blas.status()['path'] or 'MLX reference'}"
    )
    # Warm up both paths (kernel setup, allocator).
    run_kvgrove(lm, prompt_of(lm.tokenizer, 32), 4)
    run_mlx_lm(lm, wrapper, prompt_of(lm.tokenizer, 32), 4)

    rows = []
    for n_prompt in args.prompt_tokens:
        prompt = prompt_of(lm.tokenizer, n_prompt)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
            ours.append(run_kvgrove(lm, prompt, args.gen_tokens))
            theirs.append(run_mlx_lm(lm, wrapper, prompt, args.gen_tokens))
            time.sleep(0.2)
        kp, kd = median([p for p, _ in ours]), median([d for _, d in ours])
        mp, md = median([p for p, _ in theirs]), median([d for _, d in theirs])
        rows.append([n_prompt, "prefill tok/s", kp, mp, kp / mp])
        rows.append([n_prompt, "decode tok/s", kd, md, kd / md])
    print(
        table(
            ["prompt tokens", "metric", "kvgrove", "mlx-lm stream_generate", "ratio"],
            rows,
        )
    )
    print(f"(median of {args.repeats}; {args.gen_tokens} generated tokens; greedy)")


if __name__ == "__main__":
    main()
