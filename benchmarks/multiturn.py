"""Multi-turn conversations sharing a system prompt: kvgrove's prefix cache vs none vs mlx-lm.

The shape of SGLang's bench_multiturn: `users` conversations share one system prompt; each holds
`rounds` turns of `new_tokens` user tokens and `output_tokens` reply tokens; at most
`concurrency` requests are in flight, so users interleave. Each configuration runs on a fresh
server on a free loopback port (one at a time, never sharing the CPU):

- kvgrove, prefix cache off;
- kvgrove, cache on, ample budgets;
- kvgrove, cache on, device and host tiers too small for the workload (forces paging to disk);
- mlx-lm's server (its own LRU prompt cache) on the same model and prompts;
- llama.cpp's server (llama-cpp-python's `python -m llama_cpp.server`, built as DEVELOPERS.md
  says) on the bundled model's own GGUF file, reusing the longest common prefix of its one
  context (and with `--cache true` too: its RAM cache of whole states).

Prompts are rendered with the model's chat template and sent raw, so every server sees the same
text. Printed per configuration: TTFT p50/p90, prompt tokens computed (reported by the server)
against the minimum possible (tokens no earlier request computed: measured client-side over the
same tokenizer), hit ratio, bytes moved between tiers, and the largest device-tier size sampled
every 100 ms against its budget. A second table splits TTFT by turn: later turns (round 2 on,
whose conversation so far some earlier request computed) and doc-cached first turns (round 1
of every user but the one that came first: only the shared system prompt is cached), with
ratios to llama.cpp's server when it ran.

The later-turn comparison of issue 13 (six users, three turns over one ~1,700-token document):

    .venv/bin/python benchmarks/multiturn.py --users 6 --rounds 3 --system-tokens 1700 \
        --new-tokens 20 --output-tokens 16 --concurrency 1 --configs ample,llama.cpp,ample,llama.cpp

    .venv/bin/python benchmarks/multiturn.py [--users 4 --rounds 3 --concurrency 2 ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (must come first: it loads OpenBLAS before mlx is imported)

# isort: on
import httpx
import trio

from _common import FILLER, median, table
from _servers import (
    free_port,
    mlx_folder,
    pct,
    start_kvgrove,
    start_llama_cpp,
    start_mlx_lm,
    stop,
    wait_ready,
)

TOPICS = [
    "the tides and the moon",
    "how bread rises",
    "why the sky is blue",
    "the history of chess",
    "how bees make honey",
    "the water cycle",
    "volcanoes and plate tectonics",
    "how compilers work",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Workload:
    """The conversations, and the client-side bound on what must be computed."""

    def __init__(self, tokenizer, args) -> None:
        self.tok = tokenizer
        self.args = args
        system = ""
        while len(tokenizer.encode(system)) < args.system_tokens:
            system += FILLER
        self.system = system
        self.known: list[list[int]] = []  # token sequences some server has computed KV for
        self.minimum = 0

    def user_message(self, user: int, rnd: int) -> str:
        words = f"Question {rnd + 1} from user {user}: tell me about {TOPICS[(user + rnd) % 8]}. "
        text = words
        while len(self.tok.encode(text)) < self.args.new_tokens:
            text += f"Please be specific about detail {len(text) % 97} and cite {user}-{rnd}. "
        return text

    def prompt(self, messages: list[dict]) -> tuple[str, list[int]]:
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        return text, self.tok.encode(text)

    def account(self, ids: list[int]) -> None:
        """Count the prompt tokens no earlier request computed (at least one is always run)."""
        best = max((common_prefix(ids, k) for k in self.known), default=0)
        self.minimum += max(1, len(ids) - best)

    def computed(self, text: str, reply: str) -> None:
        self.known.append(self.tok.encode(text + reply)[:-1])


async def stream_kvgrove(client, model: str, text: str, n: int) -> dict:
    body = {
        "model": model,
        "prompt": text,
        "raw": True,
        "stream": True,
        "options": {"temperature": 0, "num_predict": n},
    }
    sent = time.perf_counter()
    ttft, reply, final = None, "", {}
    async with client.stream("POST", "/api/generate", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line:
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(msg["error"])
            if ttft is None:
                ttft = time.perf_counter() - sent
            reply += msg.get("response", "")
            if msg.get("done"):
                final = msg
    return {
        "ttft": ttft,
        "reply": reply,
        "prompt": final["prompt_eval_count"],
        "cached": final.get("prompt_cache_count", 0),
    }


async def stream_openai(client, model: str, text: str, n: int) -> dict:
    body = {
        "model": model,
        "prompt": text,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    ttft, reply, usage = None, "", {}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            usage = msg.get("usage") or usage
            for choice in msg.get("choices", []):
                if choice.get("text"):
                    reply += choice["text"]
                    if ttft is None:
                        ttft = time.perf_counter() - sent
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft": ttft,
        "reply": reply,
        "prompt": usage.get("prompt_tokens", 0),
        "cached": details.get("cached_tokens"),
    }


async def run_workload(url: str, model: str, kind: str, workload: Workload, args) -> dict:
    results: list[dict] = []
    limit = trio.Semaphore(args.concurrency)
    stream = stream_kvgrove if kind.startswith("kvgrove") else stream_openai
    samples: list[int] = []
    order_of: list[int] = []  # the user of each request, in the order they were sent
    done = trio.Event()

    async def sample_device_tier(client) -> None:
        while not done.is_set():
            r = await client.get("/api/cache")
            if r.status_code == 200 and r.json().get("enabled"):
                samples.append(r.json()["bytes"]["device"])
            await trio.sleep(0.1)

    async def user(client, u: int) -> None:
        messages = [{"role": "system", "content": workload.system}]
        for rnd in range(args.rounds):
            messages.append({"role": "user", "content": workload.user_message(u, rnd)})
            text, ids = workload.prompt(messages)
            async with limit:
                workload.account(ids)
                order = len(order_of)
                order_of.append(u)
                out = await stream(client, model, text, args.output_tokens)
            out["round"], out["order"] = rnd, order
            workload.computed(text, out["reply"])
            results.append(out)
            messages.append({"role": "assistant", "content": out["reply"]})

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            if kind.startswith("kvgrove"):
                nursery.start_soon(sample_device_tier, client)
            async with trio.open_nursery() as users:
                for u in range(args.users):
                    users.start_soon(user, client, u)
            done.set()
        wall = time.perf_counter() - start
        cache = {}
        if kind.startswith("kvgrove"):
            cache = (await client.get("/api/cache?check=1")).json()
    return {"results": results, "wall": wall, "cache": cache, "device_samples": samples}


def start_server(kind: str, port: int, model: str | None, folder: Path, kv_dir: str, args):
    if kind == "mlx-lm server":
        return start_mlx_lm(port, folder)
    if kind.startswith("llama.cpp server"):
        flags = ["--cache", "true"] if kind.endswith("RAM cache") else []
        return start_llama_cpp(port, Path(args.gguf), flags=flags)
    flags: list[str] = []
    if kind == "kvgrove, cache off":
        flags = ["--no-prefix-cache"]
    elif kind == "kvgrove, cache paged":
        flags = ["--device-cache-bytes", str(args.paging_device_bytes)]
        flags += ["--host-budget-bytes", str(args.paging_host_bytes)]
    return start_kvgrove(port, model, flags, env={"KVGROVE_KV_DIR": kv_dir})


async def bench(kind: str, model, name: str, folder: Path, tokenizer, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="kvgrove-bench-kv-") as kv_dir:
        proc = start_server(kind, port, model, folder, kv_dir, args)
        try:
            await wait_ready(url, proc)
            served = name if kind.startswith("kvgrove") else str(folder)
            if kind.startswith("llama.cpp"):
                served = args.gguf
            workload = Workload(tokenizer, args)
            out = await run_workload(url, served, kind, workload, args)
        finally:
            stop(proc)
    results = out["results"]
    ttfts = [r["ttft"] for r in results]
    later = [r["ttft"] for r in results if r["round"] > 0]
    first = [r["ttft"] for r in results if r["round"] == 0 and r["order"] > 0]
    prompt = sum(r["prompt"] for r in results)
    cached = [r["cached"] for r in results]
    computed = None if None in cached else prompt - sum(cached)
    cache = out["cache"]
    moved = sum((cache.get("moved_bytes") or {}).values())
    row = {
        "kind": kind,
        "requests": len(results),
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p90": pct(ttfts, 0.9),
        "later_p50": pct(later, 0.5) if later else None,
        "later_p90": pct(later, 0.9) if later else None,
        "first_p50": pct(first, 0.5) if first else None,
        "first_p90": pct(first, 0.9) if first else None,
        "prompt": prompt,
        "computed": computed,
        "minimum": workload.minimum,
        "hit_ratio": None if computed is None else (prompt - computed) / prompt,
        "moved_bytes": moved if cache else None,
        "device_max": max(out["device_samples"], default=None),
        "device_budget": (cache.get("budgets_bytes") or {}).get("device"),
        "wall": out["wall"],
        "by_order": [
            (r["order"], r["round"], round(r["ttft"], 3))
            for r in sorted(results, key=lambda r: r["order"])
        ],
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--system-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--output-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--paging-device-bytes", type=int, default=4 << 20)
    ap.add_argument("--paging-host-bytes", type=int, default=4 << 20)
    ap.add_argument(
        "--configs",
        default="off,ample,paged,mlx-lm",
        help="comma-separated, in run order (repeats allowed): off, ample, paged, mlx-lm, "
        "llama.cpp, llama.cpp-ram",
    )
    ap.add_argument("--gguf", default=None, help="llama.cpp's model (default: the bundled GGUF)")
    args = ap.parse_args()
    if args.gguf is None:
        from kvgrove.models.bundled import pull

        args.gguf = str(pull())  # the bundled model's GGUF (already in the cache: no download)

    from kvgrove.tokenize import load_tokenizer

    name, folder = mlx_folder(args.model)
    tokenizer = load_tokenizer(folder)
    kinds = {
        "off": "kvgrove, cache off",
        "ample": "kvgrove, cache on",
        "paged": "kvgrove, cache paged",
        "mlx-lm": "mlx-lm server",
        "llama.cpp": "llama.cpp server",
        "llama.cpp-ram": "llama.cpp server, RAM cache",
    }
    rows = []
    for key in args.configs.split(","):
        rows.append(trio.run(bench, kinds[key], args.model, name, folder, tokenizer, args))

    base = next((r for r in rows if r["kind"] == "kvgrove, cache off"), None)

    def fmt_bytes(n):
        return "-" if n is None else f"{n / 2**20:.1f} MiB"

    print(
        f"\n{args.users} users x {args.rounds} rounds, system ~{args.system_tokens} tokens, "
        f"+{args.new_tokens} user / {args.output_tokens} reply tokens per round, "
        f"concurrency {args.concurrency}; model {name}\n"
    )
    print(
        table(
            [
                "server",
                "TTFT p50 s",
                "TTFT p90 s",
                "p50 vs off",
                "prompt tokens",
                "computed",
                "minimum",
                "computed/min",
                "hit ratio",
                "moved",
                "device max / budget",
                "wall s",
            ],
            [
                [
                    r["kind"],
                    r["ttft_p50"],
                    r["ttft_p90"],
                    "-" if base is None else f"{r['ttft_p50'] / base['ttft_p50']:.2f}x",
                    r["prompt"],
                    "n/a" if r["computed"] is None else r["computed"],
                    r["minimum"],
                    "n/a" if r["computed"] is None else f"{r['computed'] / r['minimum']:.3f}",
                    "n/a" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}",
                    fmt_bytes(r["moved_bytes"]),
                    "-"
                    if r["device_max"] is None
                    else f"{fmt_bytes(r['device_max'])} / {fmt_bytes(r['device_budget'])}",
                    r["wall"],
                ]
                for r in rows
            ],
        )
    )
    peers = [r for r in rows if r["kind"] == "llama.cpp server"]
    ref = {k: median([p[k] for p in peers]) for k in ("later_p50", "first_p50")} if peers else {}

    def vs(r, key):
        return f"{r[key] / ref[key]:.2f}x" if ref and r[key] is not None else "-"

    print("\nTTFT by turn (later: round 2 on; doc-cached first: round 1 after the first request)\n")
    print(
        table(
            [
                "server",
                "later p50 s",
                "later p90 s",
                "vs llama.cpp",
                "doc-cached first p50 s",
                "first p90 s",
                "vs llama.cpp",
            ],
            [
                [
                    r["kind"],
                    r["later_p50"],
                    r["later_p90"],
                    vs(r, "later_p50"),
                    r["first_p50"],
                    r["first_p90"],
                    vs(r, "first_p50"),
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
