"""One rank of a tensor-parallel run (started by mlx.launch, or alone with --plain):
`tp_ranks.py OUT MODEL... [--plain] [--turns=0,1]`, the models one after the other in the same
processes.

Rank 0 runs the real accountant, scheduler and executor (TensorParallelExecutor; the plain
Executor with --plain) on a tiny model and serves a fixed set of requests at once: greedy
ones of several prompt lengths (batched decode, prefill together, chunked prefill), a seeded
sampled one, one with a random seed (-1), one under a grammar, one whose grammar does not
compile, and one cancelled after three tokens. The other ranks follow. Each rank writes
OUT/<i>-rank<r>.json for the i-th model: rank 0 the tokens each request received, the others
the tokens they drew themselves for each request and the steps they ran. `--turns=I,...`
also runs those models' later turns over the prefix cache (`run_turns`, the real pager on
rank 0; OUT/<i>-turns-rank<r>.json). Failure scenarios: `--die-after=N` (rank 1 SIGKILLs
itself after drawing N tokens), `--stop-after=N` (SIGSTOPs itself: hung), `--tp-timeout=S`,
`--rank1-model=PATH` (rank 1 loads another model: a startup error).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

# isort: off
import kvgrove  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

# isort: on
import trio

from kvgrove.actors.engine import start_engine
from kvgrove.actors.executor import Executor
from kvgrove.actors.messages import Cancel, Done, Failed, Submit, Token
from kvgrove.config import Settings
from kvgrove.distributed.executor import TensorParallelExecutor, follower
from kvgrove.grammar import regex_grammar
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
REQUESTS = {  # request id -> (prompt length, params, max tokens)
    1: (5, GREEDY, 12),
    2: (11, GREEDY, 12),
    3: (40, GREEDY, 10),  # several prefill chunks
    4: (11, SamplingParams(temperature=0.9, top_k=0, top_p=1.0, seed=1234), 12),
    5: (7, SamplingParams(temperature=1.0, seed=-1), 12),
    6: (9, SamplingParams(temperature=0, grammar=regex_grammar("[a-e]{4,9}")), 12),
    # Refused on every rank before any compute (the grammar does not compile): only this
    # request fails, the ranks stay in step.
    7: (9, SamplingParams(temperature=0, grammar="%%% not a grammar"), 12),
}
CANCELLED = 9


def prompt(rid: int, n: int) -> tuple[int, ...]:
    return tuple((rid * 37 + i * 11) % 300 + 10 for i in range(n))


def submit(rid, n, params, max_tokens, reply) -> Submit:
    return Submit(rid, prompt(rid, n), params, max_tokens, 400, frozenset(), reply)


async def ask(scheduler, rid: int, tokens: tuple[int, ...], namespace: str = "") -> dict:
    """One greedy request of 8 tokens: its tokens and the prompt tokens it had cached."""
    send, recv = trio.open_memory_channel(64)
    await scheduler.inbox.send(
        Submit(rid, tokens, GREEDY, 8, 400, frozenset(), send, namespace=namespace)
    )
    got: dict = {"tokens": []}
    async for msg in recv:
        if isinstance(msg, Token):
            got["tokens"].append(msg.token)
        elif isinstance(msg, Failed):
            return {"failed": msg.message}
        elif isinstance(msg, Done):
            return {**got, "cached": msg.cached_tokens}
    raise AssertionError("the reply channel closed")


def _executor_factory(plain: bool, group, **kwargs):
    """start_engine's executor: one process's (the reference), or rank 0 of tensor parallel."""
    return Executor if plain else partial(TensorParallelExecutor, group=group, **kwargs)


async def drive_turns(settings: Settings, group, plain: bool, phase: int, before: dict) -> dict:
    """Later turns over the prefix cache (prefix_cache on; off for the reference). Phase 1:
    A, then A's second turn (its prefix back from the host tier), then B in namespace
    "damaged". Phase 2 (the next start, same folder): A's third turn (from the disk tier) and
    B's second turn at once; rank 1 damaged its files of "damaged" in between."""
    out: dict = {}
    async with trio.open_nursery() as nursery:
        factory = _executor_factory(plain, group)
        engine = await start_engine(nursery, settings, loader=load, executor_factory=factory)
        executor, pager, scheduler = engine.executor, engine.pager, engine.scheduler
        with trio.fail_after(60):
            if phase == 1:
                a, b = prompt(11, 20), prompt(12, 20)
                out["a1"] = {"prompt": a, **await ask(scheduler, 21, a)}
                a2 = a + tuple(out["a1"]["tokens"]) + prompt(13, 5)
                out["a2"] = {"prompt": a2, **await ask(scheduler, 22, a2)}
                out["b1"] = {"prompt": b, **await ask(scheduler, 23, b, "damaged")}
            else:
                a3 = tuple(before["a2"]["prompt"]) + tuple(before["a2"]["tokens"])
                a3 += prompt(14, 5)
                b2 = tuple(before["b1"]["prompt"]) + tuple(before["b1"]["tokens"])
                b2 += prompt(15, 5)

                async def turn(name, rid, tokens, namespace=""):
                    out[name] = {"prompt": tokens, **await ask(scheduler, rid, tokens, namespace)}

                async with trio.open_nursery() as turns:  # batched
                    turns.start_soon(turn, "a3", 24, a3)
                    turns.start_soon(turn, "b2", 25, b2, "damaged")
        if pager.cache is not None:
            out["cache"] = await executor.mlx.call(pager.cache.statistics)
        nursery.cancel_scope.cancel()
    return out


