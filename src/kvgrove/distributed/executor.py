"""Rank 0's executor and the other ranks' follower loop: the same steps, the same code.

Rank 0 runs the whole server (HTTP, scheduler, pager decisions) with `TensorParallelExecutor`,
which broadcasts each `Step` (encoded by `codec`) on its MLX thread just before running it.
Every other rank runs `Follower.run`: receive a step, run it with the same `RankRunner` (the
one-rank `StepRunner` plus what the ranks must do alike) on its own shard. The forward passes'
all-reduces pair up because every rank issues them in the same order from the same plan; the
logits after them are the same on every rank, and each sampler draws from its own generator
seeded the same (rank 0 fixes a random seed, -1, before broadcasting), so every rank samples
the same token. A follower checks that: the token rank 0
feeds next must be the one the follower drew, or it stops with an error naming the request.

The prefix cache runs on every rank: each rank's `PrefixCache` holds its shard of every span
(its heads' KV, or all of it where attention is replicated) in its own folder (the shard's
fingerprint names it, `+tp<rank>of<n>`, each with its own lock) under its own budgets. Rank 0's
pager decides (match at admission; the step plan carries the tokens promised); every rank
stores, pages and restores under the same keys, because every rank runs the same steps with
the same restore/store exchange around them (rank 0 with its pager actor, a follower with a
pager of its own called in step order). A rank's copy can still go missing (evicted
differently, a disk read failed, a file damaged), so before restored prefixes are used every
rank says how much of each it restored (`agree_each`, one all-reduce): a prefix not restored
alike on all ranks is recomputed on all, and the collectives of that prefill still pair up.
The cache changes speed, never the tokens.

Failure: a collective that fails (a rank died) or outlasts `tp_timeout_seconds` (`Watchdog`:
a rank hung) puts the ranks out of step for good: rank 0 fails every in-flight and later
step with the error, and `on_lost` stops the server; a follower exits. A request refused
before any compute on every rank alike (its sampler cannot be built) fails alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from kvgrove.actors.executor import Executor
from kvgrove.actors.messages import Step, StepItem, StepResult
from kvgrove.actors.mlx_thread import MLXThread
from kvgrove.config import Settings
from kvgrove.distributed.broadcast import PlanChannel, agree_each, gather_status
from kvgrove.distributed.codec import STEP, STOP, decode_step, encode_step
from kvgrove.distributed.shard import shard_loaded
from kvgrove.distributed.watchdog import Watchdog
from kvgrove.models.prefixes import PagerCore, build_prefix_cache
from kvgrove.models.runner import StepRunner, wants_restore

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankError(RuntimeError):
    """Another rank failed to start, died, or the ranks no longer agree."""


def load_with_peers(load: Callable[[], Any], group: Any) -> Any:
    """Run this rank's `load`, then meet every rank: if any failed, every rank raises, rank 0
    with each failed rank's own message (so a follower's startup error surfaces there)."""
    try:
        loaded = load()
    except Exception as e:
        gather_status(group, f"{type(e).__name__}: {e}")
        raise
    failed = gather_status(group, None)
    if failed:
        lines = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failed.items()))
        raise RankError(f"tensor parallel: {len(failed)} rank(s) failed to start: {lines}")
    return loaded


class DivergedError(RankError):
    """A follower drew a different token than rank 0 fed next: the ranks no longer agree."""


def tensor_parallel_settings(settings: Settings) -> Settings:
    """What every rank runs with: no other models on demand (they would load on rank 0
    alone), and no continuation queued ahead of its turn (each step is broadcast first)."""
    return attrs.evolve(settings, max_loaded_models=0, queued_continuations=False)


def fix_seeds(step: Step) -> Step:
    """The step with each new sequence's random seed (-1) replaced by one drawn here, so every
    rank's sampler draws the same numbers."""
    if not any(it.start is not None and it.start.params.seed < 0 for it in step.items):
        return step
    items = []
    for it in step.items:
        if it.start is not None and it.start.params.seed < 0:
            params = attrs.evolve(it.start.params, seed=secrets.randbits(63))
            it = attrs.evolve(it, start=attrs.evolve(it.start, params=params))
        items.append(it)
    return attrs.evolve(step, items=tuple(items))


def sharding_loader(group: Any, loader: Callable[[str | None], Any] | None) -> Callable:
    def load_shard(name: str | None) -> Any:
        if loader is None:
            from kvgrove.models.loading import load

            return shard_loaded(load(name), group)
        return shard_loaded(loader(name), group)

    return load_shard


