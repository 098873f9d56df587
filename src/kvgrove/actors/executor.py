"""The executor actor: owns the model, the live caches and the one OS thread that runs MLX.

A step decodes every decoding sequence in one batched forward pass over a persistent
`RunningBatch` (rows join and leave only when membership changes), and runs the step's prefill
chunks one sequence at a time while that batch computes (`mx.async_eval`). A sequence's live
cache is created in `_open_sequence` and given up in `_close_sequence`; in between it is either
its own per-sequence cache (prefill, or out of the batch) or a row of the batch.

MLX streams belong to the thread that made them, and trio's thread cache does not promise the
same thread twice, so every MLX call (loading, each step) goes to one dedicated thread through
`MLXThread.call`. The trio side only passes messages; the caches and samplers are touched on the
MLX thread alone. A running step is never interrupted: the await on it is shielded, and
cancellation takes effect between steps.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import trio

from kvgrove.actors.messages import (
    Charge,
    Charges,
    ExecutorQuery,
    ItemResult,
    Step,
    StepItem,
    StepResult,
    UsePrefixCache,
)
from kvgrove.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class MLXThread:
    """One OS thread that runs submitted functions in order; results come back into trio."""

    def __init__(self, name: str = "kvgrove-mlx") -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.ident: int | None = None

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        import mlx.core as mx

        from kvgrove.models.generate import generation_stream

        self.ident = threading.get_ident()
        with mx.stream(generation_stream()):  # this thread's own stream, for all its work
            while (work := self._queue.get()) is not None:
                work()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the thread and return its result; shielded (work is never torn)."""
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as e:
                box["error"] = e
            token.run_sync_soon(finished.set)

        self._queue.put(work)
        with trio.CancelScope(shield=True):
            await finished.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)


@attrs.frozen
class ExecutorStats:
    steps: int
    items: int
    live_sequences: int
    tokens_computed: int
    weights_bytes: int = 0
    batch_rows: int = 0  # rows in the running batch now
    max_batch_rows: int = 0  # the most rows one batched forward pass has decoded
    batched: bool = True  # False: the model's caches cannot batch; rows decode one by one


@attrs.define
class _Live:
    """A sequence the executor knows: its sampler and, unless it is a batch row, its cache."""

    sampler: Any
    cache: list[Any] | None = None  # None while a row of the batch, or after preemption
    in_batch: bool = False
    namespace: str = ""  # where the prefix cache stores its KV
    prompt_tokens: int = 0
    restored_tokens: int | None = None  # prompt tokens restored from the prefix cache

    @property
    def has_cache(self) -> bool:
        return self.in_batch or self.cache is not None