def damage(kv_dir: Path, rank: int, namespace: str) -> int:
    """Flip the last byte of this rank's files of `namespace` (the tensors' data): each reads
    back as corrupt. Returns the files damaged."""
    n = 0
    for path in kv_dir.glob(f"*+tp{rank}of*/{namespace}/*.safetensors"):
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        n += 1
    return n


async def drive(settings: Settings, group, plain: bool) -> dict:
    out: dict[str, list[int] | str] = {}
    lost = trio.Event()

    def on_lost(message: str) -> None:
        out["lost"] = message
        lost.set()

    async with trio.open_nursery() as nursery:
        factory = _executor_factory(plain, group, on_lost=on_lost)
        engine = await start_engine(nursery, settings, loader=load, executor_factory=factory)
        executor, scheduler = engine.executor, engine.scheduler

        async def one(rid, n, params, max_tokens):
            send, recv = trio.open_memory_channel(64)
            await scheduler.inbox.send(submit(rid, n, params, max_tokens, send))
            tokens = []
            async for msg in recv:
                if isinstance(msg, Token):
                    tokens.append(msg.token)
                    if rid == CANCELLED and len(tokens) == 3:
                        recv.close()
                        await scheduler.inbox.send(Cancel(rid, time.monotonic()))
                        break
                elif isinstance(msg, Failed):
                    out[str(rid)] = f"failed: {msg.message}"
                    return
                elif isinstance(msg, Done):
                    break
            out[str(rid)] = tokens

        with trio.fail_after(60):
            async with trio.open_nursery() as requests:
                for rid, (n, params, max_tokens) in REQUESTS.items():
                    requests.start_soon(one, rid, n, params, max_tokens)
                requests.start_soon(one, CANCELLED, 9, GREEDY, 50)
        out["layout"] = executor.loaded.info.tensor_parallel
        out["steps"] = executor.statistics().steps
        out["max_batch_rows"] = executor.statistics().max_batch_rows
        nursery.cancel_scope.cancel()
    return out


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    plain = "--plain" in sys.argv
    die = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--die-after=")), None)
    # --stop-after=N: rank 1 SIGSTOPs itself instead (a hung rank); --tp-timeout=S for rank 0.
    stop = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--stop-after=")), None)
    if stop is not None:
        die = -stop
    out_dir, models = Path(args[0]), args[1:]
    group = mx.distributed.init()
    for a in sys.argv:  # --rank1-model=PATH: rank 1 loads another model (a startup error)
        if a.startswith("--rank1-model=") and group.rank() == 1:
            models = [a.split("=", 1)[1]] * len(models)
    # --turns=0,1: the prefix-cache turns (run_turns) too, for those models
    turns_of = next((a.split("=")[1].split(",") for a in sys.argv if a.startswith("--turns=")), [])
    for i, model in enumerate(models):
        result = run_model(model, group, plain, die)
        (out_dir / f"{i}-rank{group.rank()}.json").write_text(json.dumps(result))
        if "lost" in result:
            return 2  # as `kvgrove serve` does when it loses a rank
        if str(i) in turns_of:
            turns = run_turns(model, group, plain, out_dir / f"kv{i}")
            (out_dir / f"{i}-turns-rank{group.rank()}.json").write_text(json.dumps(turns))
    return 0


def run_turns(model: str, group, plain: bool, kv_dir: Path) -> dict:
    # The device tier holds next to nothing: every stored span goes to host memory at once;
    # the first phase's shutdown writes them to disk, where the second phase finds them.
    settings = Settings(
        model=model,
        prefill_chunk_tokens=16,
        prefix_cache=not plain,
        kv_cache_dir=str(kv_dir),
        device_cache_bytes=1,
    )
    out: dict = {}
    for phase in (1, 2):
        if group.rank() == 0:
            out[phase] = trio.run(drive_turns, settings, group, plain, phase, out.get(1, {}))
        else:
            if phase == 2:
                out["damaged_files"] = damage(kv_dir, group.rank(), "damaged")
            f = follower(settings, group, loader=load)
            f.run()
            out[phase] = {"cache": f.executor.pager.cache.statistics()}
    return out


def run_model(model: str, group, plain: bool, die: int | None = None) -> dict:
    timeout = next((float(a.split("=")[1]) for a in sys.argv if a.startswith("--tp-timeout=")), 60)
    # The decode overlap on (a CPU's auto is off): every rank runs the same decode ahead.
    settings = Settings(
        model=model,
        prefill_chunk_tokens=16,
        prefix_cache=False,
        tp_timeout_seconds=timeout,
        decode_overlap="on",
    )
    if group.rank() == 0:
        return trio.run(drive, settings, group, plain)
    drawn: dict[str, list[int]] = {}

    def record(step, step_result):
        if die is not None and len(drawn) and sum(map(len, drawn.values())) >= abs(die):
            # rank 1 dies mid-stream, no goodbye (or, die < 0, hangs: stopped)
            os.kill(os.getpid(), signal.SIGKILL if die > 0 else signal.SIGSTOP)
        for r in step_result.results:
            if r.token is not None:
                drawn.setdefault(str(r.request_id), []).append(r.token)

    f = follower(settings, group, loader=load, on_result=record)
    steps = f.run()
    return {"steps": steps, "layout": f.executor.loaded.info.tensor_parallel, **drawn}


if __name__ == "__main__":
    code = main()
    # Skip the interpreter's teardown (as `kvgrove serve` does): destroying MLX's stream
    # threads during finalization intermittently aborts ("terminate called without an
    # active exception") after a clean run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