class _PlanThread(MLXThread):
    """The MLX thread; on stop it first tells the followers (on this thread) to leave.

    `abandon` gives up on the thread when it is stuck in a collective that will never complete
    (a hung rank): every call waiting on it, and every later one, raises RankError at once."""

    def __init__(self, plans: PlanChannel, lost: Callable[[], bool]) -> None:
        super().__init__()
        self._plans = plans
        self._lost = lost  # no STOP once the other ranks are gone
        self._waiting: list[tuple[Any, Any, dict]] = []  # (trio token, event, box) per call
        self._guard = threading.Lock()
        self.abandoned: str | None = None
        self.watchdog: Watchdog | None = None

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        import trio

        if self.abandoned is not None:
            raise RankError(self.abandoned)
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        box: dict[str, Any] = {}
        entry = (token, finished, box)

        def work() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:
                box["error"] = e
            with self._guard:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    token.run_sync_soon(finished.set)

        with self._guard:
            self._waiting.append(entry)
        self._queue.put(work)
        with trio.CancelScope(shield=True):  # work is never torn; abandon() ends the wait
            await finished.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def abandon(self, message: str) -> None:
        """Any thread: fail every waiting call with RankError(message), and every later one."""
        with self._guard:
            self.abandoned = message
            waiting, self._waiting = self._waiting, []
        for token, finished, box in waiting:
            box["error"] = RankError(message)
            with contextlib.suppress(RuntimeError):  # trio.RunFinishedError: nobody waits
                token.run_sync_soon(finished.set)

    def stop(self) -> None:
        if self.abandoned is not None:  # stuck in a collective: nothing to join (daemon)
            return
        self._queue.put(self._send_stop)
        super().stop()

    def _send_stop(self) -> None:
        import numpy as np

        if self._lost():
            return
        try:
            with self.watchdog.guard("telling the other ranks to stop"):
                self._plans.send(STOP, np.zeros(0, dtype=np.int32))
        except Exception:
            log.exception("telling the other ranks to stop failed")


