"""Run one oracle `Scenario` through the real actors and check every promise of the prefix cache.

The actors are composed as the server composes them (`start_engine`: accountant, executor on its
MLX thread, pager, scheduler), in process. Its `watch_charges` hook shows the driver every
`Charge` on its way to the accountant: the driver notes the largest figure each tier of the
prefix cache was charged (the executor charges them after every step), so "no tier was ever
over its budget" is checked at step granularity.

Checks (each failure is a line in `Outcome.failures`):
- every completed request's tokens equal the cache-off greedy reference for its prompt, and a
  cancelled request's partial stream is a prefix of it; no request fails;
- the reported cached tokens equal those actually restored (the promise, less what a logged
  fallback recomputed);
- after each wave: no lock held, `check_integrity()` holds, the ledger is back to baseline (no
  live bytes nor sequences, cached bytes = the trie's bytes), no live sequence left;
- no tier's charged bytes ever exceeded its budget; no actor crashed or hung.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import struct
import time
import traceback
from pathlib import Path
from typing import Any

import attrs
import trio

from kvgrove import faults
from kvgrove.actors.engine import Engine, start_engine
from kvgrove.actors.messages import (
    CacheQuery,
    Cancel,
    Charge,
    Done,
    ExecutorQuery,
    Failed,
    MemoryQuery,
    Resume,
    Submit,
    Token,
)
from kvgrove.config import Settings
from kvgrove.faults import InjectedFault
from kvgrove.memory.ledger import TIERS
from kvgrove.sampling import SamplingParams
from oracle.workload import Damage, RemoveFolder, Request, Restart, Scenario, Wave

GREEDY = SamplingParams(temperature=0)
CONTEXT = 500
REFERENCE_TOKENS = 10  # the most any generated request asks for
DEADLINE = 120.0  # seconds for one wave, or one composition's start or stop: a hang is a failure
POLL = 0.002  # state polls (cancellation points, quiescence) look this often, under a deadline

_models: dict[str, Any] = {}


def reference_model(folder: str) -> Any:
    if folder not in _models:
        from kvgrove.models.loading import load

        _models[folder] = load(folder).model
    return _models[folder]


class References:
    """Cache-off greedy tokens, computed once per prompt (the actors are not running then, or the
    work goes to their MLX thread)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.memo: dict[tuple[int, ...], list[int]] = {}

    def compute(self, prompt: tuple[int, ...], n: int = REFERENCE_TOKENS) -> list[int]:
        from kvgrove.models.generate import generate

        got = self.memo.get(prompt)
        if got is None or len(got) < n:
            model = reference_model(self.folder)
            got = [s.token for s in generate(model, prompt, GREEDY, max_tokens=n)]
            self.memo[prompt] = got
        return got[:n]


@attrs.define
class Record:
    request: Request
    prompt: tuple[int, ...]
    tokens: list[int] = attrs.field(factory=list)
    end: Any = None  # Done | Failed | "cancelled"
    promised: int | None = None  # the pager's match, read off the scheduler at admission
    first_cached: int | None = None  # Token.cached_tokens on the first token, where reported
    cancelled_in: str | None = None  # the state it was cancelled in
    segment: int = 0  # which composition ran it


@attrs.define
class Outcome:
    failures: list[str] = attrs.field(factory=list)
    requests: int = 0
    completed: int = 0
    cancelled: collections.Counter = attrs.field(factory=collections.Counter)
    faults: collections.Counter = attrs.field(factory=collections.Counter)
    damage: collections.Counter = attrs.field(factory=collections.Counter)
    restarts: int = 0
    restored_tokens: int = 0
    preempted: int = 0
    locked_overshoots: int = 0  # a tier over budget by locked nodes only
    tolerated: collections.Counter = attrs.field(factory=collections.Counter)

    @property
    def ok(self) -> bool:
        return not self.failures


