"""kvgrove's batched decode step with no server around it, against MLX's own batched loop.

Splits a server's batched step into what the device and MLX cost and what the runner adds: the
same model, in one process, decodes `--rows` rows of greedy tokens

- MLX alone: mlx-lm's `BatchKVCache` loop (the next forward launched from the still-lazy
  tokens, the previous ones read while it runs), as benchmarks/gpu_server.py measures it;
- kvgrove's `StepRunner` (`kvgrove.models.runner`), driven with the executor's own steps (a
  batched prefill of every prompt, then one decode step per token, each `ahead` as the
  scheduler sends them), decode overlap on and off.

Printed: ms per decode step and tokens/s, each against MLX alone. With a GPU (MLX's CUDA
backend) pass a real-shape folder from benchmarks/gpu_server.py; on CPU the tiny model.

    python3 benchmarks/batch_step.py --model FOLDER [--rows 1,8,64] [--steps 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import mlx.core as mx

from _common import table
from kvgrove.actors.messages import Step
from kvgrove.models.loading import load
from kvgrove.models.runner import StepRunner
from kvgrove.models.steps import Start, StepItem
from kvgrove.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def mlx_loop(folder: str, rows: int, steps: int, prompt_tokens: int) -> float:
    """ms per decode step of mlx-lm's batched loop."""
    from mlx_lm.models.cache import BatchKVCache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder))
    vocab = model.args.vocab_size
    cache = [BatchKVCache([0] * rows) for _ in model.layers]
    prompt = mx.random.randint(0, vocab - 1, (rows, prompt_tokens))
    y = mx.argmax(model(prompt, cache=cache)[:, -1, :], axis=-1)
    mx.eval(y)
    for _ in range(3):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
    t = time.perf_counter()
    y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
    mx.async_eval(y)
    for _ in range(steps - 1):
        nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        y.tolist()
        y = nxt
    y.tolist()
    ms = (time.perf_counter() - t) * 1000 / steps
    del model, cache
    mx.clear_cache()
    return ms


def runner_steps(folder: str, rows: int, steps: int, prompt_tokens: int, overlap: bool) -> float:
    """ms per decode step of kvgrove's StepRunner (the steps as the executor gets them)."""
    loaded = load(folder)
    runner = StepRunner(chunk_tokens=2048, batch_prefill=True, overlap=overlap)
    runner.use_model(loaded.model, loaded.tokenizer)
    vocab = loaded.model.args.vocab_size
    prompts = [
        tuple(int(i) for i in mx.random.randint(3, min(vocab, 2000), (prompt_tokens,)).tolist())
        for _ in range(rows)
    ]
    items = tuple(
        StepItem(rid, p, True, start=Start(GREEDY, p, prompt_tokens + steps + 16))
        for rid, p in enumerate(prompts)
    )
    result = runner.run(Step(items, (), None, ahead=True))
    token = {r.request_id: r.token for r in result.results}

    def decode() -> None:
        items = tuple(StepItem(rid, (token[rid],), True) for rid in range(rows))
        for r in runner.run(Step(items, (), None, ahead=True)).results:
            token[r.request_id] = r.token

    for _ in range(3):
        decode()
    t = time.perf_counter()
    for _ in range(steps):
        decode()
    ms = (time.perf_counter() - t) * 1000 / steps
    runner.run(Step((), tuple(range(rows)), None))
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an MLX model folder")
    ap.add_argument("--rows", default="1,8,64")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    args = ap.parse_args()
    out = []
    for rows in [int(r) for r in args.rows.split(",")]:
        base = mlx_loop(args.model, rows, args.steps, args.prompt_tokens)
        on = runner_steps(args.model, rows, args.steps, args.prompt_tokens, True)
        off = runner_steps(args.model, rows, args.steps, args.prompt_tokens, False)
        print(f"rows {rows}: MLX {base:.2f} ms, runner overlap on {on:.2f}, off {off:.2f}")
        out.append(
            [
                rows,
                f"{base:.2f}",
                f"{on:.2f}",
                f"{off:.2f}",
                f"{rows * 1000 / base:.0f}",
                f"{rows * 1000 / on:.0f}",
                f"{base / on:.2f}x",
                f"{base / off:.2f}x",
            ]
        )
    headers = [
        "rows",
        "MLX loop ms/step",
        "runner ms/step (overlap on)",
        "runner ms/step (off)",
        "MLX tok/s",
        "runner tok/s (on)",
        "runner / MLX (on)",
        "runner / MLX (off)",
    ]
    print(table(headers, out))


if __name__ == "__main__":
    main()
