"""Rank 0's executor and the other ranks' follower loop: the same steps, the same code.

Rank 0 runs the whole server (HTTP, scheduler, pager decisions) with `TensorParallelExecutor`,
which broadcasts each `Step` (encoded by `codec`) on its MLX thread just before running it.
Every other rank runs `follow`: receive a step, run it with the very same `Executor._run_step`
on its own shard. The forward passes' all-reduces pair up because every rank issues them in
the same order from the same plan; the logits after them are the same on every rank, and each
sampler draws from its own generator seeded the same (rank 0 fixes a random seed, -1, before
broadcasting), so every rank samples the same token. A follower checks that: the token rank 0
feeds next must be the one the follower drew, or it stops with an error naming the request.

Not yet across ranks: the prefix cache (each rank would have to snapshot, page and restore its
own heads under rank 0's keys), so tensor parallel runs with it off.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

import attrs

from kvgrove.actors.executor import Executor
from kvgrove.actors.messages import Step, StepItem, StepResult, UsePager
from kvgrove.actors.mlx_thread import MLXThread
from kvgrove.config import Settings
from kvgrove.distributed.broadcast import PlanChannel, gather_status
from kvgrove.distributed.codec import STEP, STOP, decode_step, encode_step
from kvgrove.distributed.shard import shard_loaded

log = logging.getLogger(__name__)


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
    """What every rank runs with: the prefix cache off (not yet sharded across ranks), and no
    other models on demand (they would load on rank 0 alone)."""
    if settings.prefix_cache:
        log.warning("tensor parallel: the prefix cache is not sharded across ranks yet; off")
    return attrs.evolve(settings, prefix_cache=False, max_loaded_models=0)


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
    """The MLX thread; on stop it first tells the followers (on this thread) to leave."""

    def __init__(self, plans: PlanChannel, lost: Callable[[], bool]) -> None:
        super().__init__()
        self._plans = plans
        self._lost = lost  # no STOP once the other ranks are gone

    def stop(self) -> None:
        self._queue.put(self._send_stop)
        super().stop()

    def _send_stop(self) -> None:
        import numpy as np

        if self._lost():
            return
        try:
            self._plans.send(STOP, np.zeros(0, dtype=np.int32))
        except Exception:
            log.exception("telling the other ranks to stop failed")


class TensorParallelExecutor(Executor):
    """Rank 0's executor: loads its shard, broadcasts every step before running it."""

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
        # Set (on the MLX thread) once a collective failed: the ranks are out of step for
        # good, so every later step fails at once and `on_lost` (trio side) hears it once.
        self.lost: str | None = None
        self._on_lost = on_lost
        self._told = False

    def _load(self) -> Any:
        return load_with_peers(super()._load, self.group)

    async def _handle(self, msg: object) -> None:
        if isinstance(msg, UsePager):
            raise RuntimeError("tensor parallel runs without the prefix cache (not sharded yet)")
        await super()._handle(msg)
        if self.lost is not None and not self._told:
            self._told = True
            log.error("%s", self.lost)
            if self._on_lost is not None:
                self._on_lost(self.lost)

    def _run_step(self, step: Step) -> StepResult:
        if self.lost is None:
            step = fix_seeds(step)
            try:
                self.plans.send(STEP, encode_step(step))
            except Exception as e:  # a rank died (the ring reports its connection lost)
                self.lost = f"tensor parallel: lost the other ranks ({e})"
        if self.lost is not None:
            # Release what the step lets go of, so the books return to baseline.
            for rid in (*step.release, *step.preempt):
                self.runner.forget(rid)
            return StepResult((), error=self.lost)
        result = super()._run_step(step)
        # A step that failed on this rank may not have failed on the others (or failed inside
        # a collective they still wait in): from here the ranks' collectives no longer pair.
        error = result.error or next((r.error for r in result.results if r.error), None)
        if error is not None:
            self.lost = f"tensor parallel: a step failed, the ranks are out of step ({error})"
        return result


@attrs.define
class Follower:
    """A rank other than 0: its shard, and the executor code that runs rank 0's steps."""

    executor: Executor
    plans: PlanChannel
    on_result: Callable[[Step, StepResult], None] | None = None
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

        with mx.stream(generation_stream()):
            self.executor.loaded = load_with_peers(self.executor._load, self.plans.group)
            while True:
                kind, payload = self.plans.receive()
                if kind == STOP:
                    return self.steps
                if kind != STEP:
                    raise RuntimeError(f"unknown plan message kind {kind}")
                step = decode_step(payload)
                for rid in (*step.release, *step.preempt):
                    self._drawn.pop(rid, None)
                for item in step.items:
                    self._check(item)
                result = self.executor._run_step(step)
                self.steps += 1
                error = result.error or next((r.error for r in result.results if r.error), None)
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
    executor = Executor(
        tensor_parallel_settings(settings), accountant=None, loader=sharding_loader(group, loader)
    )
    return Follower(executor, PlanChannel(group), on_result)
