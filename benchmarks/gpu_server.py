"""On a GPU: MLX's own batched loop vs kvgrove's server vs mlx-lm's server, on a random model.

One command on the lent machine (MLX's CUDA wheel installed, see /work/shared/gpu/README.md):

    python3 benchmarks/gpu_server.py [--shape llama-3.1-8b] [--modes bf16,4bit]
        [--levels 1,8,32,64] [--gen-tokens 64] [--work /tmp/kvg-gpu] [--deadline-seconds 560]

A device call lasts at most 600 s: run one mode per call (`--modes bf16`, then `--modes 4bit`;
the model folders stay in --work while the machine is held). Past --deadline-seconds the
remaining phases are skipped and the table printed with "-" for them.

For each mode (bf16; 4-bit, group 64) it writes a random-weight model of the shape (a Hugging
Face folder; the tokenizer is a byte-level BPE padded to the model's vocabulary, so every id
decodes), then, one after another (never two at once):

- MLX alone: the model's batched greedy decode loop (loaded by mlx-lm, quantized layers as
  they are; `BatchKVCache`, async_eval pipelining, tokens read every step), batch = each
  level, decode only ("MLX loop") and over a whole wave ("MLX loop whole wave": the c
  prompts, as long as the servers' wave prompts, prefilled as one batch, then the decode; the
  servers' waves pay their prefills too, so this is the like-for-like yardstick, the decode-only
  one the stricter); and kvgrove's single-stream core (`kvgrove.models.generate.generate`, loaded as
  kvgrove's server loads it). Each measured after a run that compiles the shapes.
- kvgrove's server (`--max-running-sequences 64`), then mlx-lm's (`--decode-concurrency 64`):
  on a fresh start, ten single requests one after another (TTFT of the first vs the tenth: the
  compile stall), then at each concurrency c two waves of c streaming /v1/completions requests
  with distinct prompts (first wave vs steady wave: aggregate generated tokens/s, TTFT p50;
  `--steady-waves K`: the median of K steady waves, the slower middle one of an even K).

Quantized modes first time MLX's first use of its batched quantized kernel (`qmm_sm80`, which
MLX 0.32.4 compiles with NVRTC at first use, about a minute or more per tile, then caches on
disk under /tmp/mlx; benchmarks/gpu_quant.py --first-use), one process per tile at once, so
no phase after it meets that compile inside its deadline: the reason perf2's 4-bit runs never
got past their first step. `--no-precompile` skips it (then the first batched step of each
phase pays it).

Then it prints the tables, with ratios. Servers' logs go to <work>/logs. A phase that fails or
runs past its deadline shows as "-" and the rest goes on. The benchmark's clients are raw
HTTP/1.1 sockets (no JSON parsing per chunk) so they cost the servers' CPU as little as they can.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    # For trying the script on a CPU.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    ),
}
VOCAB = 49152
FILLER = (
    "The history of the printing press is a story of slow diffusion and sudden change. "
    "Movable type spread from Mainz along trade routes, and each new shop trained apprentices "
    "who founded shops of their own. "
)


# -- the model ---------------------------------------------------------------------------------


def write_tokenizer(folder: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer.json with ChatML specials, padded to `vocab` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([FILLER] * 50 + ["hello world", "Note 1-2."] * 50, trainer)
    tok.add_tokens([f"<x{i}>" for i in range(vocab - tok.get_vocab_size())])
    assert tok.get_vocab_size() == vocab
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            }
        )
    )


def random_model(shape: str) -> tuple[Any, dict]:
    """A llama of `shape` with random bf16 weights (unit norms), in memory, and its config."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models import llama

    cfg = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        vocab_size=VOCAB,
        max_position_embeddings=32768,
        torch_dtype="bfloat16",
        bos_token_id=1,
        eos_token_id=2,
        **SHAPES[shape],
    )
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.set_dtype(mx.bfloat16)
    model.update(
        nn.utils.tree_map(
            lambda p: (mx.random.normal(p.shape) * 0.02).astype(p.dtype), model.parameters()
        )
    )
    for layer in model.layers:
        layer.input_layernorm.weight = mx.ones_like(layer.input_layernorm.weight)
        layer.post_attention_layernorm.weight = mx.ones_like(layer.post_attention_layernorm.weight)
    model.model.norm.weight = mx.ones_like(model.model.norm.weight)
    return model, cfg


