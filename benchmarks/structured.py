"""Decode speed with and without a JSON-schema constraint, batch 1 and 16, same run.

Both arms run kvgrove's own batched decode step (RunningBatch.forward + build_sample, the
executor's path) over the same model, prompt, sampling parameters and step count; the
constrained arm gives every row an llguidance Constraint for the same schema, so its cost is
the host-side mask (computed while the forward pass runs) plus applying it. Usage:

    .venv/bin/python benchmarks/structured.py [--model M] [--steps 64] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import platform
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)
import mlx.core as mx

# isort: on
from _common import median, prompt_of, table
from kvgrove.grammar import Constraint, json_schema_grammar
from kvgrove.models.batching import RunningBatch, prefill_together
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams, SequenceSampler, build_sample

# Open-ended on purpose (no length bounds): the grammar stays live for every measured step.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "number"},
    },
    "required": ["title", "tags", "score"],
}


def decode_rate(lm, prompt, batch: int, steps: int, constrained: bool) -> float:
    tok = lm.tokenizer
    grammar = json_schema_grammar(SCHEMA) if constrained else None
    samplers = []
    for i in range(batch):
        params = SamplingParams(seed=i, grammar=grammar)
        constraint = Constraint(grammar, tok) if constrained else None
        samplers.append(SequenceSampler(params, prompt, constraint=constraint))
    logits, cache = prefill_together(lm.model, [prompt] * batch, len(lm.model.layers))
    running = RunningBatch()
    running.join_batch(list(range(batch)), [len(prompt)] * batch, cache)
    tokens = build_sample(logits, samplers).result().tokens
    for s, t in zip(samplers, tokens, strict=True):
        s.accept(t)
    start = time.perf_counter()
    for _ in range(steps):
        logits = running.forward(lm.model, tokens)
        pending = build_sample(logits, samplers)
        mx.async_eval(*pending.arrays())
        tokens = pending.result().tokens
        for s, t in zip(samplers, tokens, strict=True):
            s.accept(t)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path or name (default: bundled)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    lm = load(args.model)
    prompt = prompt_of(lm.tokenizer, args.prompt_tokens)
    decode_rate(lm, prompt, 2, 4, True)  # warm-up: the llguidance tokenizer, MLX kernels
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        free, schema = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both arms alike
            free.append(decode_rate(lm, prompt, batch, args.steps, False))
            schema.append(decode_rate(lm, prompt, batch, args.steps, True))
        f, s = median(free), median(schema)
        rows.append((batch, f, s, f"{100 * (f - s) / f:+.1f}%"))
    print(f"model {lm.info.name}, {platform.machine()} {mx.default_device()}, "
          f"{args.steps} decode steps, median of {args.repeats}")  # fmt: skip
    print(table(["batch", "free tok/s", "json-schema tok/s", "slower by"], rows))


if __name__ == "__main__":
    main()
