"""The step runner: one executor step's work, on the MLX thread. Synchronous, no trio.

It owns the sequences the executor knows (`Live`: a sampler and, unless the sequence is a row
of the running batch, its own cache) and the `RunningBatch`. A step decodes every decoding
sequence in one batched forward pass (rows join and leave only when membership changes), and
runs the step's prefill chunks one sequence at a time while that batch computes
(`mx.async_eval`); prompts' last chunks (whole new prompts, or the rest after a restored
prefix) may prefill together, a group per left-padded pass.

The prefix cache is not touched here (the pager owns it): a restored prefix comes in as a live
cache (`run_items(..., restored)`, asked for with `restore_requests`), and what the prefix cache
should keep goes out as `Keep`s (`take_keeps`), which the executor hands to the pager before the
next step runs, so a kept cache still stands where it was taken.
"""

from __future__ import annotations

import collections
import copy
import logging
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs
import mlx.core as mx

from kvgrove import timeline
from kvgrove.config import Settings
from kvgrove.grammar import Constraint
from kvgrove.memory.snapshots import WHOLE, NotSnapshotCapable, layout
from kvgrove.models import attention
from kvgrove.models.batching import RunningBatch, prefill_together, unbatchable_reason
from kvgrove.models.caches import (
    SpanKVCache,
    cache_nbytes,
    cache_tokens,
    make_cache,
    token_nbytes,
)
from kvgrove.models.generate import forward, prefill_chunks
from kvgrove.models.steps import ItemResult, StepItem, StepResult
from kvgrove.sampling import PendingSample, SequenceSampler, build_sample, sample_batch

log = logging.getLogger(__name__)


@attrs.define
class Live:
    """A sequence the runner knows: its sampler and, unless it is a batch row, its cache."""

    sampler: SequenceSampler
    cache: list[Any] | None = None  # None while a row of the batch, or after preemption
    in_batch: bool = False
    namespace: str = ""  # where the prefix cache stores its KV
    prompt_tokens: int = 0
    restored_tokens: int | None = None  # prompt tokens restored from the prefix cache

    @property
    def has_cache(self) -> bool:
        return self.in_batch or self.cache is not None

    @property
    def new_prompt_tokens(self) -> int:
        """The prompt tokens it computes (not restored): what sharing its prefill would store."""
        return self.prompt_tokens - (self.restored_tokens or 0)


@attrs.frozen
class Keep:
    """What the prefix cache should store: `cache` holds exactly `tokens`. With `request_id`,
    the store also unlocks that request's matched prefix; `cache` None: only unlock."""

    request_id: int | None
    namespace: str
    tokens: tuple[int, ...]
    cache: list[Any] | None
    preempted: bool = False  # its count goes into `StepResult.kept`


@attrs.frozen
class RestoreRequest:
    """A live cache holding the first `promised` of `tokens`, from the prefix cache."""

    request_id: int
    namespace: str
    tokens: tuple[int, ...]  # the prompt (a first item) or the history (a resume)
    promised: int
    rematch: bool  # match again first: a preempted sequence resuming holds no lock


@attrs.frozen
class DecodeLaunch:
    """A batched decode whose sampled tokens are still being computed."""

    items: list[StepItem]
    ids: list[int]  # the batch's rows, in order
    pending: PendingSample
    start: float


@attrs.define
class Ahead:
    """The batch's next decode forward, launched from this step's still-lazy tokens before they
    went up (the overlap). The next step uses it if it decodes a subset of `ids`, each fed the
    token it was fed here; the rows it leaves out drop the extra token as they leave the batch
    (one wasted row-step each). Any other plan takes the token off the whole batch."""

    ids: list[int]  # the batch's rows, in order
    logits: mx.array | None  # (B, V), lazily; None if the forward failed (`error`)
    start: float
    error: Exception | None = None
    fed: dict[int, int] = attrs.Factory(dict)  # request id -> the token it was fed
    keep: list[int] = attrs.Factory(list)  # rows (indices into `ids`) the next step decodes
    # The rows' sampling built into the same graph when every row's sampler is stateless
    # (one evaluation per token, not two), and each row's draws before it was built: a sample
    # not used as it is (rows left, or the plan changed) gives its draws back.
    pending: PendingSample | None = None
    draws: list[int] = attrs.Factory(list)

    def give_back_draws(self, live: dict[int, Any]) -> None:
        """The sample built ahead is not used: each row's random stream as it was before."""
        if self.pending is None:
            return
        for rid, mark in zip(self.ids, self.draws, strict=True):
            row = live.get(rid)
            if row is not None:
                row.sampler.rewind_to(mark)
        self.pending = None


