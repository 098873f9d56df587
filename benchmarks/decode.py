"""Prefill and decode speed: kvgrove's generation core against mlx-lm's stream_generate.

Both run the same loaded model object (same weights, same dtype, same machine, same process),
greedy, so the difference is the generation loop itself. Usage:

    .venv/bin/python benchmarks/decode.py [--model M] [--prompt-tokens 512] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import platform
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)
import mlx.core as mx

# isort: on
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


SHAPES = {
    # Real model shapes with random weights: the speed of a forward pass does not depend on the
    # values, and real weights of this size cannot travel to the lent GPU machine.
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         head_dim=64, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         head_dim=64, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         head_dim=128, tie_word_embeddings=False),
}  # fmt: skip


class _Ids:
    """A stand-in tokenizer for random-weight models: prompts are token ids already."""

    def encode(self, text: str) -> list[int]:
        return [(ord(c) * 7919) % 30000 + 1000 for c in text]


def random_model(shape: str, bits: int | None, dtype: str):
    from types import SimpleNamespace

    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    args = llama.ModelArgs(
        model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, **SHAPES[shape]
    )
    model = llama.Model(args)
    model.set_dtype(getattr(mx, dtype))
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    label = f"{shape} (random, {dtype}{f', Q{bits}' if bits else ''})"
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    info = SimpleNamespace(name=label, dtype=dtype, nbytes=nbytes)
    return SimpleNamespace(model=model, tokenizer=_Ids(), info=info)


def run_generate_step(lm, _wrapper, prompt, gen_tokens) -> tuple[float, float]:
    """mlx-lm's token loop (generate_step) without detokenization, for random-weight models."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    start = time.perf_counter()
    first = None
    n = 0
    for _token, _ in generate_step(
        mx.array(prompt), lm.model, max_tokens=gen_tokens, sampler=make_sampler(temp=0.0)
    ):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert n == gen_tokens
    return len(prompt) / (first - start), (n - 1) / (end - first)


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
    ap.add_argument("--random-shape", choices=sorted(SHAPES), help="random weights of a real shape")
    ap.add_argument("--bits", type=int, default=None, help="quantize the random model (4, 8)")
    ap.add_argument("--dtype", default="bfloat16", help="dtype of the random model")
    args = ap.parse_args()

    if args.random_shape:
        lm = random_model(args.random_shape, args.bits, args.dtype)
        wrapper, peer, peer_name = None, run_generate_step, "mlx-lm generate_step"
    else:
        lm = load(args.model)
        wrapper, peer, peer_name = (
            mlx_lm_tokenizer(lm.tokenizer),
            run_mlx_lm,
            ("mlx-lm stream_generate"),
        )
    print(
        f"model {lm.info.name} ({lm.info.dtype}, {lm.info.nbytes / 2**20:.0f} MiB) on "
        f"{mx.default_device()}, {platform.processor() or platform.machine()}"
        + (
            ""
            if mx.default_device() == mx.gpu
            else f", BLAS: {blas.status()['path'] or 'reference'}"
        )
    )
    # Warm up both paths (kernel setup, allocator).
    run_kvgrove(lm, prompt_of(lm.tokenizer, 32), 4)
    peer(lm, wrapper, prompt_of(lm.tokenizer, 32), 4)

    rows = []
    for n_prompt in args.prompt_tokens:
        prompt = prompt_of(lm.tokenizer, n_prompt)
        ours, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
            ours.append(run_kvgrove(lm, prompt, args.gen_tokens))
            theirs.append(peer(lm, wrapper, prompt, args.gen_tokens))
            time.sleep(0.2)
        kp, kd = median([p for p, _ in ours]), median([d for _, d in ours])
        mp, md = median([p for p, _ in theirs]), median([d for _, d in theirs])
        rows.append([n_prompt, "prefill tok/s", kp, mp, kp / mp])
        rows.append([n_prompt, "decode tok/s", kd, md, kd / md])
    print(
        table(
            ["prompt tokens", "metric", "kvgrove", peer_name, "ratio"],
            rows,
        )
    )
    print(f"(median of {args.repeats}; {args.gen_tokens} generated tokens; greedy)")


if __name__ == "__main__":
    main()