class Executor:
    """Loads the model, then runs `Step`s from its inbox on the MLX thread.

    `step_log` keeps (request_id, start, end) in time.monotonic() seconds for recent items, so
    tests can prove no work ran for a request after it was cancelled.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        accountant: trio.MemorySendChannel,
        loader: Callable[[str | None], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.executor_inbox_items)
        self._accountant = accountant
        self._loader = loader
        self._thread = MLXThread()
        self.loaded: Any = None  # kvgrove.models.loading.LoadedModel once started
        # Touched on the MLX thread only:
        self._live: dict[int, _Live] = {}
        self._batch: Any = None  # kvgrove.models.batching.RunningBatch
        self._batched = True
        # The pager's prefix cache, lent for restores and stores on this thread (or None).
        self._prefix: Any = None
        self.prefix_errors = 0
        self._prefill_together = False  # whole prompts prefill in one left-padded pass
        self.step_log: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=100_000
        )
        self._charged: dict[tuple[str, str], int] = {}  # what the accountant was last told
        self._steps = 0
        self._items = 0
        self._tokens = 0
        self._max_batch_rows = 0

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the model on the MLX thread, report it through task_status, then serve steps."""
        self._thread.start()
        try:
            self.loaded = await self._thread.call(self._load)
            with self._accountant:
                await self._accountant.send(Charge("weights", "model", self.loaded.info.nbytes))
                task_status.started(self.loaded)
                async for msg in self._inbox:
                    await self._handle(msg)
        finally:
            if self._prefix is not None:
                # Graceful or not, leave the prefix cache on disk for the next start.
                with trio.CancelScope(shield=True):
                    try:
                        await self._thread.call(self._flush_prefix)
                    except Exception:
                        log.exception("writing the prefix cache to disk failed")
            self._thread.stop()

    async def _send_charges(self, charges: dict[tuple[str, str], int]) -> None:
        """Tell the accountant in one message: no reading ever shows half a step's update."""
        batch = tuple(Charge(category, owner, n) for (category, owner), n in charges.items())
        await self._accountant.send(Charges(batch))
        for key, nbytes in charges.items():
            if nbytes:
                self._charged[key] = nbytes
            else:
                self._charged.pop(key, None)

    def _fit_prefix(self, live_bytes: int) -> dict[str, int]:
        """On the MLX thread: the prefix cache's device tier gets its share of the device
        budget, less whatever live caches took beyond theirs (one budget for weights, live
        caches and cached KV), and rebalances into it. Returns the tiers' bytes."""
        split = self.settings.device_split(self.loaded.info.nbytes)
        cap = max(0, min(split.prefix_bytes, split.room_bytes - live_bytes))
        if self._prefix.budgets.device_bytes != cap:
            self._prefix.budgets = attrs.evolve(self._prefix.budgets, device_bytes=cap)
        self._prefix.rebalance()
        return self._prefix.tier_bytes()

    @property
    def mlx(self) -> MLXThread:
        """The one MLX thread: the pager runs its cache work here too."""
        return self._thread

    def _load(self) -> Any:
        from kvgrove.models.batching import RunningBatch, unbatchable_reason
        from kvgrove.models.caches import SpanKVCache, make_cache

        if self._loader is not None:
            loaded = self._loader(self.settings.model)
        else:
            from kvgrove.models.loading import load

            loaded = load(self.settings.model)
        self._batch = RunningBatch()
        cache = make_cache(loaded.model)
        reason = unbatchable_reason(cache)
        self._prefill_together = all(isinstance(c, SpanKVCache) for c in cache)
        if reason is not None:
            self._batched = False
            log.warning("batching off, sequences decode one at a time: %s", reason)
        return loaded

    async def _handle(self, msg: object) -> None:
        match msg:
            case Step():
                result = await self._thread.call(self._run_step, msg)
                charges = {("live", str(rid)): 0 for rid in (*msg.release, *msg.preempt)}
                for r in result.results:
                    charges[("live", str(r.request_id))] = r.cache_bytes
                if self._prefix is not None:
                    live = {**{k: n for k, n in self._charged.items() if k[0] == "live"}, **charges}
                    live_total = sum(n for (c, _), n in live.items() if c == "live")
                    tiers = await self._thread.call(self._fit_prefix, live_total)
                    for tier, nbytes in tiers.items():
                        charges[(tier, "prefix")] = nbytes
                await self._send_charges(charges)
                msg.reply.send_nowait(result)
            case UsePrefixCache(cache=cache):
                self._prefix = cache
            case ExecutorQuery(reply=reply):
                reply.send_nowait(self.statistics())
            case _:
                raise AssertionError(f"executor: unexpected message {msg!r}")

    # -- on the MLX thread ----------------------------------------------------------------

    def _open_sequence(self, item: StepItem) -> _Live:
        """Create the sequence's live state: a sampler (first time) and an empty cache.

        Called for a sequence's first item, and again when a preempted sequence resumes (its
        sampler is kept). The prefix cache restores a cached prefix here instead.
        """
        from kvgrove.models.caches import make_cache
        from kvgrove.sampling import SequenceSampler

        live = self._live.get(item.request_id)
        first = live is None
        if first:
            s = item.start
            assert s is not None, f"request {item.request_id}: first item without a start"
            sampler = SequenceSampler(
                s.params,
                s.prompt_tokens,
                context_limit=s.context_tokens,
                constraint=self._constraint(s.params),
            )
            live = self._live[item.request_id] = _Live(
                sampler, namespace=s.namespace, prompt_tokens=len(s.prompt_tokens)
            )
        assert not live.has_cache
        cache = make_cache(self.loaded.model)
        rid = item.request_id
        if first and item.start.cached_tokens:
            # The pager locked this prefix at admission: stitch it in instead of computing it.
            promised, tokens = item.start.cached_tokens, item.start.prompt_tokens
            cache, live.restored_tokens = self._restore_prefix(rid, tokens, promised, cache)
        elif not first and item.resume_tokens:
            # A preempted sequence resumes from what it stored when it was preempted.
            history, promised = tuple(live.sampler.history), item.resume_tokens
            cache, _ = self._restore_prefix(rid, history, promised, cache, live.namespace)
        live.cache = cache  # only now: a failure above leaves no half-built cache behind
        return live

    def _restore_prefix(
        self,
        request_id: int,
        tokens: tuple[int, ...],
        promised: int,
        cache: list[Any],
        match_in: str | None = None,
    ) -> tuple[list[Any], int]:
        """Fill `cache` with the first `promised` of `tokens`: restored from the prefix cache
        where it can be (the prefix the pager locked for the request; with `match_in`, the
        longest one matched in that namespace now), the rest (all of it, from a fresh cache,
        if the restore failed in any way) recomputed, so the answer is the one the cache-off
        run gives. Returns the cache and the tokens actually restored. No lock is left held."""
        from kvgrove.models.caches import cache_tokens, make_cache
        from kvgrove.models.generate import prefill_chunks

        try:
            if match_in is not None:
                self._prefix.match(request_id, match_in, tokens[: promised + 1])
            restored = min(self._prefix.restore(request_id, cache), promised)
            if restored and cache_tokens(cache) != restored:
                raise RuntimeError(f"restored {cache_tokens(cache)} tokens, not {restored}")
        except Exception:
            self.prefix_errors += 1
            log.exception("restoring %d cached tokens failed; recomputing them", promised)
            if self._prefix is not None:  # idempotent: never leave the path locked
                self._prefix.release(request_id)
            restored = 0
        if restored < promised:
            if restored:
                log.warning("prefix cache gave %d of %d tokens; recomputing", restored, promised)
            else:
                cache = make_cache(self.loaded.model)
            gap = tokens[restored:promised]
            for _ in prefill_chunks(self.loaded.model, cache, gap, chunk_tokens=2048):
                pass
            self._tokens += len(gap)
        return cache, restored

    def _preempt_sequence(self, request_id: int) -> int:
        """Give up a preempted sequence's cache into the prefix cache (sampler kept); returns
        the tokens of its history the prefix cache now holds for its resume."""
        live = self._live.get(request_id)
        if live is None or live.cache is None:
            self._close_sequence(request_id)
            return 0
        cache, live.cache = live.cache, None
        return self._store_prefix(request_id, live, cache)

    def _constraint(self, params: Any) -> Any:
        """The grammar mask hook: a request with a grammar samples under a Constraint."""
        if params.grammar is None:
            return None
        from kvgrove.grammar import Constraint

        return Constraint(params.grammar, self.loaded.tokenizer)

    def _close_sequence(self, request_id: int) -> list[Any] | None:
        """Give up the sequence's cache (it has left the batch); returns it, None if none.

        Called when a sequence is released (finished, cancelled) or preempted. The prefix cache
        snapshots the cache into its trie here.
        """
        live = self._live.get(request_id)
        if live is None:
            if self._prefix is not None:
                self._prefix.release(request_id)
            return None
        assert not live.in_batch
        cache, live.cache = live.cache, None
        if cache is not None:
            self._store_prefix(request_id, live, cache)
        elif self._prefix is not None:
            self._prefix.release(request_id)
        return cache

    def _store_prefix(self, request_id: int | None, live: _Live, cache: list[Any]) -> int:
        """Keep what the cache holds in the prefix cache (and unlock the request's prefix).
        Returns the tokens now cached (0 if none or the store failed).

        Never fails the sequence: a snapshot that cannot be taken only costs a later recompute.
        """
        if self._prefix is None:
            return 0
        from kvgrove.models.caches import cache_tokens

        n = cache_tokens(cache)
        tokens = live.sampler.history[:n]
        try:
            if n > 0:
                self._prefix.store(live.namespace, tokens, cache, request_id=request_id)
            elif request_id is not None:
                self._prefix.release(request_id)
        except Exception:
            self.prefix_errors += 1
            log.exception("storing %d tokens in the prefix cache failed", n)
            if request_id is not None:
                self._prefix.release(request_id)
            return 0
        return n

    def _flush_prefix(self) -> None:
        for rid, live in list(self._live.items()):
            if live.cache is not None:
                self._store_prefix(rid, live, live.cache)
        self._prefix.flush()

    def _detach(self, ids: list[int]) -> None:
        """Rows leave the batch (one copy however many), each back to its own cache."""
        for rid, cache in self._batch.leave(ids).items():
            live = self._live[rid]
            live.cache, live.in_batch = cache, False

    def _attach(self, ids: list[int]) -> None:
        """Sequences with their own caches join the batch (one merge, one extend)."""
        rows = []
        for rid in ids:
            live = self._live[rid]
            rows.append((rid, live.cache))
            live.cache, live.in_batch = None, True
        self._batch.join(rows)

    def _drop(self, request_id: int) -> None:
        """Forget a sequence whose state may be broken (its step failed)."""
        live = self._live.pop(request_id, None)
        if live is not None and live.in_batch:
            # The batch ran with it: the whole batch state is suspect, so it goes too.
            for rid in self._batch.ids:
                self._live.pop(rid, None)
            self._batch.__init__()

    @property
    def _whole_layers(self) -> bool:
        return self._prefix is not None and self._prefix.has_whole_layers

    def _is_decode(self, item: StepItem) -> bool:
        live = self._live.get(item.request_id)
        return (
            item.start is None
            and item.sample
            and len(item.tokens) == 1
            and live is not None
            and live.has_cache
        )

    def _run_step(self, step: Step) -> StepResult:
        import mlx.core as mx

        self._steps += 1
        decode = [it for it in step.items if self._is_decode(it)] if self._batched else []
        decode_ids = {it.request_id for it in decode}
        others = [it for it in step.items if it.request_id not in decode_ids]
        leaving = {*step.release, *step.preempt}
        try:
            # Rows leave the batch when released, preempted, or not decoding now (parked).
            self._detach(
                [rid for rid in self._batch.ids if rid not in decode_ids or rid in leaving]
            )
            kept = [(rid, self._preempt_sequence(rid)) for rid in step.preempt]
            for rid in step.release:
                self._close_sequence(rid)
                self._live.pop(rid, None)
        except Exception as e:  # the batch copy failed: every row in it is lost
            log.exception("releasing sequences failed")
            for rid in list(self._batch.ids) + list(leaving):
                self._drop(rid)
            return StepResult((), error=f"generation failed: {e}")
        if step.release and not self._live:
            mx.clear_cache()

        results: dict[int, ItemResult] = {}
        batch = self._launch_decode(decode, results)
        # The prefill graphs are built while the batch computes.
        together = self._launch_prefill_together(others)
        for item in others:
            if together is None or item not in together[0]:
                results[item.request_id] = self._run_item(item)
        if batch is not None:
            self._finish_decode(*batch, results)
        if together is not None:
            self._finish_prefill_together(*together, results)
        for it in step.items:  # a first item reports the prompt tokens actually restored
            live, result = self._live.get(it.request_id), results[it.request_id]
            if it.start is not None and live is not None and result.error is None:
                restored = live.restored_tokens or 0
                results[it.request_id] = attrs.evolve(result, cached_tokens=restored)
        return StepResult(tuple(results[it.request_id] for it in step.items), kept=tuple(kept))

    def _launch_decode(self, decode: list[StepItem], results: dict) -> tuple | None:
        import mlx.core as mx

        from kvgrove.sampling import build_sample

        if not decode:
            return None
        start = time.monotonic()
        try:
            self._attach([it.request_id for it in decode if not self._live[it.request_id].in_batch])
            token_of = {it.request_id: it.tokens[0] for it in decode}
            ids = list(self._batch.ids)
            logits = self._batch.forward(self.loaded.model, [token_of[rid] for rid in ids])
            pending = build_sample(logits, [self._live[rid].sampler for rid in ids])
            mx.async_eval(*pending.arrays())
        except Exception as e:
            self._fail_decode(decode, e, start, results)
            return None
        return decode, ids, pending, start

    def _finish_decode(self, decode, ids, pending, start, results: dict) -> None:
        try:
            sampled = pending.result()
        except Exception as e:
            self._fail_decode(decode, e, start, results)
            return
        end = time.monotonic()
        share = self._batch.nbytes // max(1, len(ids))
        self._max_batch_rows = max(self._max_batch_rows, len(ids))
        for row, rid in enumerate(ids):
            choice = sampled.row(row)
            self._live[rid].sampler.accept(choice.token)
            results[rid] = ItemResult(
                rid, choice.token, choice.logprob, choice.top_logprobs, end - start, share
            )
            self.step_log.append((rid, start, end))
        self._items += len(ids)
        self._tokens += len(ids)

    def _launch_prefill_together(self, items: list[StepItem]) -> tuple | None:
        """Whole new prompts (two or more) prefill in one left-padded forward pass."""
        import mlx.core as mx

        from kvgrove.models.batching import prefill_together
        from kvgrove.models.caches import cache_tokens
        from kvgrove.sampling import build_sample

        if not (self._batched and self._prefill_together and self.settings.batch_prefill):
            return None
        fresh = [
            it
            for it in items
            if it.sample and len(it.tokens) > 1 and not self._has_cache(it.request_id)
        ]
        # Padding costs compute: keep the padded batch within two chunks' worth of tokens.
        fresh.sort(key=lambda it: len(it.tokens))
        limit = 2 * self.settings.prefill_chunk_tokens
        while len(fresh) > 1 and len(fresh) * len(fresh[-1].tokens) > limit:
            fresh.pop()
        if len(fresh) < 2:
            return None
        start = time.monotonic()
        try:
            for it in fresh:
                self._open_sequence(it)
            # A restored prefix (non-empty cache) prefills on its own.
            fresh = [it for it in fresh if cache_tokens(self._live[it.request_id].cache) == 0]
            if len(fresh) < 2:
                return None
            logits, cache = prefill_together(
                self.loaded.model, [it.tokens for it in fresh], len(self.loaded.model.layers)
            )
            pending = build_sample(logits, [self._live[it.request_id].sampler for it in fresh])
            mx.async_eval(*pending.arrays())
        except Exception:
            log.exception("prefilling together failed; prefilling one by one")
            return None
        return fresh, cache, pending, start

    def _finish_prefill_together(self, fresh, cache, pending, start, results: dict) -> None:
        try:
            sampled = pending.result()
        except Exception:
            log.exception("prefilling together failed; prefilling one by one")
            for it in fresh:
                results[it.request_id] = self._run_item(it)
            return
        ids = [it.request_id for it in fresh]
        for rid in ids:
            live = self._live[rid]
            live.cache, live.in_batch = None, True  # the batch rows replace the empty caches
        self._batch.join_batch(ids, [len(it.tokens) for it in fresh], cache)
        end = time.monotonic()
        share = sum(int(c.nbytes) for c in cache) // len(ids)
        for row, it in enumerate(fresh):
            choice = sampled.row(row)
            self._live[it.request_id].sampler.accept(choice.token)
            results[it.request_id] = ItemResult(
                it.request_id, choice.token, choice.logprob, choice.top_logprobs, end - start, share
            )
            self.step_log.append((it.request_id, start, end))
        self._items += len(fresh)
        self._tokens += sum(len(it.tokens) for it in fresh)
        if self._prefix is not None:  # the prompts' KV is shared at once (a copy per row)
            for it in fresh:
                try:
                    rows = self._batch.row_copy(it.request_id)
                except Exception:
                    log.exception("copying a prefilled row for the prefix cache failed")
                    continue
                self._store_prefix(None, self._live[it.request_id], rows)

    def _has_cache(self, request_id: int) -> bool:
        live = self._live.get(request_id)
        return live is not None and live.has_cache

    def _fail_decode(self, decode, error: Exception, start: float, results: dict) -> None:
        log.exception("batched decode failed")
        end = time.monotonic()
        for it in decode:
            self._drop(it.request_id)
        for it in decode:
            rid = it.request_id
            results[rid] = ItemResult(rid, None, None, None, end - start, 0, str_error(error))
            self.step_log.append((rid, start, end))

    def _run_item(self, item: StepItem) -> ItemResult:
        """One sequence alone: a prefill chunk (sampling after it when asked), or a decode."""
        import mlx.core as mx

        from kvgrove.models.caches import cache_nbytes
        from kvgrove.models.generate import forward, prefill_chunks
        from kvgrove.sampling import sample_batch

        start = time.monotonic()
        rid = item.request_id
        try:
            live = self._live.get(rid)
            if live is None or not live.has_cache:
                live = self._open_sequence(item)
            if live.in_batch:  # batching is off, or it decodes alone: it leaves the batch
                self._detach([rid])
            tokens = item.tokens
            # Sampling after the prompt's last token: one forward over the whole chunk, unless
            # whole-state layers need their snapshot just before that token (below).
            whole = item.sample and not self._whole_layers
            feed = tokens if not item.sample else [] if whole else tokens[:-1]
            if feed:
                for _ in prefill_chunks(
                    self.loaded.model, live.cache, feed, chunk_tokens=len(feed)
                ):
                    pass
                prompt_end = len(live.sampler.history) == live.prompt_tokens
                if item.sample and prompt_end and self._whole_layers:
                    # Whole-state layers restore only where a snapshot stands: one just before
                    # the last prompt token is what a request with this same prompt can use
                    # (it must feed that token itself).
                    self._store_prefix(None, live, live.cache)
            token = logprob = top = None
            if item.sample:
                last = mx.array(tokens if whole else tokens[-1:], dtype=mx.uint32)[None]
                logits = forward(self.loaded.model, live.cache, last)
                choice = sample_batch(logits, [live.sampler]).row(0)
                live.sampler.accept(choice.token)
                token, logprob, top = choice.token, choice.logprob, choice.top_logprobs
            if self._prefix is not None:
                # Share the prompt's KV at once: after every prefill chunk and at the prompt's
                # end (where recurrent / windowed layers can be snapshotted: the cache stands
                # there now), so a request with the same prefix need not wait for this one to
                # finish, nor compute it again.
                generated = len(live.sampler.history) - live.prompt_tokens
                if not item.sample or generated == 1:
                    self._store_prefix(None, live, live.cache)
            nbytes = cache_nbytes(live.cache)
            error = None
        except Exception as e:  # only this sequence fails
            log.exception("step item for request %d failed", rid)
            self._drop(rid)
            token = logprob = top = None
            nbytes, error = 0, str_error(e)
        end = time.monotonic()
        self._items += 1
        self._tokens += len(item.tokens)
        self.step_log.append((rid, start, end))
        return ItemResult(rid, token, logprob, top, end - start, nbytes, error)

    def statistics(self) -> ExecutorStats:
        return ExecutorStats(
            steps=self._steps,
            items=self._items,
            live_sequences=len(self._live),
            tokens_computed=self._tokens,
            weights_bytes=self.loaded.info.nbytes if self.loaded is not None else 0,
            batch_rows=len(self._batch) if self._batch is not None else 0,
            max_batch_rows=self._max_batch_rows,
            batched=self._batched,
        )


def str_error(error: Exception) -> str:
    return f"generation failed: {error}"