@attrs.frozen
class PrefillGroup:
    """Prompts prefilling together in one batch cache, their first tokens pending."""

    items: list[StepItem]
    cache: list[Any]
    pending: PendingSample


@attrs.frozen
class PrefillLaunch:
    """The step's prompts prefilling in groups, one left-padded pass each."""

    items: list[StepItem]  # every group's
    groups: list[PrefillGroup]
    start: float


def prefill_groups(lengths: Sequence[tuple[int, int]], limit: int) -> list[list[int]]:
    """Rows (cached prefix, new tokens) that prefill together, as groups of two or more (row
    indices); the rest prefill one by one. Padding costs compute: within a group the padded
    block of new tokens (rows x the most new tokens) and the padding to the longest row
    (rows x its length, less their lengths: masked positions every query still scans) stay
    within `limit` tokens each. Greedy over rows by length, so rows of like length group."""
    order = sorted(range(len(lengths)), key=lambda r: (sum(lengths[r]), lengths[r][1]))
    groups: list[list[int]] = []
    group: list[int] = []
    for r in order:
        trial = [*group, r]
        block = len(trial) * max(lengths[i][1] for i in trial)
        padding = len(trial) * sum(lengths[r]) - sum(sum(lengths[i]) for i in trial)
        if group and (block > limit or padding > limit):
            groups.append(group)
            trial = [r]
        group = trial
    groups.append(group)
    return [g for g in groups if len(g) > 1]


def overlap_on(settings: Settings) -> bool:
    """Whether the batched decode runs one step ahead (`Settings.decode_overlap`)."""
    if settings.decode_overlap == "auto":
        return mx.default_device().type == mx.DeviceType.gpu
    return settings.decode_overlap == "on"


def wants_restore(items: Iterable[StepItem]) -> bool:
    """Whether some item starts from a cached prefix (the pager restores it first)."""
    return any(
        (it.start is not None and it.start.cached_tokens) or it.resume_tokens for it in items
    )


def str_error(error: Exception) -> str:
    return f"generation failed: {error}"


def standing_copy(cache: Sequence[Any]) -> list[Any]:
    """`cache` as it stands now, still valid while the live one goes on: span layers share the
    buffers (tokens below their count are never written again), whole-state layers are copied."""
    out = []
    for c in cache:
        mine = copy.copy(c)
        if not c.sliceable:
            tokens = c.tokens_seen
            mine.restore([c.snapshot(0, tokens)], tokens)
        out.append(mine)
    return out


