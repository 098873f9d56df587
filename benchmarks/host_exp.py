"""A CPU prefill with MLX's exp (mlx-lm's path) against kvgrove's numpy route (host_exp).

The bundled SmolLM2-135M, float32, on this machine's CPU. A 1,700-token context is prefilled
once and restored into fresh live caches; then `new` tokens are fed over it in one forward
(what the executor does for a later turn), timed with mlx-lm's own attention and SwiGLU (MLX's
softmax and sigmoid: what mlx-lm's server runs) and with kvgrove's routes installed
(`kvgrove.models.attention.install`, numpy's exp: kvgrove.models.host_exp), alternating, the
median of `--runs`. Also a cold prefill of the whole context: each way twice, alternating
(each first once), the mean.

    .venv/bin/python benchmarks/host_exp.py [--context 1700] [--new 1,8,20,35,64] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)
import mlx.core as mx

# isort: on
from _common import median, table
from kvgrove.models import attention
from kvgrove.models.caches import make_cache
from kvgrove.models.generate import forward, generation_stream
from kvgrove.models.loading import load

WAYS = ("MLX (mlx-lm's path)", "kvgrove host_exp")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1700)
    parser.add_argument("--new", default="1,8,20,35,64")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    news = [int(x) for x in args.new.split(",")]
    model = load(None).model
    rng = random.Random(0)
    context = [rng.randrange(1000, 20000) for _ in range(args.context)]

    def tokens(n: int) -> mx.array:
        return mx.array([[rng.randrange(1000, 20000) for _ in range(n)]], dtype=mx.uint32)

    def use(way: str) -> None:
        attention.install(model, host_exp=way == WAYS[1])

    with mx.stream(generation_stream()):
        use(WAYS[0])
        base = make_cache(model)
        mx.eval(forward(model, base, mx.array([context], dtype=mx.uint32)))
        snaps = [c.snapshot(0, args.context) for c in base]

        def over_context(n: int) -> float:
            cache = make_cache(model)
            for layer, snap in zip(cache, snaps, strict=True):
                layer.restore([snap], args.context)
            new = tokens(n)
            start = time.perf_counter()
            mx.eval(forward(model, cache, new))
            return time.perf_counter() - start

        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.runs + 1):  # the first round warms both ways up, not counted
            for n in news:
                for way in WAYS:
                    use(way)
                    times.setdefault((way, n), []).append(over_context(n))
        cold: dict[str, list[float]] = {way: [] for way in WAYS}
        for way in (*WAYS, *reversed(WAYS)):  # each way first once
            use(way)
            start = time.perf_counter()
            mx.eval(forward(model, make_cache(model), mx.array([context], dtype=mx.uint32)))
            cold[way].append(time.perf_counter() - start)
        attention.install(model)

    rows = []
    for n in news:
        mlx_ms, ours_ms = (median(times[(way, n)][1:]) * 1e3 for way in WAYS)
        rows.append(
            [
                f"{n} over {args.context}",
                f"{mlx_ms:.1f}",
                f"{ours_ms:.1f}",
                f"{ours_ms / mlx_ms:.2f}x",
            ]
        )
    rows.append(
        [
            f"cold {args.context}",
            f"{median(cold[WAYS[0]]) * 1e3:.0f}",
            f"{median(cold[WAYS[1]]) * 1e3:.0f}",
            f"{median(cold[WAYS[1]]) / median(cold[WAYS[0]]):.2f}x",
        ]
    )
    print(f"SmolLM2-135M float32 on CPU, median of {args.runs} (ms)\n")
    print(table(["new tokens", *WAYS, "kvgrove / MLX"], rows))


if __name__ == "__main__":
    main()