def write_model(folder: Path, shape: str, bits: int | None) -> None:
    """Random weights of `shape` (bf16, optionally quantized to `bits`, group 64)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    if (folder / "config.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    model, cfg = random_model(shape)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
        cfg["quantization"] = {"group_size": 64, "bits": bits}
    mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_tokenizer(folder, VOCAB)
    (folder / "config.json").write_text(json.dumps(cfg))  # last: marks the folder complete


# -- MLX alone ---------------------------------------------------------------------------------


def mlx_alone(folder: Path, levels: list[int], gen_tokens: int, prompt_tokens: int) -> dict:
    """The batched loop's tok/s per batch size, and kvgrove's single-stream core."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache
    from mlx_lm.utils import load_model

    from kvgrove.models.generate import Timings, generate
    from kvgrove.models.loading import load

    model, _ = load_model(folder)  # MLX's own: quantized layers stay as they are

    from kvgrove.tokenize import load_tokenizer

    # The servers' wave prompts' length, for the whole-wave yardstick.
    wave_prompt = len(load_tokenizer(folder).encode("Note 1-steady-0. " + FILLER))

    def loop(b: int, plen: int = prompt_tokens) -> tuple[float, float]:
        """(decode tok/s, whole-wave tok/s: the b prompts of plen tokens prefilled as one batch,
        then gen_tokens each, over the wall time of both: what a server's wave does at best)."""
        cache = [BatchKVCache([0] * b) for _ in model.layers]
        prompt = mx.random.randint(0, VOCAB - 1, (b, plen))
        mx.eval(prompt)
        t0 = time.perf_counter()
        y = mx.argmax(model(prompt, cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
        prefill = time.perf_counter() - t0
        for _ in range(3):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.eval(y)
        t = time.perf_counter()
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(y)
        for _ in range(gen_tokens - 1):
            nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(nxt)
            y.tolist()
            y = nxt
        y.tolist()
        decode = time.perf_counter() - t
        # The 3 steps between are not counted: the wave's tokens over prefill + decode.
        return gen_tokens * b / decode, gen_tokens * b / (prefill + decode)

    out: dict = {"loop": {}, "loop_wave": {}}
    for b in levels:
        loop(b)  # compiles this shape
        out["loop"][b] = loop(b)[0]
        print(f"  MLX loop batch {b}: {out['loop'][b]:.0f} tok/s", flush=True)
        print("RESULT " + json.dumps({"loop": {b: out["loop"][b]}}), flush=True)
        loop(b, wave_prompt)
        out["loop_wave"][b] = loop(b, wave_prompt)[1]
        print(
            f"  MLX loop whole wave {b} x {wave_prompt}-token prompts: "
            f"{out['loop_wave'][b]:.0f} tok/s",
            flush=True,
        )
        print("RESULT " + json.dumps({"loop_wave": {b: out["loop_wave"][b]}}), flush=True)
        mx.clear_cache()
    del model
    mx.clear_cache()
    model = load(str(folder)).model  # kvgrove's, as its server loads it
    ids = [int(i) for i in mx.random.randint(3, 2000, (prompt_tokens,)).tolist()]
    for _ in range(2):  # the first run compiles
        timings = Timings()
        for _ in generate(model, ids, max_tokens=gen_tokens, timings=timings):
            pass
    out["core"] = timings.decode_tokens_per_second
    print(f"  kvgrove core, one stream: {out['core']:.0f} tok/s", flush=True)
    print("RESULT " + json.dumps({"core": out["core"]}), flush=True)
    # A whole request as the servers' c=1 wave sees one: its prompt (the same text, tokenized
    # as the server does) prefilled, then gen_tokens tokens, over the wall time of both.
    from kvgrove.tokenize import load_tokenizer

    prompt = load_tokenizer(folder).encode("Note 1-steady-0. " + FILLER, parse_special=False)
    for _ in range(2):
        timings = Timings()
        t = time.perf_counter()
        for _ in generate(model, prompt, max_tokens=gen_tokens, timings=timings):
            pass
        whole = timings.generated_tokens / (time.perf_counter() - t)
    out["core_request"] = whole
    print(f"  kvgrove core, whole {len(prompt)}-token request: {whole:.0f} tok/s", flush=True)
    print("RESULT " + json.dumps({"core_request": whole}), flush=True)
    return out


# -- servers -----------------------------------------------------------------------------------


async def one(port: int, model: str, prompt: str, gen_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, generated tokens) of one streamed completion over a raw socket."""
    from _client import streamed_completion

    return await streamed_completion(port, model, prompt, gen_tokens)


async def wave(port: int, model: str, c: int, gen_tokens: int, tag: str) -> dict:
    import trio

    results: list[tuple[float, int]] = []

    async def run(i: int) -> None:
        results.append(await one(port, model, f"Note {tag}-{i}. " + FILLER, gen_tokens))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(c):
            nursery.start_soon(run, i)
    wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    out = {"tps": sum(n for _, n in results) / wall, "ttft": ttfts[len(ttfts) // 2], "wall": wall}
    if c == 1 and results[0][1] > 1 and wall > results[0][0]:
        # One stream: its decode rate after the first token (the core's "decode" figure).
        out["decode_tps"] = (results[0][1] - 1) / (wall - results[0][0])
    return out


def mlx_busy(port: int) -> tuple[float, int]:
    """kvgrove's /metrics: (the MLX thread's busy seconds, executor steps) so far."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    busy, steps = 0.0, 0
    for line in text.splitlines():
        if line.startswith("kvgrove_mlx_thread_busy_seconds"):
            busy = float(line.rsplit(" ", 1)[1])
        elif line.startswith('kvgrove_executor_steps{kind="all"}'):
            steps = int(float(line.rsplit(" ", 1)[1]))
    return busy, steps


async def serve_bench(kind: str, folder: Path, args, log: Path) -> dict:
    import trio

    sys.path.insert(0, str(HERE))
    from _servers import free_port, start_kvgrove, start_mlx_lm, stop, wait_ready

    port = free_port()
    if kind == "kvgrove":
        # A fresh prefix cache each start: one a run before left on disk would be recovered
        # and its prompts (the same as this run's) restored from disk, another benchmark.
        kv = args.work / "kv"
        shutil.rmtree(kv, ignore_errors=True)
        flags = ["--max-running-sequences", "64", "--kv-cache-dir", str(kv)]
        flags += args.kvgrove_flag
        if args.timeline:
            flags += ["--timeline-file", str(log.with_suffix(".timeline.jsonl"))]
        proc = start_kvgrove(port, str(folder), flags, log=log)
    else:
        proc = start_mlx_lm(port, folder, ["--decode-concurrency", "64"], log=log)
    out: dict = {}
    started = time.perf_counter()
    try:
        await wait_ready(
            f"http://127.0.0.1:{port}", proc, deadline_seconds=limit(args, args.ready_seconds)
        )
        out["ready_s"] = time.perf_counter() - started
        print(f"  {kind}: ready after {out['ready_s']:.0f} s", flush=True)
        with trio.fail_after(limit(args, args.phase_seconds)):
            ttfts = []
            for i in range(10):
                t, _ = await one(port, str(folder), f"Single {i}. " + FILLER, 8)
                ttfts.append(t)
            out["ttft_first"], out["ttft_tenth"] = ttfts[0], ttfts[-1]
            print(f"  {kind}: TTFT first {ttfts[0]:.2f} s, tenth {ttfts[-1]:.2f} s", flush=True)
        for c in args.levels:
            steady: list[dict] = []
            waves = ["first"] + [f"steady{k or ''}" for k in range(args.steady_waves)]
            for name in waves:
                which = "first" if name == "first" else "steady"
                last = name == waves[-1]
                spy = None
                if args.py_spy and which == "steady" and last and c == max(args.levels):
                    raw = log.with_suffix(".pyspy.raw")
                    spy_argv = [args.py_spy, "record", "-p", str(proc.pid), "-r", "200", "-t"]
                    spy_argv += ["-f", "raw", "-o", str(raw), "--nonblocking", "-d", "8"]
                    spy = subprocess.Popen(
                        spy_argv,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                before = mlx_busy(port) if kind == "kvgrove" else None
                with trio.fail_after(limit(args, args.phase_seconds)):
                    r = await wave(port, str(folder), c, args.gen_tokens, tag=f"{c}-{name}")
                if spy is not None:
                    spy.wait(30)
                if which == "first":
                    out[(c, which)] = r
                else:  # the median steady wave by tok/s (waves vary by ±20% on the H200);
                    # of an even count the lower middle one: [len // 2] took the faster of two
                    steady.append(r)
                    ranked = sorted(steady, key=lambda w: w["tps"])
                    out[(c, which)] = ranked[(len(ranked) - 1) // 2]
                busy = ""
                if before is not None:
                    after = mlx_busy(port)
                    share, steps = (after[0] - before[0]) / r["wall"], after[1] - before[1]
                    busy = f", MLX thread busy {share:.0%} of the wave, {steps} steps"
                print(
                    f"  {kind} c={c} {name}: {r['tps']:.0f} tok/s, TTFT p50 {r['ttft']:.2f} s"
                    + busy,
                    flush=True,
                )
            if len(steady) > 1:
                print(
                    f"  {kind} c={c} steady waves: "
                    + ", ".join(f"{w['tps']:.0f}" for w in steady)
                    + f" tok/s (median {out[(c, 'steady')]['tps']:.0f})",
                    flush=True,
                )
    except Exception:
        traceback.print_exc()
        print(f"  {kind}: failed (log: {log})", flush=True)
    finally:
        stop(proc)
    timeline = log.with_suffix(".timeline.jsonl")
    if kind == "kvgrove" and args.timeline and timeline.exists():
        from timeline import report as timeline_report

        print(timeline_report(timeline), flush=True)
    return out


# -- the table ---------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def precompile(bits: int, args) -> dict:
    """MLX's quantized kernels for `bits`, group 64, compiled (or found in MLX's disk cache) by
    one process per qmm_sm80 tile at once; {rows: first call's seconds, "all": wall seconds}."""
    sys.path.insert(0, str(HERE))
    from gpu_quant import first_uses

    t = time.perf_counter()
    found = first_uses([f"q:{bits}:64"], 4, args.py_spy, args.work / "logs" / f"first-use-{bits}")
    out: dict = {"rows": {r["rows"]: r["first"] for r in found}, "all": time.perf_counter() - t}
    print(f"  MLX's quantized matmul, first use: {first_cells(out)}; {out['all']:.0f} s")
    return out


def first_cells(first: dict) -> str:
    return ", ".join(f"{rows} rows {s:.1f} s" for rows, s in sorted(first["rows"].items()))


def dense_copy_line(log: Path) -> str:
    """What kvgrove's server said about dense copies of the quantized layers (models.quant)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return next((line for line in lines if "dense copy" in line), "")


def report(
    mode: str, alone: dict, kv: dict, ml: dict, levels: list[int], first: dict | None = None
) -> str:
    loop, loop_wave = alone.get("loop", {}), alone.get("loop_wave", {})
    lines = [f"\n### {mode}\n"]
    lines.append(
        "| concurrency | MLX loop | MLX loop whole wave | kvgrove first wave | kvgrove steady "
        "| mlx-lm first wave | mlx-lm steady | kvgrove / MLX loop | kvgrove / MLX whole wave "
        "| kvgrove / mlx-lm | TTFT p50 kvgrove first / steady | TTFT p50 mlx-lm first / steady |"
    )
    lines.append("|" + "---|" * 12)
    for c in levels:
        kf, ks = kv.get((c, "first"), {}), kv.get((c, "steady"), {})
        mf, ms = ml.get((c, "first"), {}), ml.get((c, "steady"), {})
        lines.append(
            f"| {c} | {fmt(loop.get(c))} | {fmt(loop_wave.get(c))} | {fmt(kf.get('tps'))} "
            f"| {fmt(ks.get('tps'))} | {fmt(mf.get('tps'))} | {fmt(ms.get('tps'))} "
            f"| {ratio(ks.get('tps'), loop.get(c))} | {ratio(ks.get('tps'), loop_wave.get(c))} "
            f"| {ratio(ks.get('tps'), ms.get('tps'))} "
            f"| {fmt(kf.get('ttft'), 2)} / {fmt(ks.get('ttft'), 2)} "
            f"| {fmt(mf.get('ttft'), 2)} / {fmt(ms.get('ttft'), 2)} |"
        )
    core, whole = alone.get("core"), alone.get("core_request")
    steady1 = kv.get((1, "steady"), {}) if 1 in levels else {}
    kv1, kv1_decode = steady1.get("tps"), steady1.get("decode_tps")
    lines.append(
        f"\nkvgrove's single-stream core: {fmt(core)} tok/s decoding, {fmt(whole)} over a whole "
        f"request (its prompt prefilled too); the server at concurrency 1: {fmt(kv1)} per whole "
        f"request ({ratio(kv1, whole)} of the core's), {fmt(kv1_decode)} decoding after the "
        f"first token ({ratio(kv1_decode, core)} of the core's)."
    )
    lines.append(
        f"Fresh server, ten single requests one after another, TTFT first / tenth: kvgrove "
        f"{fmt(kv.get('ttft_first'), 2)} / {fmt(kv.get('ttft_tenth'), 2)} s (ready after "
        f"{fmt(kv.get('ready_s'))} s), mlx-lm {fmt(ml.get('ttft_first'), 2)} / "
        f"{fmt(ml.get('ttft_tenth'), 2)} s (ready after {fmt(ml.get('ready_s'))} s)."
    )
    if first:
        cells = first_cells(first)
        lines.append(
            f"MLX's batched quantized kernel (qmm_sm80), first use in a fresh process, one process "
            f"per tile at once ({fmt(first.get('all'))} s in all): {cells}; later processes load "
            "it from MLX's disk cache."
        )
    if kv.get("dense"):
        lines.append(f"kvgrove's server: {kv['dense'].strip()}")
    return "\n".join(lines)


def limit(args, seconds: float) -> float:
    """A phase's deadline: its own, cut to what is left of --deadline-seconds (at least 1 s, so
    a phase past the deadline fails at once and the table still prints)."""
    left = args.deadline_seconds - (time.monotonic() - args.started)
    return max(1.0, min(seconds, left))


def run_alone(argv: list[str], env: dict, args, mode: str) -> dict:
    """MLX alone in a subprocess (its own GPU memory), its output echoed once it ends, the
    results it printed (RESULT lines) kept even when it runs past --alone-seconds."""
    out_path = args.work / "logs" / f"mlx-alone-{mode}.log"
    with open(out_path, "w") as out:
        try:
            subprocess.run(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=limit(args, args.alone_seconds),
            )
        except subprocess.TimeoutExpired:
            print(f"  MLX alone: stopped after {args.alone_seconds:.0f} s", flush=True)
    alone: dict = {"loop": {}, "loop_wave": {}}
    for line in out_path.read_text().splitlines():
        if line.startswith("RESULT "):
            raw = json.loads(line[7:])
            for key in ("loop", "loop_wave"):
                alone[key].update({int(k): v for k, v in raw.get(key, {}).items()})
            for key in ("core", "core_request"):
                if key in raw:
                    alone[key] = raw[key]
        elif line.strip():
            print(line, flush=True)
    return alone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--modes", default="bf16,4bit")
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="MLX loop's prompt per row")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kvg-gpu"))
    ap.add_argument("--skip", default="", help="comma-separated: mlx,kvgrove,mlx-lm")
    ap.add_argument("--kvgrove-flag", action="append", default=[], help="extra kvgrove flag")
    ap.add_argument("--py-spy", help="py-spy binary: profile each server's last steady wave")
    ap.add_argument(
        "--steady-waves",
        type=int,
        default=1,
        help="steady waves per level after the first; the table shows the median (of an even "
        "count the slower middle one)",
    )
    ap.add_argument(
        "--timeline",
        action="store_true",
        help="kvgrove records its timeline (--timeline-file); each wave's summary is printed",
    )
    ap.add_argument("--alone-seconds", type=float, default=150, help="MLX alone's deadline")
    ap.add_argument(
        "--deadline-seconds",
        type=float,
        default=560,
        help="the whole run's: phases past it are skipped, the table printed (a device call "
        "may last 600 s)",
    )
    ap.add_argument(
        "--no-precompile",
        action="store_true",
        help="quantized modes: no first-use compile of MLX's qmm_sm80 before the phases",
    )
    ap.add_argument("--ready-seconds", type=float, default=240)
    ap.add_argument("--phase-seconds", type=float, default=120)
    ap.add_argument(
        "--_write", nargs=3, metavar=("FOLDER", "SHAPE", "BITS"), help=argparse.SUPPRESS
    )
    ap.add_argument("--_alone", nargs=1, metavar="FOLDER", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.started = time.monotonic()
    args.levels = [int(x) for x in args.levels.split(",")]
    if args._write:
        folder, shape, bits = args._write
        write_model(Path(folder), shape, int(bits) or None)
        return
    if args._alone:
        mlx_alone(Path(args._alone[0]), args.levels, args.gen_tokens, args.prompt_tokens)
        return

    import trio

    skip = set(filter(None, args.skip.split(",")))
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--levels", ",".join(map(str, args.levels)), "--gen-tokens", str(args.gen_tokens)]
    common += ["--prompt-tokens", str(args.prompt_tokens)]
    reports = []
    for mode in args.modes.split(","):
        bits = 4 if mode == "4bit" else 8 if mode == "8bit" else 0
        folder = args.work / f"{args.shape}-{mode}"
        t = time.perf_counter()
        subprocess.run([*me, "--_write", str(folder), args.shape, str(bits)], env=env, check=True)
        print(f"[{mode}] model in {folder} ({time.perf_counter() - t:.0f} s)", flush=True)
        first = precompile(bits, args) if bits and not args.no_precompile else None
        alone: dict = {}
        if "mlx" not in skip:
            alone = run_alone([*me, "--_alone", str(folder), *common], env, args, mode)
        kv = ml = {}
        if "kvgrove" not in skip:
            kv_log = args.work / "logs" / f"kvgrove-{mode}.log"
            kv = trio.run(serve_bench, "kvgrove", folder, args, kv_log)
            kv["dense"] = dense_copy_line(kv_log)
        if "mlx-lm" not in skip:
            ml = trio.run(
                serve_bench, "mlx-lm", folder, args, args.work / "logs" / f"mlx-lm-{mode}.log"
            )
        reports.append(report(mode, alone, kv, ml, args.levels, first))
        print(reports[-1], flush=True)
    print(
        f"\n## GPU table: {args.shape}, random weights, {args.gen_tokens} greedy tokens per "
        "request, generated tokens/s"
    )
    for r in reports:
        print(r)


if __name__ == "__main__":
    main()