class StepRunner:
    """Runs steps for one model. `keeping`: collect `Keep`s for the prefix cache."""

    def __init__(
        self,
        *,
        chunk_tokens: int,
        batch_prefill: bool,
        overlap: bool = True,
        ragged_attention: bool = True,
        host_exp: bool = True,
    ) -> None:
        self.chunk_tokens = chunk_tokens
        # On CUDA, the batch's one-token attention over rows of different lengths runs
        # kvgrove's kernel (installed into the model's module at `use_model`).
        self.ragged_attention = ragged_attention
        # On a CPU, a prefill's attention softmax and SwiGLU run in numpy (models.host_exp).
        self.host_exp = host_exp
        self.batch_prefill = batch_prefill
        self.overlap = overlap  # launch the next batched decode before this one's tokens go up
        self._ahead: Ahead | None = None
        self._ahead_rows: set[int] = set()  # rows leaving with one token too many (the overlap)
        self.model: Any = None
        self.tokenizer: Any = None
        self.keeping = False
        # A prompt is stored as it prefills (shared with requests that come meanwhile) only if
        # it computes at least this many tokens; a shorter one is stored when it finishes.
        self.share_min_tokens = 0
        self.batched = True  # False: the model's caches cannot batch; rows decode one by one
        self.whole_layers = False  # some layer restores only where a snapshot stands
        self._prefill_together = False  # whole prompts prefill in one left-padded pass
        self._live: dict[int, Live] = {}
        self._batch = RunningBatch()
        self._keeps: list[Keep] = []
        # Caches only a Keep holds, maybe views into the batch's buffers: emptied at the next
        # step (the pager has stored them by then), so no view outlives the store, where it
        # would make the batch's next in-place write copy its buffers.
        self._kept_views: list[list[Any]] = []
        self._restored: dict[int, tuple[list[Any] | None, int]] = {}
        self.step_log: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=100_000
        )
        self.steps = 0
        self.items = 0
        self.tokens = 0
        self.max_batch_rows = 0
        self.overlapped_steps = 0  # batched decodes that ran ahead of the scheduler's plan
        self.wasted_row_steps = 0  # rows computed ahead that the plan did not take
        self.fused_steps = 0  # of those, sampled in the same graph as the forward

    def use_model(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._token_bytes = 0  # the model's `token_nbytes`, once a cache has buffers
        cache = make_cache(model)
        self._prefill_together = all(isinstance(c, SpanKVCache) for c in cache)
        try:
            self.whole_layers = WHOLE in layout(cache)
        except NotSnapshotCapable:
            self.whole_layers = False
        reason = unbatchable_reason(cache)
        if reason is not None:
            self.batched = False
            log.warning("batching off, sequences decode one at a time: %s", reason)
        attention.install(model, ragged=self.ragged_attention, host_exp=self.host_exp)

    @property
    def live_sequences(self) -> int:
        return len(self._live)

    @property
    def batch_rows(self) -> int:
        return len(self._batch)

    def forget(self, request_id: int) -> None:
        """Drop a sequence without keeping anything (its ranks lost, its books cleared)."""
        self._live.pop(request_id, None)

    @property
    def has_keeps(self) -> bool:
        return bool(self._keeps)

    def take_keeps(self) -> list[Keep]:
        keeps, self._keeps = self._keeps, []
        return keeps

    def own_caches(self) -> list[Keep]:
        """At shutdown: every sequence's own cache, for the prefix cache to keep."""
        return [
            self._keep_of(rid, live, live.cache)
            for rid, live in self._live.items()
            if live.cache is not None
        ]

    # -- a step ---------------------------------------------------------------------------

    def run(self, step: Any) -> StepResult:
        """Release and preempt what `step` lets go of, then run its items."""
        return self.begin(step) or self.run_items(step)

    def begin(self, step: Any) -> StepResult | None:
        """Rows leave the batch when released, preempted, or not decoding now (parked); the
        released and preempted give up their caches. A failed result if that failed."""
        self.steps += 1
        t0 = time.perf_counter()
        try:
            return self._begin(step)
        finally:
            if (rec := timeline.recorder) is not None:
                rec.add("begin", t0, end=time.perf_counter(), release=len(step.release))

    def _begin(self, step: Any) -> StepResult | None:
        for cache in self._kept_views:
            cache.clear()
        self._kept_views = []
        self._settle_ahead(step)
        decode_ids = {it.request_id for it in step.items if self._is_decode(it)}
        leaving = {*step.release, *step.preempt}
        try:
            # Released and preempted rows: the prefix cache copies what it keeps of them before
            # the next step, and nothing else reads them (without it, nothing at all).
            self._detach(
                [rid for rid in self._batch.ids if rid not in decode_ids or rid in leaving],
                views=leaving if self.keeping else (),
                drop=() if self.keeping else leaving,
            )
            for rid in step.preempt:
                self._preempt_sequence(rid)
            for rid in step.release:
                self._close_sequence(rid)
                self._live.pop(rid, None)
        except Exception as e:  # the batch copy failed: every row in it is lost
            log.exception("releasing sequences failed")
            for rid in list(self._batch.ids) + list(leaving):
                self._drop(rid)
            self._ahead, self._ahead_rows = None, set()
            return StepResult((), error=str_error(e))
        if step.release and not self._live and mx.get_cache_memory() > mx.get_active_memory():
            # The last sequence went: MLX's buffer cache is given back only when it holds more
            # than everything live (weights, stored prefixes), i.e. after a burst far beyond the
            # steady working set. Otherwise the next wave reuses those buffers, and clearing
            # would cost the free now and fresh allocations then (7% of the MLX thread in a
            # profile of waves on a GPU).
            mx.clear_cache()
        return None

    def restore_requests(self, items: Iterable[StepItem]) -> list[RestoreRequest]:
        """What the pager should restore before these items run (after `begin`)."""
        out = []
        for it in items:
            live = self._live.get(it.request_id)
            if live is None and it.start is not None and it.start.cached_tokens:
                s = it.start
                out.append(
                    RestoreRequest(
                        it.request_id, s.namespace, s.prompt_tokens, s.cached_tokens, False
                    )
                )
            elif live is not None and not live.has_cache and it.resume_tokens:
                history = tuple(live.sampler.history)
                out.append(
                    RestoreRequest(it.request_id, live.namespace, history, it.resume_tokens, True)
                )
        return out

    def run_items(
        self, step: Any, restored: Iterable[tuple[int, list[Any] | None, int]] = ()
    ) -> StepResult:
        """Run the items: the batched decode, prefills while it computes; `restored` gives
        (request_id, live cache or None, tokens it holds) for the restores asked for."""
        clock = time.perf_counter
        t0 = clock()
        self._restored = {rid: (cache, n) for rid, cache, n in restored}
        decode = [it for it in step.items if self._is_decode(it)] if self.batched else []
        decode_ids = {it.request_id for it in decode}
        others = [it for it in step.items if it.request_id not in decode_ids]
        results: dict[int, ItemResult] = {}
        ahead, self._ahead, self._ahead_rows = self._ahead, None, set()
        fused = self.fused_steps
        batch = self._launch_decode(decode, results, ahead)
        t_decode = clock()
        # The prefill graphs are built while the batch computes.
        together = self._launch_prefill_together(others)
        t_together = clock()
        for item in others:
            if together is None or item not in together.items:
                results[item.request_id] = self._run_item(item)
        t_alone = clock()
        if together is not None:
            self._finish_prefill_together(together, results)
        t_prefilled = clock()
        if step.ahead:
            self._launch_ahead(batch, results)
        t_ahead = clock()
        if batch is not None:
            self._finish_decode(batch, results)
        t_decoded = clock()
        self._prepare_ahead(results)
        if (rec := timeline.recorder) is not None:
            rec.add(
                "step",
                t0,
                end=clock(),
                decode=len(decode),
                others=len(others),
                together=0 if together is None else len(together.items),
                ran_ahead=ahead is not None,
                fused=self.fused_steps > fused,
                launched_ahead=self._ahead is not None,
                phases=[t_decode, t_together, t_alone, t_prefilled, t_ahead, t_decoded],
            )
        self._restored = {}
        for it in step.items:  # a first item reports the prompt tokens actually restored
            live, result = self._live.get(it.request_id), results[it.request_id]
            if it.start is not None and live is not None and result.error is None:
                restored_tokens = live.restored_tokens or 0
                results[it.request_id] = attrs.evolve(result, cached_tokens=restored_tokens)
        kept = tuple((rid, 0) for rid in step.preempt)  # the pager fills in what it stored
        return StepResult(tuple(results[it.request_id] for it in step.items), kept=kept)

    # -- sequences ------------------------------------------------------------------------

    def _open_sequence(self, item: StepItem) -> Live:
        """Create the sequence's live state: a sampler (first time) and a cache, holding the
        restored prefix where one was promised (the rest of it recomputed).

        Called for a sequence's first item, and again when a preempted sequence resumes (its
        sampler is kept)."""
        rid = item.request_id
        live = self._live.get(rid)
        first = live is None
        if first:
            s = item.start
            assert s is not None, f"request {rid}: first item without a start"
            constraint = (
                None if s.params.grammar is None else Constraint(s.params.grammar, self.tokenizer)
            )
            sampler = SequenceSampler(
                s.params, s.prompt_tokens, context_limit=s.context_tokens, constraint=constraint
            )
            live = Live(sampler, namespace=s.namespace, prompt_tokens=len(s.prompt_tokens))
        assert not live.has_cache
        promised = item.start.cached_tokens if first else item.resume_tokens
        cache, restored = self._restored.pop(rid, (None, 0))
        if cache is None:
            cache, restored = make_cache(self.model), 0
        if restored < promised:
            if restored:
                log.warning("prefix cache gave %d of %d tokens; recomputing", restored, promised)
            tokens = item.start.prompt_tokens if first else tuple(live.sampler.history)
            gap = tokens[restored:promised]
            for _ in prefill_chunks(self.model, cache, gap, chunk_tokens=self.chunk_tokens):
                pass
            self.tokens += len(gap)
        if first and promised:
            live.restored_tokens = restored
        # Only now: a failure above leaves no half-built cache behind, and a first item that
        # failed is a first item again when it is retried alone (its prefix recomputed).
        live.cache = cache
        self._live[rid] = live
        return live

    def _shares_prefill(self, live: Live) -> bool:
        """Whether its prompt is stored at the prompt's end as well as when it finishes."""
        return live.new_prompt_tokens >= self.share_min_tokens

    def _keep_of(self, rid: int | None, live: Live, cache: list[Any] | None, **kw: Any) -> Keep:
        n = cache_tokens(cache) if cache is not None else 0
        held = cache if n > 0 else None
        return Keep(rid, live.namespace, tuple(live.sampler.history[:n]), held, **kw)

    def _keep(self, rid: int | None, live: Live | None, cache: list[Any] | None, **kw) -> None:
        """Hand what `cache` holds to the prefix cache (and unlock the request's prefix)."""
        if not self.keeping:
            return
        if live is None:
            self._keeps.append(Keep(rid, "", (), None, **kw))
        else:
            self._keeps.append(self._keep_of(rid, live, cache, **kw))

    def _preempt_sequence(self, request_id: int) -> None:
        """Give up a preempted sequence's cache to the prefix cache (its sampler is kept)."""
        live = self._live.get(request_id)
        if live is None or live.cache is None:
            self._close_sequence(request_id)
            return
        cache, live.cache = live.cache, None
        self._keep(request_id, live, cache, preempted=True)

    def _close_sequence(self, request_id: int) -> None:
        """Give up the sequence's cache (it has left the batch) to the prefix cache."""
        live = self._live.get(request_id)
        if live is not None:
            assert not live.in_batch
            cache, live.cache = live.cache, None
        else:
            cache = None
        self._keep(request_id, live, cache)

    def _detach(
        self, ids: list[int], views: Collection[int] = (), drop: Collection[int] = ()
    ) -> None:
        """Rows leave the batch, each back to its own cache, or to none if in `drop` (and
        `views`: see `RunningBatch.leave`)."""
        for rid in drop:
            live = self._live.get(rid)
            if rid in ids and live is not None and live.in_batch:
                live.cache, live.in_batch = None, False
                self._ahead_rows.discard(rid)
        for rid, cache in self._batch.leave(ids, views, drop).items():
            if rid in views:
                self._kept_views.append(cache)
            if rid in self._ahead_rows:  # computed ahead, not taken: the token comes off
                self._ahead_rows.discard(rid)
                for c in cache:
                    c.trim(1)
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
            self._batch = RunningBatch()
            self._ahead, self._ahead_rows = None, set()

    def _is_decode(self, item: StepItem) -> bool:
        live = self._live.get(item.request_id)
        return (
            item.start is None
            and item.sample
            and len(item.tokens) == 1
            and live is not None
            and live.has_cache
        )

    def _has_cache(self, request_id: int) -> bool:
        live = self._live.get(request_id)
        return live is not None and live.has_cache

    # -- the batched decode ---------------------------------------------------------------

    def _settle_ahead(self, step: Any) -> None:
        """Before the step changes the batch: take the decode run ahead, or undo it."""
        ahead = self._ahead
        if ahead is None:
            return
        fed = {it.request_id: it.tokens[0] for it in step.items if self._is_decode(it)}
        leaving = {*step.release, *step.preempt}
        if (
            fed
            and self._batch.ids == ahead.ids
            and fed.keys() <= set(ahead.ids) - leaving
            and all(ahead.fed.get(rid) == token for rid, token in fed.items())
        ):
            ahead.keep = [i for i, rid in enumerate(ahead.ids) if rid in fed]
            self._ahead_rows = set(ahead.ids) - fed.keys()  # they leave the batch in `begin`
            self.wasted_row_steps += len(self._ahead_rows)
            return
        # The plan is not the one run ahead (new rows join, a token differs): undo it.
        self._ahead = None
        ahead.give_back_draws(self._live)
        self.wasted_row_steps += len(ahead.ids)
        if ahead.error is not None:  # the batch's state is suspect: it goes
            for rid in self._batch.ids:
                self._live.pop(rid, None)
            self._batch = RunningBatch()
        elif self._batch.ids == ahead.ids:
            self._batch.trim(1)

    def _launch_ahead(self, launch: DecodeLaunch | None, results: dict) -> None:
        """Launch the next decode of every batch row from this step's tokens, still lazy for
        the rows decoded now (plain-attention batches: a token can come off again). Only for a
        step the scheduler expects rows of to decode next (`Step.ahead`): run ahead of every
        step, the plans that change the batch (joins) undid it, and it lost at 64 rows."""
        ids = list(self._batch.ids)
        if not (self.overlap and self.batched and self._prefill_together and ids):
            return
        decoded = launch.ids if launch is not None else []
        joined = ids[len(decoded) :]
        if ids[: len(decoded)] != decoded or any(
            rid not in results or results[rid].token is None for rid in joined
        ):
            return
        start = time.monotonic()
        samplers = [self._live[rid].sampler for rid in ids]
        draws: list[int] = []
        try:
            parts = [launch.pending.tokens] if launch is not None else []
            if joined:
                parts.append(mx.array([results[rid].token for rid in joined], dtype=mx.uint32))
            tokens = parts[0] if len(parts) == 1 else mx.concatenate(parts)
            logits = self._batch.forward(self.model, tokens)
            pending = None
            if all(s.stateless for s in samplers):
                draws = [s.draws for s in samplers]
                pending = build_sample(logits, samplers)
                mx.async_eval(logits, *pending.arrays())
            else:
                mx.async_eval(logits)
        except Exception as e:  # the rows that decode next fail with it, as if it ran then
            for sampler, mark in zip(samplers, draws, strict=False):  # none if not drawn
                sampler.rewind_to(mark)
            self._ahead = Ahead(ids, None, start, error=e)
            return
        self._ahead = Ahead(ids, logits, start, pending=pending, draws=draws)

    def _prepare_ahead(self, results: dict) -> None:
        """Once this step's tokens are known: what each row was fed, and the grammar masks of
        constrained rows, computed on the host while the device runs the decode ahead."""
        ahead = self._ahead
        if ahead is None:
            return
        if any(rid not in results or results[rid].token is None for rid in ahead.ids):
            self._ahead = None  # a row failed: the batch is gone (or going)
            return
        ahead.fed = {rid: results[rid].token for rid in ahead.ids}
        if ahead.logits is None:
            return
        words = (ahead.logits.shape[-1] + 31) // 32
        for rid in ahead.ids:
            constraint = self._live[rid].sampler.constraint
            if constraint is not None:
                constraint.bitmask(words)  # kept until its next accept

    def _launch_decode(
        self, decode: list[StepItem], results: dict, ahead: Ahead | None = None
    ) -> DecodeLaunch | None:
        if not decode:
            return None
        start = time.monotonic()
        try:
            if ahead is not None and ahead.error is not None:
                raise ahead.error
            if ahead is not None:  # the forward ran ahead: only the sampling is left
                logits = ahead.logits
                ids, start = list(self._batch.ids), ahead.start
                # Rows left since (and the last rows moved into their places): the logits
                # follow the batch's rows as they stand now.
                row_of = {rid: i for i, rid in enumerate(ahead.ids)}
                rows = [row_of[rid] for rid in ids]
                assert sorted(rows) == ahead.keep, (ids, ahead.ids, ahead.keep)
                self.overlapped_steps += 1
                if ahead.pending is not None and rows == list(range(len(ahead.ids))):
                    # Sampled in the same graph, already on its way.
                    self.fused_steps += 1
                    return DecodeLaunch(decode, ids, ahead.pending, start)
                ahead.give_back_draws(self._live)
                if rows != list(range(len(ahead.ids))):
                    logits = logits[mx.array(rows)]
            else:
                self._attach(
                    [it.request_id for it in decode if not self._live[it.request_id].in_batch]
                )
                token_of = {it.request_id: it.tokens[0] for it in decode}
                ids = list(self._batch.ids)
                logits = self._batch.forward(self.model, [token_of[rid] for rid in ids])
            pending = build_sample(logits, [self._live[rid].sampler for rid in ids])
            mx.async_eval(*pending.arrays())
        except Exception as e:
            self._fail_decode(decode, e, start, results)
            return None
        return DecodeLaunch(decode, ids, pending, start)

    def _finish_decode(self, launch: DecodeLaunch, results: dict) -> None:
        try:
            sampled = launch.pending.result()
        except Exception as e:
            self._fail_decode(launch.items, e, launch.start, results)
            return
        start, end, ids = launch.start, time.monotonic(), launch.ids
        share = self._batch.nbytes // max(1, len(ids))
        token_bytes = self._row_token_bytes(self._batch.cache)
        self.max_batch_rows = max(self.max_batch_rows, len(ids))
        # Per row only what is the row's own (no TokenChoice, one log entry tuple each).
        tokens, logprobs, tops = sampled.tokens, sampled.logprobs, sampled.top_logprobs
        live, seconds, log_step = self._live, end - start, self.step_log.append
        for row, rid in enumerate(ids):
            token = tokens[row]
            live[rid].sampler.accept(token)
            results[rid] = ItemResult(
                rid, token, logprobs[row], tops[row], seconds, share, token_bytes=token_bytes
            )
            log_step((rid, start, end))
        self.items += len(ids)
        self.tokens += len(ids)

    def _row_token_bytes(self, cache: Any) -> int:
        """The model's `token_nbytes`, read off `cache` the first time it has buffers."""
        if not self._token_bytes and cache:
            self._token_bytes = token_nbytes(cache)
        return self._token_bytes

    def _fail_decode(self, decode, error: Exception, start: float, results: dict) -> None:
        log.error("batched decode failed", exc_info=error)
        end = time.monotonic()
        for it in decode:
            self._drop(it.request_id)
        for it in decode:
            rid = it.request_id
            results[rid] = ItemResult(rid, None, None, None, end - start, 0, str_error(error))
            self.step_log.append((rid, start, end))

    # -- prefills -------------------------------------------------------------------------

    def _launch_prefill_together(self, items: list[StepItem]) -> PrefillLaunch | None:
        """Prompts (whole, or the rest after a restored prefix) prefill in groups of two or
        more, one left-padded forward pass each (`prefill_together`)."""
        if not (self.batched and self._prefill_together and self.batch_prefill):
            return None
        candidates = [it for it in items if it.sample and not self._has_cache(it.request_id)]
        lengths = [(self._promised(it), len(it.tokens)) for it in candidates]
        grouped = prefill_groups(lengths, 2 * self.chunk_tokens)
        if not grouped:
            return None
        start = time.monotonic()
        groups = []
        for rows in grouped:
            group = []
            for it in (candidates[r] for r in rows):
                try:
                    self._open_sequence(it)
                except Exception:  # it prefills on its own (and fails there, if it must)
                    log.exception("restoring request %d failed", it.request_id)
                    continue
                group.append(it)
            if len(group) < 2:
                continue
            lives = [self._live[it.request_id] for it in group]
            try:
                logits, cache = prefill_together(
                    self.model,
                    [it.tokens for it in group],
                    len(self.model.layers),
                    [live.cache for live in lives],
                )
                pending = build_sample(logits, [live.sampler for live in lives])
                mx.async_eval(*pending.arrays())
            except Exception:
                log.exception("prefilling together failed; prefilling one by one")
                continue
            groups.append(PrefillGroup(group, cache, pending))
        if not groups:
            return None
        return PrefillLaunch([it for g in groups for it in g.items], groups, start)

    def _promised(self, item: StepItem) -> int:
        """The prefix tokens a sequence without a cache starts this item from (restored)."""
        if self._live.get(item.request_id) is None:
            return item.start.cached_tokens if item.start is not None else 0
        return item.resume_tokens

    def _finish_prefill_together(self, launch: PrefillLaunch, results: dict) -> None:
        for group in launch.groups:
            self._finish_group(group, launch.start, results)

    def _finish_group(self, group: PrefillGroup, start: float, results: dict) -> None:
        items, cache = group.items, group.cache
        try:
            sampled = group.pending.result()
        except Exception:  # the sequences' own caches are intact (only read)
            log.exception("prefilling together failed; prefilling one by one")
            for it in items:
                results[it.request_id] = self._run_item(it)
            return
        ids = [it.request_id for it in items]
        tokens = []
        for it in items:
            live = self._live[it.request_id]
            tokens.append(cache_tokens(live.cache) + len(it.tokens))
            live.cache, live.in_batch = None, True  # the batch rows replace their own caches
        self._batch.join_batch(ids, tokens, cache)
        end = time.monotonic()
        share = sum(int(c.nbytes) for c in cache) // len(ids)
        token_bytes = self._row_token_bytes(cache)
        for row, it in enumerate(items):
            choice = sampled.row(row)
            self._live[it.request_id].sampler.accept(choice.token)
            results[it.request_id] = ItemResult(
                it.request_id,
                choice.token,
                choice.logprob,
                choice.top_logprobs,
                end - start,
                share,
                token_bytes=token_bytes,
            )
            self.step_log.append((it.request_id, start, end))
        self.items += len(items)
        self.tokens += sum(len(it.tokens) for it in items)
        shared = [r for r in ids if self._shares_prefill(self._live[r])] if self.keeping else []
        if shared:  # the prompts' KV is shared at once
            try:
                # Views: the pager copies the spans it stores before the next step.
                rows = self._batch.row_caches(shared, views=True)
            except Exception:
                log.exception("viewing prefilled rows for the prefix cache failed")
                return
            for rid, cache in zip(shared, rows, strict=True):
                self._keep(None, self._live[rid], cache)
                self._kept_views.append(cache)

    def _run_item(self, item: StepItem) -> ItemResult:
        """One sequence alone: a prefill chunk (sampling after it when asked), or a decode."""
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
            whole = item.sample and not (self.keeping and self.whole_layers)
            feed = tokens if not item.sample else [] if whole else tokens[:-1]
            if feed:
                for _ in prefill_chunks(self.model, live.cache, feed, chunk_tokens=len(feed)):
                    pass
                prompt_end = len(live.sampler.history) == live.prompt_tokens
                if (
                    item.sample
                    and prompt_end
                    and self.keeping
                    and self.whole_layers
                    and self._shares_prefill(live)
                ):
                    # Whole-state layers restore only where a snapshot stands: one just before
                    # the last prompt token is what a request with this same prompt can use
                    # (it must feed that token itself). The last token moves the cache on
                    # before the pager stores it: it gets the cache as it stands here.
                    self._keep(None, live, standing_copy(live.cache))
            token = logprob = top = None
            if item.sample:
                last = mx.array(tokens if whole else tokens[-1:], dtype=mx.uint32)[None]
                logits = forward(self.model, live.cache, last)
                choice = sample_batch(logits, [live.sampler]).row(0)
                live.sampler.accept(choice.token)
                token, logprob, top = choice.token, choice.logprob, choice.top_logprobs
            if self.keeping:
                # Share the prompt's KV at once: after every prefill chunk and at the prompt's
                # end (where recurrent / windowed layers can be snapshotted: the cache stands
                # there now), so a request with the same prefix need not wait for this one to
                # finish, nor compute it again. The pager stores it before the next step. At the
                # end only a prompt that computed `share_min_tokens` (a shorter one costs less
                # to compute again than to store now; it is stored when it finishes).
                generated = len(live.sampler.history) - live.prompt_tokens
                if not item.sample or (generated == 1 and self._shares_prefill(live)):
                    self._keep(None, live, live.cache)
            nbytes = cache_nbytes(live.cache)
            token_bytes = self._row_token_bytes(live.cache)
            error = None
        except Exception as e:  # only this sequence fails
            log.exception("step item for request %d failed", rid)
            self._drop(rid)
            token = logprob = top = None
            nbytes, token_bytes, error = 0, 0, str_error(e)
        end = time.monotonic()
        self.items += 1
        self.tokens += len(item.tokens)
        self.step_log.append((rid, start, end))
        return ItemResult(
            rid, token, logprob, top, end - start, nbytes, error, token_bytes=token_bytes
        )
