"""MLX on a Linux CPU with its bundled reference BLAS vs with OpenBLAS loaded by kvgrove.

Each configuration runs in a fresh subprocess (the BLAS is chosen at load time). Reports a
float32 matmul, a 256-token prefill of the default model, and whether the logits agree.

    .venv/bin/python benchmarks/blas.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _common import table

CHILD = r"""
import json, time
import kvgrove
import mlx.core as mx
import numpy as np
from kvgrove import blas
from kvgrove.models.loading import load
from kvgrove.models.caches import make_cache
from kvgrove.models.generate import prefill_chunks

mx.random.seed(0)
a = mx.random.normal((1024, 1024)); mx.eval(a)
mx.eval(a @ a)
t = time.perf_counter(); mx.eval(a @ a); matmul = time.perf_counter() - t
lm = load(None)
ids = (lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * 40)[:256]
cache = make_cache(lm.model)
t = time.perf_counter()
list(prefill_chunks(lm.model, cache, ids[:-1], chunk_tokens=2048))
logits = lm.model(mx.array([ids[-1:]]), cache=cache)[0, -1]; mx.eval(logits)
prefill = time.perf_counter() - t
np.save(OUT, np.array(logits))
print(json.dumps({"blas": blas.status()["path"] or "MLX reference BLAS",
                  "matmul_s": matmul, "prefill_s": prefill}))
"""


def run(openblas: bool, out: str) -> dict:
    env = dict(os.environ)
    if not openblas:
        env["KVGROVE_OPENBLAS"] = "off"
    proc = subprocess.run(
        [sys.executable, "-c", f"OUT={out!r}\n" + CHILD],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    ref = run(False, "/tmp/kvgrove-blas-ref.npy")
    fast = run(True, "/tmp/kvgrove-blas-fast.npy")
    diff = np.abs(np.load("/tmp/kvgrove-blas-ref.npy") - np.load("/tmp/kvgrove-blas-fast.npy"))
    rows = [
        [
            "1024² float32 matmul (ms)",
            ref["matmul_s"] * 1e3,
            fast["matmul_s"] * 1e3,
            ref["matmul_s"] / fast["matmul_s"],
        ],
        [
            "256-token prefill, SmolLM2 f32 (tok/s)",
            256 / ref["prefill_s"],
            256 / fast["prefill_s"],
            ref["prefill_s"] / fast["prefill_s"],
        ],
    ]
    print(f"before: {ref['blas']}\nafter:  {fast['blas']}")
    print(table(["", "reference BLAS", "OpenBLAS", "speedup"], rows))
    print(f"max |Δ logit| between the two: {diff.max():.2e}")


if __name__ == "__main__":
    main()