class _Fallbacks(logging.Handler):
    """Collects the executor's "recomputing" fallbacks: (promised, restored)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg, args = str(record.msg), record.args or ()
        if "recomputing" not in msg or not isinstance(args, tuple):
            return
        if msg.startswith("prefix cache gave") and len(args) == 2:
            self.seen.append((int(args[1]), int(args[0])))
        elif msg.startswith("restoring") and len(args) == 1:
            self.seen.append((int(args[0]), 0))


class _Actors:
    """The actors of one composition, started by `start_engine` as serve.py starts them, with
    every charge to the accountant shown to `Run.sample_tier` on its way."""

    def __init__(self, settings: Settings, kv_budget: int | None, run: Run) -> None:
        self.settings, self.kv_budget, self.run = settings, kv_budget, run
        self.engine: Engine | None = None
        self.early: list[Charge] = []  # charged while the engine started (the pager's recovery)

    async def start(self, nursery: trio.Nursery) -> None:
        self.engine = await start_engine(
            nursery, self.settings, kv_budget_bytes=self.kv_budget, watch_charges=self._charged
        )
        self.accountant, self.executor = self.engine.accountant, self.engine.executor
        self.pager, self.scheduler = self.engine.pager, self.engine.scheduler
        for charge in self.early:  # nothing is locked before the first request
            self._charged(charge)
        self.early = []

    def _charged(self, charge: Charge) -> None:
        if charge.category in TIERS and charge.owner == "prefix":
            if self.engine is None:
                self.early.append(charge)
            else:
                self.run.sample_tier(self, charge.category, charge.nbytes)

    async def ask(self, inbox, make) -> Any:
        send, recv = trio.open_memory_channel(1)
        with trio.fail_after(DEADLINE):
            await inbox.send(make(send))
            return await recv.receive()

    def state(self, rid: int) -> str:
        sched = self.scheduler
        if rid in sched._matching:
            return "queued"
        seq = sched.core.get(rid)
        if seq is None:
            return "gone"
        if not seq.started:
            return "queued"
        return "prefill" if seq.generated == 0 else "decode"

    async def quiesce(self) -> None:
        """Wait until the scheduler holds nothing and every actor has done what it was sent."""
        sched = self.scheduler
        with trio.fail_after(DEADLINE):
            while (
                sched._matching
                or sched._releases
                or sched.core._release
                or any(True for _ in sched.core.sequences())
            ):
                await trio.sleep(POLL)
            await self.ask(self.executor.inbox, ExecutorQuery)
            await self.ask(self.pager.inbox, lambda r: CacheQuery(r, check=False))
            await self.ask(self.executor.inbox, ExecutorQuery)


class Run:
    def __init__(
        self,
        scenario: Scenario,
        folder: str,
        refs: References,
        cache_dir: Path,
        tolerate: frozenset[str] = frozenset(),
    ) -> None:
        self.tolerate = tolerate  # named known defects counted in Outcome.tolerated, not failed
        self.sc = scenario
        self.folder = folder
        self.refs = refs
        self.cache_dir = cache_dir
        self.out = Outcome()
        self.records: dict[int, Record] = {}
        self.peaks: dict[str, int] = {}
        self.budgets: dict[str, int] = {}
        self.namespaces = {""} | {r.namespace for r in scenario.requests()}
        self.fallbacks = _Fallbacks()
        self.probes: list[tuple[int, ...]] = []
        self.segment = 0
        self.settings = Settings(model=folder, kv_cache_dir=str(cache_dir), **scenario.settings)

    def fail(self, text: str) -> None:
        self.out.failures.append(text)

    # -- prompts and references (before the actors run) ------------------------------------

    def prompts(self) -> dict[int, tuple[int, ...]]:
        out: dict[int, tuple[int, ...]] = {}
        for r in self.sc.requests():
            kind, arg = r.base
            if kind == "piece":
                base = self.sc.pieces[arg]
            elif kind == "turn":
                parent = self.sc.requests()[[q.rid for q in self.sc.requests()].index(arg)]
                base = out[arg] + tuple(self.refs.compute(out[arg])[: parent.max_tokens])
            else:
                base = ()
            out[r.rid] = (base + r.extra)[-(CONTEXT - REFERENCE_TOKENS - 1) :]
        return out

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> Outcome:
        prompts = self.prompts()
        for p in prompts.values():
            self.refs.compute(p)
        faults.disarm()
        for i, f in enumerate(self.sc.faults):
            error = OSError if f.point.startswith("disk.") else InjectedFault
            faults.arm(f.point, error=error, skip=f.skip, times=f.times, seed=self.sc.seed + i)
        logger = logging.getLogger("kvgrove")
        logger.addHandler(self.fallbacks)
        try:
            await self._segments(prompts)
        finally:
            logger.removeHandler(self.fallbacks)
            for f in self.sc.faults:
                self.out.faults[f.point] += faults.raised(f.point)
            faults.disarm()
        self._check_outputs()
        return self.out

    async def _segments(self, prompts: dict[int, tuple[int, ...]]) -> None:
        steps = list(self.sc.steps)
        while True:
            try:
                steps = await self._compose_and_run(steps, prompts)
            except BaseException as exc:  # an actor crashed or something hung
                if isinstance(exc, KeyboardInterrupt):
                    raise
                if os.environ.get("KVGROVE_ORACLE_TRACE"):  # where it came from, on stderr
                    traceback.print_exception(exc)
                self.fail(f"segment {self.segment}: actors failed: {_flatten(exc)}")
                return
            if not steps:
                return
            restart = steps.pop(0)
            assert isinstance(restart, Restart)
            self.out.restarts += 1
            self.segment += 1
            for d in restart.damage:
                self._damage(d)

    async def _compose_and_run(self, steps: list, prompts) -> list:
        """Run steps up to the next Restart on one composition; return what is left."""
        actors = _Actors(self.settings, self.sc.kv_budget_bytes, self)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(DEADLINE):
                await actors.start(nursery)
            cache = actors.pager.cache
            if cache is not None:
                self.budgets = {t: cache.budgets.of(t) for t in TIERS}
            await actors.quiesce()
            await self._check_clean(actors, "start")
            while steps and not isinstance(steps[0], Restart):
                step = steps.pop(0)
                if isinstance(step, RemoveFolder):
                    shutil.rmtree(self.cache_dir, ignore_errors=True)
                    continue
                await self._wave(actors, step, prompts)
            if self.probes:
                await self._probe(actors)
            self.out.preempted += actors.scheduler.statistics().preempted
            nursery.cancel_scope.cancel()  # the executor flushes the cache to disk
        return steps

    async def _wave(self, actors: _Actors, wave: Wave, prompts) -> None:
        progressed = {r.rid: trio.Event() for r in wave.requests}
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as clients:
                for r in wave.requests:
                    rec = self.records[r.rid] = Record(r, prompts[r.rid], segment=self.segment)
                    clients.start_soon(self._client, actors, rec, progressed)
            await actors.quiesce()
        await self._check_clean(actors, f"after wave of #{wave.requests[0].rid}")

    async def _probe(self, actors: _Actors) -> None:
        """Requests for prompts a tampered header claims: they must not get another's KV."""
        reqs = []
        for i, p in enumerate(self.probes):
            rid = 10_000 + 100 * self.segment + i
            ref = await actors.executor.mlx.call(self.refs.compute, p, 4)
            reqs.append(Request(rid, ("none", 0), (), 4))
            self.refs.memo.setdefault(p, ref)
            self.records[rid] = Record(reqs[-1], p, segment=self.segment)
        self.probes = []
        progressed = {r.rid: trio.Event() for r in reqs}
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as clients:
                for r in reqs:
                    clients.start_soon(self._client, actors, self.records[r.rid], progressed)
            await actors.quiesce()
        await self._check_clean(actors, "after probes")

    async def _client(self, actors: _Actors, rec: Record, progressed: dict) -> None:
        r = rec.request
        if r.arrive_after is not None and r.arrive_after in progressed:
            await progressed[r.arrive_after].wait()
        self.out.requests += 1
        stall = r.action.startswith("stall")
        send, recv = trio.open_memory_channel[object](1 if stall else 64)
        submit = Submit(
            r.rid,
            rec.prompt,
            GREEDY,
            r.max_tokens,
            CONTEXT,
            frozenset(),
            send,
            namespace=r.namespace,
        )
        sched = actors.scheduler
        try:
            await sched.inbox.send(submit)
            if r.action == "cancel_queued":
                await self._cancel(actors, rec, recv)
                return
            # Admission: read the pager's promise off the scheduler's sequence.
            while r.rid in sched._matching:
                await trio.sleep(POLL)
            seq = sched.core.get(r.rid)
            if seq is not None:
                rec.promised = seq.cached_tokens
            if r.action == "cancel_prefill":
                while actors.state(r.rid) == "queued":
                    await trio.sleep(POLL)
                await self._cancel(actors, rec, recv)
                return
            limit = (
                r.after if r.action in ("cancel_decode", "stall_resume", "stall_leave") else None
            )
            await self._read(rec, recv, limit, progressed)
            if rec.end is not None:
                return
            if r.action == "cancel_decode":
                await self._cancel(actors, rec, recv)
                return
            # A stalled client: stop reading until the scheduler has parked the sequence.
            while (seq := sched.core.get(r.rid)) is not None and not seq.parked:
                await trio.sleep(POLL)
            if r.action == "stall_leave":
                await self._cancel(actors, rec, recv, state="parked")
                return
            await self._read(rec, recv, None, progressed, resume=(sched, r.rid))
        finally:
            progressed[r.rid].set()
            recv.close()

    async def _cancel(self, actors: _Actors, rec: Record, recv, state: str | None = None) -> None:
        rec.cancelled_in = state or actors.state(rec.request.rid)
        await actors.scheduler.inbox.send(Cancel(rec.request.rid, time.monotonic()))
        recv.close()
        rec.end = "cancelled"
        self.out.cancelled[rec.cancelled_in] += 1

    async def _read(self, rec: Record, recv, limit, progressed, resume=None) -> None:
        async for msg in recv:
            if isinstance(msg, Token):
                if not rec.tokens:
                    rec.first_cached = getattr(msg, "cached_tokens", None)
                rec.tokens.append(msg.token)
                progressed[rec.request.rid].set()
                if resume is not None:
                    await resume[0].inbox.send(Resume(resume[1]))
                if limit is not None and len(rec.tokens) >= limit:
                    return
            elif isinstance(msg, Done | Failed):
                rec.end = msg
                return
        if rec.end is None:
            rec.end = Failed("the reply channel closed without Done or Failed")

    # -- damage between compositions ------------------------------------------------------

    def _damage(self, d: Damage) -> None:
        files = sorted(self.cache_dir.rglob("*.safetensors"))
        if not files:
            return
        path = files[d.pick % len(files)]
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else len(data)
        if d.how not in ("truncate", "delete", "flip_data") and 8 + n > len(data):
            return  # an earlier damage cut this file's header short: it stays damaged
        self.out.damage[d.how] += 1
        if d.how == "truncate":
            path.write_bytes(data[: max(1, len(data) // 2)])
        elif d.how == "flip_data":
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x5A]))
        elif d.how == "flip_header":
            i = 8 + n // 2
            path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :])
        elif d.how == "delete":
            path.unlink()
        else:
            try:
                header = json.loads(data[8 : 8 + n])
            except ValueError:  # an earlier damage left this header unreadable: it stays so
                self.out.damage[d.how] -= 1
                return
            meta = header.get("__metadata__", {})
            if d.how == "tamper_crc":
                meta["crc32"] = str((int(meta.get("crc32", "0")) + 1) % 2**32)
            else:  # tamper_tokens: the file now claims another prompt's tokens
                try:
                    tokens = json.loads(meta["tokens"])
                except (KeyError, TypeError, ValueError):  # a flipped byte broke the field
                    self.out.damage[d.how] -= 1
                    return
                if not isinstance(tokens, list) or not tokens or not isinstance(tokens[-1], int):
                    self.out.damage[d.how] -= 1
                    return
                tokens[-1] = 3 + (tokens[-1] - 2) % 317
                meta["tokens"] = json.dumps(tokens)
                if meta.get("start") == "0":
                    self.probes.append((*tokens, 7, 8, 9, 10))
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])

    # -- checks ----------------------------------------------------------------------------

    async def _check_clean(self, actors: _Actors, when: str) -> None:
        where = f"segment {self.segment}, {when}"
        memory = (await actors.ask(actors.accountant.inbox, MemoryQuery)).ledger
        if not memory.consistent:
            self.fail(f"{where}: ledger integrity: its totals disagree with its entries")
        if memory.live_cache_bytes or memory.live_sequences:
            self.fail(f"{where}: ledger not at baseline: {memory}")
        stats = actors.executor.statistics()
        if stats.live_sequences:
            self.fail(f"{where}: {stats.live_sequences} live sequences left in the executor")
        cache = actors.pager.cache
        if cache is None:
            return

        def inspect() -> tuple[dict, list[str]]:
            problems = []
            try:
                # Report only: a repair would change the trie behind the ledger's back. Files
                # that vanished or appeared are the scenario's own doing (damage, a removed
                # folder): the cache finds out at read and recomputes; anything else is a bug.
                report = cache.check_integrity(repair=False)
                problems += [
                    f"check_integrity: {p}"
                    for p in report.problems
                    if not p.endswith("vanished") and ": stray file " not in p
                ]
            except Exception as exc:
                problems.append(f"check_integrity: {type(exc).__name__}: {exc}")
            for ns in self.namespaces:
                for node in cache.tiers(ns).trie.nodes():
                    if node.lock_count:
                        problems.append(f"namespace {ns!r}: {node!r} still locked")
            return cache.statistics(), problems

        with trio.fail_after(DEADLINE):
            summary, problems = await actors.executor.mlx.call(inspect)
        for p in problems:
            self.fail(f"{where}: {p}")
        if summary["locked_requests"]:
            self.fail(f"{where}: {summary['locked_requests']} requests still hold locks")
        kv_bytes = attrs.asdict(memory.cached_kv_bytes)
        if kv_bytes != summary["bytes"]:
            self.fail(f"{where}: ledger {kv_bytes} != trie {summary['bytes']}")

    def _check_outputs(self) -> None:
        by_promise: dict[int, list[Record]] = collections.defaultdict(list)
        for rid, rec in sorted(self.records.items()):
            ref = self.refs.compute(rec.prompt)[: rec.request.max_tokens]
            if isinstance(rec.end, Failed):
                self.fail(f"#{rid} failed: {rec.end.message}")
                continue
            if rec.tokens != ref[: len(rec.tokens)]:
                self.fail(f"#{rid} tokens {rec.tokens} differ from the cache-off {ref}")
                continue
            if not isinstance(rec.end, Done):
                continue
            self.out.completed += 1
            done = rec.end
            if len(rec.tokens) != len(ref) or done.generated_tokens != len(rec.tokens):
                self.fail(f"#{rid} gave {len(rec.tokens)} tokens ({done}), cache-off {len(ref)}")
            if not self.settings.prefix_cache and done.cached_tokens:
                self.fail(f"#{rid} reports {done.cached_tokens} cached tokens with the cache off")
            if done.cached_tokens >= len(rec.prompt):
                self.fail(f"#{rid} reports {done.cached_tokens} cached of {len(rec.prompt)}")
            if rec.first_cached is not None and rec.first_cached != done.cached_tokens:
                self.fail(
                    f"#{rid}: first token says {rec.first_cached} cached, Done says "
                    f"{done.cached_tokens}"
                )
            self.out.restored_tokens += done.cached_tokens
            # Where the executor reports what it restored on the first token, that figure is
            # checked against Done above; otherwise (older executors) infer it from the promise.
            if rec.promised and rec.first_cached is None:
                by_promise[rec.promised].append(rec)
        # Reported = restored: the promise, less what a logged fallback recomputed. Fallbacks
        # carry the promise, not the request: compare per promised size, where every request
        # with that promise completed.
        falls: dict[int, list[int]] = collections.defaultdict(list)
        for promised, restored in self.fallbacks.seen:
            falls[promised].append(restored)
        started_elsewhere = collections.Counter(
            r.promised for r in self.records.values() if r.promised and not isinstance(r.end, Done)
        )
        for promised, recs in by_promise.items():
            if started_elsewhere[promised]:
                continue
            got = sorted(r.end.cached_tokens for r in recs)
            want = sorted(falls[promised] + [promised] * (len(recs) - len(falls[promised])))
            if got != want:
                rids = [r.request.rid for r in recs]
                self.fail(
                    f"requests {rids} report {got} cached tokens; restored {want} "
                    f"(promised {promised}, fallbacks {falls[promised]})"
                )

    def sample_tier(self, actors: _Actors, tier: str, nbytes: int) -> None:
        """A tier's bytes as charged after a step. Over budget, read off the trie how much of the
        tier is locked (locked nodes never move down): an excess within that is a design limit,
        noted in `locked_overshoots` (a failure with KVGROVE_ORACLE_STRICT_BUDGET=1); beyond it,
        a bug."""
        self.peaks[tier] = max(self.peaks.get(tier, 0), nbytes)
        cache = actors.pager.cache
        budget = cache.budgets.of(tier) if cache is not None else None
        if budget is None or nbytes <= budget:
            return

        def locked() -> int:
            return sum(
                node.nbytes
                for ns in self.namespaces
                for node in cache.tiers(ns).trie.nodes()
                if node.lock_count and node.tier == tier
            )

        # Read here, synchronously, while the executor waits for this charge to be taken (only
        # the pager's matches, which add locks, may run on the MLX thread meanwhile).
        for _ in range(3):
            try:
                held = locked()
                break
            except RuntimeError:  # a dict changed size under the iteration: read again
                continue
        else:
            held = 0
        if nbytes - held > budget and "unlocked-over-budget" in self.tolerate:
            self.out.tolerated["unlocked-over-budget"] += 1
        elif nbytes - held > budget:
            self.fail(
                f"tier {tier} held {nbytes} bytes after a step, over its budget of {budget} "
                f"by more than its {held} locked bytes"
            )
        else:
            self.out.locked_overshoots += 1
            if os.environ.get("KVGROVE_ORACLE_STRICT_BUDGET") == "1":
                self.fail(
                    f"tier {tier} held {nbytes} bytes after a step, over its budget of {budget} "
                    f"(locked nodes: {held} bytes)"
                )


