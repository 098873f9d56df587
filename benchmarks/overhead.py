"""The server's own cost per row-step: kvgrove vs mlx-lm's server on a model that costs nothing.

A tiny random-weight llama (hidden 64, 2 layers, a 320-token vocabulary: tests/tiny_models.py)
makes the forward pass almost free, so what is left is the server's host work per generated
token: planning, delivery, detokenizing, stop matching, framing. Each server in turn (never two
at once) gets waves of c streaming /v1/completions requests (distinct prompts, greedy,
`--gen-tokens` each, usage counted from the last chunk), c = 1 / 16 / 64; a first wave warms it.
Both servers batch up to 64 rows (`--max-running-sequences 64`, `--decode-concurrency 64`).

The client is a raw HTTP/1.1 socket per request that only counts bytes and reads the usage at the
end (no JSON parsing per chunk), so on a 2-core machine it takes as little CPU as it can from the
servers. "MLX alone" is the same model's batched greedy loop in this process (BatchKVCache, no
server): the device's share of a row-step.

    .venv/bin/python benchmarks/overhead.py [--gen-tokens 128] [--levels 1,16,64] [--waves 2]

Columns: generated tokens/s of the wave (the server's ceiling), µs per row-step
(1e6 / tokens/s: wall time per generated token), and the ratio kvgrove / mlx-lm.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import trio

from _client import streamed_completion
from _common import table
from _servers import ROOT, free_port, start_kvgrove, start_mlx_lm, stop, wait_ready

sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import write_tiny_model

KINDS = ("kvgrove", "mlx-lm server")


async def one(port: int, model: str, prompt: str, gen_tokens: int) -> int:
    """Generated tokens of one streamed completion, read off the usage chunk."""
    return (await streamed_completion(port, model, prompt, gen_tokens))[1]


async def wave(port: int, model: str, c: int, gen_tokens: int, tag: str) -> tuple[float, int]:
    counts: list[int] = []

    async def run(i: int) -> None:
        counts.append(await one(port, model, f"Note {tag}-{i}: hello world", gen_tokens))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(c):
            nursery.start_soon(run, i)
    wall = time.perf_counter() - start
    return sum(counts) / wall, sum(counts)


async def bench(kind: str, folder: Path, levels, gen_tokens: int, waves: int, flags) -> dict:
    port = free_port()
    if kind == "kvgrove":
        proc = start_kvgrove(
            port, str(folder), ["--max-running-sequences", "64", "--no-prefix-cache", *flags]
        )
        served = str(folder)
    else:
        proc = start_mlx_lm(port, folder, ["--decode-concurrency", "64"])
        served = str(folder)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        await wave(port, served, 4, 8, tag="warm")
        out = {}
        for c in levels:
            best, generated = 0.0, 0
            for w in range(waves):
                tps, n = await wave(port, served, c, gen_tokens, tag=f"{c}-{w}")
                best, generated = max(best, tps), n
            out[c] = best
            print(f"{kind:14} c={c:<3} {best:8.0f} tok/s ({generated} tokens)", flush=True)
        return out
    finally:
        stop(proc)


def mlx_alone(folder: Path, levels, steps: int) -> dict:
    """The same model's batched greedy loop in-process: what the device costs per row-step."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    out = {}
    for b in levels:
        cache = [BatchKVCache([0] * b) for _ in model.layers]
        y = mx.argmax(model(mx.zeros((b, 8), dtype=mx.int32), cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
        t = time.perf_counter()
        for _ in range(steps):
            nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
        out[b] = steps * b / (time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-tokens", type=int, default=128)
    parser.add_argument("--levels", default="1,16,64")
    parser.add_argument("--waves", type=int, default=2, help="waves per level (best counts)")
    parser.add_argument("--kvgrove-flag", action="append", default=[], help="extra serve flag")
    parser.add_argument("--only", choices=KINDS, help="run one server only")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_model(Path(tmp) / "tiny-llama", "llama")
        cfg = json.loads((folder / "config.json").read_text())
        cfg["max_position_embeddings"] = 4096
        (folder / "config.json").write_text(json.dumps(cfg))
        alone = mlx_alone(folder, levels, args.gen_tokens)
        kinds = (args.only,) if args.only else KINDS
        flags = [f"--{f.lstrip('-')}" if not f.startswith("-") else f for f in args.kvgrove_flag]
        results = {
            k: trio.run(bench, k, folder, levels, args.gen_tokens, args.waves, flags) for k in kinds
        }
    kv = results.get("kvgrove")
    ml = results.get("mlx-lm server")
    rows = []
    for c in levels:
        row: list[object] = [c, alone[c], f"{1e6 / alone[c]:.1f}"]
        for r in (kv, ml):
            if r is not None:
                row += [r[c], f"{1e6 / r[c]:.0f}"]
        if kv and ml:
            row.append(f"{kv[c] / ml[c]:.2f}x")
        rows.append(row)
    headers = ["concurrency", "MLX alone tok/s", "µs/row-step"]
    for k, r in (("kvgrove", kv), ("mlx-lm", ml)):
        if r is not None:
            headers += [f"{k} tok/s", "µs/row-step"]
    if kv and ml:
        headers.append("kvgrove / mlx-lm")
    print(
        f"\nTiny random llama (hidden 64, 2 layers, vocab 320), {args.gen_tokens} generated tokens"
        f" per request, greedy, best of {args.waves} waves.\n"
    )
    print(table(headers, rows))


if __name__ == "__main__":
    main()
