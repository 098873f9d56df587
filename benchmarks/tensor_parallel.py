"""Tensor parallel: prefill and decode tokens/s at 1 rank and at N ranks, same model, one run.

Each configuration is a real `kvgrove serve` (`--tensor-parallel N` for N ranks, over the
loopback ring on one machine), asked the same greedy /api/generate (raw prompt, prefix cache
off so every run prefills in full); the table gives Ollama's own prefill and decode durations
as tokens/s, and whether the N-rank tokens equal the 1-rank tokens. On a CPU the numbers show
correctness and the collectives' overhead, not a speed-up. Usage:

    .venv/bin/python benchmarks/tensor_parallel.py [--model M] [--ranks 3]
        [--prompt-tokens 256] [--gen-tokens 32] [--repeats 2]

The bundled SmolLM2-135M has 9 attention heads (3 KV heads): it splits over 3 ranks, not 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import httpx

from _common import median, table
from _servers import ROOT, free_port

TEXT = "the quick brown fox jumps over the lazy dog and keeps on running"


@contextlib.contextmanager
def server(model: str | None, ranks: int):
    port = free_port()
    argv = [sys.executable, "-m", "kvgrove.cli", "serve", "--port", str(port)]
    argv += ["--no-prefix-cache", *(["--model", model] if model else [])]
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
        "prefill": r["prompt_eval_count"] / (r["prompt_eval_duration"] / 1e9),
        "decode": r["eval_count"] / (r["eval_duration"] / 1e9),
        "prompt_tokens": r["prompt_eval_count"],
        "gen_tokens": r["eval_count"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    words = TEXT.split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_tokens))
    rows, texts = [], {}
    for ranks in (1, args.ranks):
        with server(args.model, ranks) as url:
            name = httpx.get(f"{url}/api/tags").json()["models"][0]["name"]
            runs = [measure(url, name, prompt, args.gen_tokens) for _ in range(args.repeats)]
        texts[ranks] = {r["text"] for r in runs}
        same = "reference" if ranks == 1 else str(texts[ranks] == texts[1])
        rows.append(
            [
                f"{ranks} rank{'s' * (ranks > 1)}",
                runs[0]["prompt_tokens"],
                median([r["prefill"] for r in runs]),
                runs[0]["gen_tokens"],
                median([r["decode"] for r in runs]),
                same,
            ]
        )
    print(
        table(
            ["", "prompt tokens", "prefill tok/s", "generated", "decode tok/s", "same tokens"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