def _flatten(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_flatten(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def run_scenario(
    scenario: Scenario,
    folder: str,
    refs: References,
    cache_dir: Path,
    tolerate: frozenset[str] = frozenset(),
) -> Outcome:
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_dir.mkdir(parents=True)
    return await Run(scenario, folder, refs, cache_dir, tolerate).run()


def check_seed(
    kind: str,
    seed: int,
    folder: str,
    refs: References,
    cache_dir: Path,
    *,
    shrink_budget: int = 40,
    tolerate: frozenset[str] = frozenset(),
) -> tuple[Outcome, str | None]:
    """Run (kind, seed); on failure, shrink it and return the report a failing test prints."""
    from oracle.shrink import shrink, signature
    from oracle.workload import generate

    scenario = generate(seed, kind)
    outcome = trio.run(run_scenario, scenario, folder, refs, cache_dir, tolerate)
    if outcome.ok:
        return outcome, None
    if shrink_budget == 0:
        return outcome, "\n".join(
            [
                f"oracle failure: kind={kind!r} seed={seed}",
                *[f"  {f}" for f in outcome.failures[:8]],
            ]
        )
    wanted = signature(outcome.failures[0])

    def still_fails(candidate: Scenario) -> bool:
        again = trio.run(run_scenario, candidate, folder, refs, cache_dir, tolerate)
        return any(signature(f) == wanted for f in again.failures)

    small = shrink(scenario, still_fails, budget=shrink_budget)
    again = trio.run(run_scenario, small, folder, refs, cache_dir, tolerate)
    report = "\n".join(
        [
            f"oracle failure: kind={kind!r} seed={seed} ({len(outcome.failures)} failures)",
            *[f"  {f}" for f in outcome.failures[:8]],
            "smallest failing scenario found:",
            small.describe(),
            "its failures:",
            *[f"  {f}" for f in again.failures[:8]],
        ]
    )
    return outcome, report