class RankRunner(StepRunner):
    """Every rank's step runner: what every rank does alike beyond one rank's runner.

    - Before the items of a step that starts from cached prefixes run, the ranks agree on
      what each restored (`agree_each`, one all-reduce): a prefix some rank could not restore
      in full (its copy evicted differently, a disk read failed, a file damaged) is recomputed
      on every rank, so that prefill's collectives pair up. Whether a step restores is decided
      by the plan alone (`wants_restore`), so every rank makes the same call.
    - Items refused before any compute (their sampler could not be built, e.g. a grammar that
      does not compile: every rank refuses them alike, no collective ran for them) are
      remembered, so such a failure ends only that request (`step_error`).
    - `run_items` (the only part with collectives) runs under the watchdog."""

    def __init__(self, *, group: Any, watchdog: Watchdog, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.group = group
        self.watchdog = watchdog
        self.refused: set[int] = set()

    def run_items(self, step: Any, restored: Any = ()) -> StepResult:
        self.refused = set()
        with self.watchdog.guard(f"step {self.steps}"):
            if wants_restore(step.items):
                restored = self._agreed(tuple(restored))
            return super().run_items(step, restored)

    def _agreed(self, restored: tuple) -> tuple:
        counts, values = agree_each(self.group, [n for _, _, n in restored])
        out = []
        for (rid, cache, n), agreed, each in zip(restored, counts, values, strict=True):
            if agreed != n:
                log.warning(
                    "prefix cache: the ranks restored %s tokens of request %d; every rank "
                    "recomputes them",
                    each,
                    rid,
                )
                cache, n = None, 0
            out.append((rid, cache, n))
        return tuple(out)

    def _open_sequence(self, item: StepItem) -> Any:
        known = item.request_id in self._live
        try:
            return super()._open_sequence(item)
        except Exception:
            if not known and item.request_id not in self._live:
                self.refused.add(item.request_id)
            raise

    def step_error(self, result: StepResult) -> str | None:
        """The error that puts the ranks out of step (None: they are still in step)."""
        if result.error is not None:
            return result.error
        return next(
            (r.error for r in result.results if r.error and r.request_id not in self.refused),
            None,
        )


def _rank_runner(settings: Settings, group: Any, watchdog: Watchdog) -> RankRunner:
    return RankRunner(
        group=group,
        watchdog=watchdog,
        chunk_tokens=settings.prefill_chunk_tokens,
        batch_prefill=settings.batch_prefill,
    )


class TensorParallelExecutor(Executor):
    """Rank 0's executor: loads its shard, broadcasts every step before running it (the
    pager's restores and stores included, as on one rank), and gives up on the other ranks
    when a step fails on their side or outlasts `tp_timeout_seconds`."""

    def __init__(
        self,
        settings: Settings,
        *,
        accountant: Any,
        group: Any,
        loader: Callable[[str | None], Any] | None = None,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(
            tensor_parallel_settings(settings),
            accountant=accountant,
            loader=sharding_loader(group, loader),
        )
        self.group = group
        self.plans = PlanChannel(group)
        self._thread = _PlanThread(self.plans, lambda: self.lost is not None)
        self.watchdog = self._thread.watchdog = Watchdog(
            self.settings.tp_timeout_seconds, self._timed_out
        )
        self.runner = _rank_runner(self.settings, group, self.watchdog)
        # Set (on the MLX thread, or the watchdog's) once the ranks are out of step for good:
        # every later step fails at once and `on_lost` (trio side) hears it once.
        self.lost: str | None = None
        self._on_lost = on_lost
        self._told = False
        self._token: Any = None

    async def run(self, **kwargs: Any) -> None:
        import trio

        self._token = trio.lowlevel.current_trio_token()
        try:
            await super().run(**kwargs)
        finally:
            self.watchdog.close()

    def _load(self) -> Any:
        return load_with_peers(super()._load, self.group)

    def _timed_out(self, what: str, seconds: float) -> None:
        """The watchdog's thread: a rank is hung. Give up on the MLX thread (stuck in the
        collective) so the waiting step fails its requests, and tell the trio side."""
        message = (
            f"tensor parallel: {what} did not complete within {seconds:.0f}s "
            f"(--tp-timeout-seconds {self.settings.tp_timeout_seconds:g}): a rank is hung"
        )
        if self.lost is None:
            self.lost = message
        self._thread.abandon(self.lost)
        if self._token is not None:
            with contextlib.suppress(RuntimeError):
                self._token.run_sync_soon(self._tell)

    def _tell(self) -> None:
        if self.lost is not None and not self._told:
            self._told = True
            log.error("%s", self.lost)
            if self._on_lost is not None:
                self._on_lost(self.lost)

    async def _handle(self, msg: object) -> None:
        try:
            await super()._handle(msg)
        except RankError:  # the MLX thread was abandoned (a hung rank)
            if not isinstance(msg, Step):
                raise
            # The step's reply is the last thing _handle does: it was not sent.
            msg.reply.send_nowait(StepResult((), error=self.lost))
        self._tell()

    async def _step(self, step: Step) -> StepResult:
        if self.lost is None:
            step = fix_seeds(step)
            await self._thread.call(self._send_step, step)
        if self.lost is not None:
            await self._thread.call(self._forget, step)
            return StepResult((), error=self.lost)
        result = await super()._step(step)
        # A step that failed on this rank may not have failed on the others (or failed inside
        # a collective they still wait in): from here the ranks' collectives no longer pair.
        error = self.runner.step_error(result)
        if error is not None and self.lost is None:
            self.lost = f"tensor parallel: a step failed, the ranks are out of step ({error})"
        return result

    def _send_step(self, step: Step) -> None:
        try:
            with self.watchdog.guard(f"step {self.runner.steps + 1}"):
                self.plans.send(STEP, encode_step(step))
        except Exception as e:  # a rank died (the ring reports its connection lost)
            self.lost = f"tensor parallel: lost the other ranks ({e})"

    def _forget(self, step: Step) -> None:
        """Release what the step lets go of, so the books return to baseline."""
        for rid in (*step.release, *step.preempt):
            self.runner.forget(rid)


class _FollowerExecutor(Executor):
    """A follower's executor: the same runner, and its own prefix cache (its shard of every
    span, in its own folder, under its own budgets) kept by a pager of its own whose work runs
    here, in step order, as rank 0's runs on its MLX thread: stores after `begin` when the
    step restores, restores (re-matching what rank 0's pager locked at admission), stores and
    fits after the step. A follower has no trio: it calls the pager's sync core
    (`kvgrove.models.prefixes.PagerCore`) directly."""

    def __init__(self, *args: Any, group: Any, watchdog: Watchdog, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group
        self.runner = _rank_runner(self.settings, group, watchdog)
        self.pager: PagerCore | None = None
        self._live_bytes: dict[int, int] = {}

    def load_and_open(self) -> Any:
        """Load this rank's shard, then open its prefix cache."""
        self.loaded = self._load()
        if self.settings.prefix_cache:
            cache = build_prefix_cache(self.settings, self.loaded)
            if cache is not None:
                self.pager = PagerCore(self.settings, self.loaded, cache, self.runner.own_caches)
                self.runner.keeping = True
        return self.loaded

    def run_step(self, step: Step) -> StepResult:
        if self.pager is None:
            return self.runner.run(step)
        result = self.runner.begin(step)
        if result is None:
            if wants_restore(step.items):
                self.pager.store(tuple(self.runner.take_keeps()), None)
                # Rank 0's pager locked the prefixes at admission; this rank matches its own
                # trie now (at most as far as rank 0 promised).
                requests = [
                    attrs.evolve(r, rematch=True) for r in self.runner.restore_requests(step.items)
                ]
                restored = self.pager.restore(tuple(requests))
                result = self.runner.run_items(step, restored)
            else:
                result = self.runner.run_items(step)
        for rid in (*step.release, *step.preempt):
            self._live_bytes.pop(rid, None)
        for r in result.results:
            self._live_bytes[r.request_id] = r.cache_bytes
        # Rank 0 reports what its own pager kept.
        self.pager.store(tuple(self.runner.take_keeps()), sum(self._live_bytes.values()))
        return result

    def close_prefix_cache(self) -> None:
        if self.pager is not None:
            try:
                self.pager.flush()
            finally:
                self.pager.cache.close()


def _exit_hung(what: str, seconds: float) -> None:
    """A follower's watchdog: a step outlasted the timeout, so another rank is hung. Nothing
    can interrupt the collective this rank waits in: leave at once, non-zero."""
    log.error(
        "tensor parallel: %s did not complete within %.0fs: a rank is hung; exiting",
        what,
        seconds,
    )
    logging.shutdown()
    os._exit(1)


@attrs.define
class Follower:
    """A rank other than 0: its shard, and the executor code that runs rank 0's steps.

    Waiting for rank 0's next plan is not timed (an idle server sends none); running a step
    is, by `watchdog` (a hung peer: the process exits non-zero, no rank is left hanging)."""

    executor: Any  # _FollowerExecutor
    plans: PlanChannel
    on_result: Callable[[Step, StepResult], None] | None = None
    watchdog: Watchdog | None = None
    steps: int = 0
    _drawn: dict[int, int] = attrs.Factory(dict)  # request id -> token this rank drew last

    def _check(self, item: StepItem) -> None:
        drawn = self._drawn.get(item.request_id)
        if item.start is None and len(item.tokens) == 1 and drawn not in (None, item.tokens[0]):
            raise DivergedError(
                f"rank {self.plans.group.rank()}: request {item.request_id} drew token "
                f"{drawn} but rank 0 fed {item.tokens[0]}"
            )

    def run(self) -> int:
        """Receive and run steps until rank 0 says stop; returns the steps run."""
        import mlx.core as mx

        from kvgrove.models.generate import generation_stream

        try:
            with mx.stream(generation_stream()):
                # Its prefix cache opens within the load: a failure there (a busy folder)
                # surfaces on rank 0 with this rank's message too.
                load_with_peers(self.executor.load_and_open, self.plans.group)
                while True:
                    kind, payload = self.plans.receive()
                    if kind == STOP:
                        self.executor.close_prefix_cache()  # on disk for the next start
                        return self.steps
                    if kind != STEP:
                        raise RuntimeError(f"unknown plan message kind {kind}")
                    self._step(decode_step(payload))
        finally:
            if self.watchdog is not None:
                self.watchdog.close()

    def _step(self, step: Step) -> None:
        for rid in (*step.release, *step.preempt):
            self._drawn.pop(rid, None)
        for item in step.items:
            self._check(item)
        result = self.executor.run_step(step)  # its collectives under the watchdog
        self.steps += 1
        error = self.executor.runner.step_error(result)
        if error is not None:
            raise RankError(
                f"rank {self.plans.group.rank()}: a step failed, the ranks are out of "
                f"step ({error})"
            )
        for r in result.results:
            if r.token is not None:
                self._drawn[r.request_id] = r.token
            else:
                self._drawn.pop(r.request_id, None)
        if self.on_result is not None:
            self.on_result(step, result)


def follower(
    settings: Settings,
    group: Any,
    *,
    loader: Callable[[str | None], Any] | None = None,
    on_result: Callable[[Step, StepResult], None] | None = None,
) -> Follower:
    """A follower for this rank (no accountant: rank 0 keeps the books)."""
    settings = tensor_parallel_settings(settings)
    loader = sharding_loader(group, loader)
    watchdog = Watchdog(settings.tp_timeout_seconds, _exit_hung)
    executor = _FollowerExecutor(
        settings, accountant=None, loader=loader, group=group, watchdog=watchdog
    )
    return Follower(executor, PlanChannel(group), on_result, watchdog)
