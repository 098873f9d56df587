"""Tensor parallel: prefill and decode tokens/s at 1 rank and at N ranks, same model, one run,
and a later turn over the prefix cache.

Each configuration is a real `kvgrove serve` (`--tensor-parallel N` for N ranks, over the
loopback ring on one machine). With the prefix cache off, the same greedy /api/generate (raw
prompt) `--repeats` times: Ollama's own prefill and decode durations as tokens/s. Then a
later turn (the first prompt, its answer, and a follow-up) asked of that server (cache off:
the reference tokens) and of a server with the prefix cache on (its own folder) after the
first turn: the later turn's prefill time, the prompt tokens it took from the cache on every
rank, and whether its tokens equal the cache-off ones. "same tokens" compares the N-rank
tokens with the 1-rank ones. On a CPU the numbers show correctness and the collectives'
overhead, not a speed-up. Usage:

    .venv/bin/python benchmarks/tensor_parallel.py [--model M] [--ranks 2]
        [--prompt-tokens 256] [--gen-tokens 32] [--repeats 2]

The bundled SmolLM2-135M (9 heads, 3 KV heads) splits its MLP over 2 ranks and replicates
attention (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import httpx

from _common import median, table
from _servers import ROOT, free_port

TEXT = "the quick brown fox jumps over the lazy dog and keeps on running"


@contextlib.contextmanager
def server(model: str | None, ranks: int, kv_dir: str | None = None):
    port = free_port()
    argv = [sys.executable, "-m", "kvgrove.cli", "serve", "--port", str(port)]
    argv += ["--kv-cache-dir", kv_dir] if kv_dir else ["--no-prefix-cache"]
    argv += ["--model", model] if model else []
    argv += ["--tensor-parallel", str(ranks)] if ranks > 1 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {ranks}-rank server exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {ranks}-rank server did not get ready")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)  # rank 0 stops the other ranks
        try:
            proc.wait(60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


def measure(url: str, model: str, prompt: str, gen_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "raw": True,
        "stream": False,
        "options": {"temperature": 0, "num_predict": gen_tokens},
    }
    r = httpx.post(f"{url}/api/generate", json=body, timeout=600).json()
    return {
        "text": r["response"],
        "prefill_ms": r["prompt_eval_duration"] / 1e6,
        "cached": r.get("prompt_cache_count", 0),
        "prefill": r["prompt_eval_count"] / (r["prompt_eval_duration"] / 1e9),
        "decode": r["eval_count"] / (r["eval_duration"] / 1e9),
        "prompt_tokens": r["prompt_eval_count"],
        "gen_tokens": r["eval_count"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    words = TEXT.split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_tokens))
    rows, later_rows, texts, later_texts = [], [], {}, {}
    for ranks in (1, args.ranks):
        with server(args.model, ranks) as url:
            name = httpx.get(f"{url}/api/tags").json()["models"][0]["name"]
            runs = [measure(url, name, prompt, args.gen_tokens) for _ in range(args.repeats)]
            later = prompt + runs[0]["text"] + " and then, after all that, the fox"
            off = measure(url, name, later, args.gen_tokens)
        with tempfile.TemporaryDirectory() as kv, server(args.model, ranks, kv) as url:
            measure(url, name, prompt, args.gen_tokens)  # the first turn fills the cache
            on = measure(url, name, later, args.gen_tokens)
        texts[ranks] = {r["text"] for r in runs}
        later_texts[ranks] = on["text"]
        same = "reference" if ranks == 1 else str(texts[ranks] == texts[1])
        label = f"{ranks} rank{'s' * (ranks > 1)}"
        rows.append(
            [
                label,
                runs[0]["prompt_tokens"],
                median([r["prefill"] for r in runs]),
                runs[0]["gen_tokens"],
                median([r["decode"] for r in runs]),
                same,
            ]
        )
        later_rows.append(
            [
                label,
                on["prompt_tokens"],
                off["prefill_ms"],
                on["cached"],
                on["prefill_ms"],
                str(on["text"] == off["text"]),
                "reference" if ranks == 1 else str(on["text"] == later_texts[1]),
            ]
        )
    print(
        table(
            ["", "prompt tokens", "prefill tok/s", "generated", "decode tok/s", "same tokens"],
            rows,
        )
    )
    print()
    print(
        table(
            [
                "later turn",
                "prompt tokens",
                "prefill ms, cache off",
                "cached tokens",
                "prefill ms, cache on",
                "same as cache off",
                "same tokens",
            ],
            later_rows,
        )
    )


if __name__ == "__main__":
    main()
