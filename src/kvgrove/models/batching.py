"""Batch cache glue: join live per-sequence caches into one running batch and split them back.

Synchronous, no trio: the executor drives a `RunningBatch` on its MLX thread.

A batch holds one batch cache per layer: `SlotKVCache` (mlx-lm's left-padded `BatchKVCache`
with room for more rows and positions) for attention / MLA layers, mlx-lm's `ArraysCache` for
recurrent layers (rows stacked, no padding). The batch persists across steps; membership changes
only through `join` and `leave`. A join writes only the joining rows into free slots (the
buffers grow when they run out: one copy, amortized), a leave moves the last rows into the
holes it leaves (only those rows are copied), so neither costs a whole-batch copy per event.
Recurrent layers' states are small and fixed per row: they are concatenated and gathered.

Rows leave as kvgrove per-sequence caches (`SpanKVCache`, `RecurrentCache`): copies (slices of
one gather of the leaving rows per layer), never views into the batch buffers, so a sequence's
cache can be snapshotted or kept after the batch moves on.

Membership changes wait on the device as little as they can: on an accelerator each wait is a
round trip behind everything queued. The rows' left padding is mirrored on the host (never read
back), a join or a leave is queued with one `mx.async_eval`, and a leave waits once (for all
layers), only when rows stay and others leave as copies or move: MLX writes a buffer in place
only when no pending operation still reads it, so those reads must be done before the moves and
the next step write into the buffers (else each write copies its whole buffer).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

from kvgrove.models import attention
from kvgrove.models.caches import RecurrentCache, SpanKVCache, cache_tokens
from kvgrove.models.generate import forward, head_follows_body


def unbatchable_reason(cache: Sequence[Any]) -> str | None:
    """Why sequences with caches like `cache` cannot share a batch (None when they can)."""
    for i, c in enumerate(cache):
        if type(c) not in (SpanKVCache, RecurrentCache):
            return f"layer {i} uses {type(c).__name__}, which has no batched form here"
    return None


class SlotKVCache(mlx_cache.BatchKVCache):
    """A batch's attention KV for one layer, with room: rows join into free slots, leave by
    moving the last row into the hole, so neither copies the whole batch.

    The buffers hold `capacity` rows of `keys.shape[2]` positions; the first `rows` are the
    batch (left-padded to the shared length `_idx`, as in mlx-lm's `BatchKVCache`, whose mask
    and offsets it keeps: `left_padding` and `offset` have `rows` entries). A join past capacity
    copies the batch once into buffers with room: doubling up to 16 rows, then 16 rows more
    (the spare rows are memory a long-context batch cannot waste); positions grow in `step`s
    as mlx-lm's do. A joining row longer than the batch's length shifts the batch right
    (one copy); a freed row's old values stay behind its new occupant's left padding, masked.

    `pads` mirrors `left_padding` on the host (`offset` is `_idx - pads` row by row), so
    nothing here reads the device's copy back.
    """

    def __init__(self, left_padding: Sequence[int]) -> None:
        super().__init__(list(left_padding))
        self.rows = len(left_padding)
        self.pads = list(left_padding)

    def _set_pads(self, pads: list[int]) -> None:
        self.pads = pads
        self.left_padding = mx.array(pads, mx.int32)
        self.offset = mx.array([self._idx - p for p in pads], mx.int32)

    def make_mask(
        self, N: int, return_array: bool = False, window_size: int | None = None, **kwargs: Any
    ) -> Any:
        """mlx-lm's left-padded causal mask; for a one-token query with no padding at all,
        none (every position is attended), as mlx-lm's plain caches answer: MLX's fused decode
        attention takes no array mask on CUDA. The one-token mask is noted for
        `attention.ragged_decode` (see kvgrove.models.attention)."""
        decode = N == 1 and window_size is None and not return_array
        if decode and not any(self.pads):
            return None
        mask = super().make_mask(N, return_array=return_array, window_size=window_size, **kwargs)
        if decode:
            attention.note_decode_mask(mask, self.pads)
        return mask

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[0]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        n, _, t, _ = keys.shape
        assert n == self.rows, (n, self.rows)
        prev = self._idx
        if self.keys is None:
            size = -(-t // self.step) * self.step
            self.keys = mx.zeros((n, keys.shape[1], size, keys.shape[3]), keys.dtype)
            self.values = mx.zeros((n, values.shape[1], size, values.shape[3]), values.dtype)
        elif prev + t > self.keys.shape[2]:
            self._relayout(self.capacity, 0, prev + t)
        self.offset = self.offset + t
        self._idx += t
        if n == self.capacity:
            self.keys[..., prev : self._idx, :] = keys
            self.values[..., prev : self._idx, :] = values
        else:
            self.keys[:n, :, prev : self._idx, :] = keys
            self.values[:n, :, prev : self._idx, :] = values
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        n, i = self.rows, self._idx
        if n == self.capacity:
            return self.keys[..., :i, :], self.values[..., :i, :]
        return self.keys[:n, :, :i, :], self.values[:n, :, :i, :]

    def _relayout(self, capacity: int, shift: int, length: int) -> None:
        """New buffers of `capacity` rows and room for `length` positions, the rows moved
        `shift` positions right (the one whole-batch copy)."""
        n, i = self.rows, self._idx
        k, v = self.keys, self.values
        size = -(-length // self.step) * self.step
        new_k = mx.zeros((capacity, k.shape[1], size, k.shape[3]), k.dtype)
        new_v = mx.zeros((capacity, v.shape[1], size, v.shape[3]), v.dtype)
        if n and i:
            new_k[:n, :, shift : shift + i, :] = k[:n, :, :i, :]
            new_v[:n, :, shift : shift + i, :] = v[:n, :, :i, :]
        self.keys, self.values = new_k, new_v
        if shift:
            self._idx += shift
            self._set_pads([p + shift for p in self.pads])

    def take(self, parts: Sequence[tuple[mx.array, mx.array, int, Sequence[int]]]) -> None:
        """Rows prefilled elsewhere join at the end. Each part is (keys (k, H, >= length, D),
        values, length, the k rows' left padding): k rows left-padded to their shared length.
        Only they are written (unless capacity or left room runs out: then one copy for all)."""
        k = sum(part[0].shape[0] for part in parts)
        longest = max(part[2] for part in parts)
        n = self.rows
        if self.keys is None:
            keys, values = parts[0][0], parts[0][1]
            self.keys, self.values = keys[..., :0, :], values[..., :0, :]
            self.rows, self._idx, self.pads = 0, 0, []
            self._relayout(k, 0, longest + 1)
        shift = max(0, longest - self._idx)
        if n + k > self.capacity or shift or self._idx + 1 > self.keys.shape[2]:
            capacity = self.capacity
            if n + k > capacity:  # doubling while small, then 16 rows at a time
                capacity = max(n + k, capacity + min(capacity, 16))
            self._relayout(capacity, shift, self._idx + shift + 1)
        pads = list(self.pads)
        for keys, values, length, left_padding in parts:
            r, start = len(pads), self._idx - length
            end = r + keys.shape[0]
            self.keys[r:end, :, start : self._idx, :] = keys[..., :length, :]
            self.values[r:end, :, start : self._idx, :] = values[..., :length, :]
            pads += [p + start for p in left_padding]
        self.rows = n + k
        self._set_pads(pads)

    def read_rows(self, rows: Sequence[int], index: mx.array) -> tuple[int, mx.array, mx.array]:
        """Rows `rows` (`index` on the device) gathered into new arrays, lazily: one copy of
        positions [start, _idx), from the first one any of them holds; returns start too."""
        start, i = min(self.pads[r] for r in rows), self._idx
        return start, self.keys[:, :, start:i, :][index], self.values[:, :, start:i, :][index]

    def move(
        self,
        order: Sequence[int],
        dst: mx.array | None = None,
        rows: tuple[int, mx.array, mx.array] | None = None,
    ) -> None:
        """Keep rows `order` (old row indices, in their new order) as rows 0..: rows `dst`
        (the positions p where order[p] != p) get `rows`, the old rows order[p] read by
        `read_rows` and already evaluated, so nothing else reads the buffers and these writes
        go in place; every other row keeps its place."""
        if rows is not None:
            start, keys, values = rows
            i = self._idx
            self.keys[dst, :, start:i, :], self.values[dst, :, start:i, :] = keys, values
        self.rows = len(order)
        pads = [self.pads[o] for o in order]
        if not self.rows:
            self.keys = self.values = None
            self._idx = 0
            self._set_pads(pads)
            return
        strip = min(pads)
        capacity = self.capacity
        if capacity > 8 and self.rows * 4 <= capacity:
            capacity //= 2  # give back what a much smaller batch no longer needs
        if strip >= self.step or capacity != self.capacity:
            # Padding every row shares (its long rows left): drop it, one copy.
            pads = [p - strip for p in pads]
            i = self._idx
            k, v = self.keys, self.values
            self.keys, self.values = k[: self.rows, :, strip:i, :], v[: self.rows, :, strip:i, :]
            self._idx = i - strip
            self._relayout(capacity, 0, self._idx + 1)
            # _relayout copied rows [0, rows) positions [0, _idx) of the sliced view.
        self._set_pads(pads)

    def extract(self, idx: int) -> mlx_cache.KVCache:
        assert idx < self.rows
        cache = mlx_cache.KVCache()
        pad = self.pads[idx]
        cache.keys = mx.contiguous(self.keys[idx : idx + 1, :, pad : self._idx])
        cache.values = mx.contiguous(self.values[idx : idx + 1, :, pad : self._idx])
        cache.offset = self._idx - pad
        return cache


def _compaction(n: int, leaving: set[int]) -> list[int]:
    """The kept rows' old indices in their new order: each stays where it is, except that the
    last ones fill the holes the leavers leave below the new length."""
    kept = [i for i in range(n) if i not in leaving]
    m = len(kept)
    holes = [i for i in sorted(leaving) if i < m]
    movers = [i for i in kept if i >= m]
    order = list(range(m))
    for hole, mover in zip(holes, movers, strict=True):
        order[hole] = mover
    return order


def _merge_recurrent(layers: list[Any]) -> Any:
    merged = mlx_cache.ArraysCache.merge(layers)
    merged.left_padding = None  # rows are stacked whole: nothing to mask
    return merged


def _row_caches(
    cache: Sequence[Any],
    rows: Sequence[int],
    tokens: Sequence[int],
    *,
    views: bool = False,
) -> list[list[Any]]:
    """Per-sequence caches of batch rows `rows` (holding `tokens` each), one list per row.

    Copies, or with `views` slices of the batch's buffers: for a cache read once and dropped
    before the batch's next step (a prefix-cache store copies only the span it keeps), never
    for one that decodes on. A view alive at the next step would only cost speed: the batch's
    in-place writes would copy its buffers instead. Copies are one gather of all the rows per
    layer (not one copy per row and layer: fewer operations to launch), each row's cache a
    slice of it, never of the batch's buffers; lazy, the caller evaluates them."""
    out: list[list[Any]] = [[] for _ in rows]
    index = mx.array(rows, mx.int32)
    at = rows if views else range(len(rows))  # each row's place in the arrays it is cut from
    for layer in cache:
        if isinstance(layer, SlotKVCache):
            pads, end = layer.pads, layer._idx
            if views:
                start, keys, values = 0, layer.keys, layer.values
            else:
                start, keys, values = layer.read_rows(rows, index)
            for mine, row, j in zip(out, rows, at, strict=True):
                c = SpanKVCache()
                c.keys = keys[j : j + 1, :, pads[row] - start : end - start, :]
                c.values = values[j : j + 1, :, pads[row] - start : end - start, :]
                c.offset = end - pads[row]
                mine.append(c)
            continue
        # Gathered even for views: a view would keep the whole batch state alive.
        gathered = [None if a is None else a[index] for a in layer.cache]
        for j, (mine, n) in enumerate(zip(out, tokens, strict=True)):
            c = RecurrentCache(len(layer.cache))
            c.cache = [None if a is None else a[j : j + 1] for a in gathered]
            c._tokens_seen = n
            mine.append(c)
    return out


def _arrays(layer: Any) -> list[mx.array]:
    if isinstance(layer, mlx_cache.ArraysCache):
        return [a for a in layer.cache if a is not None]
    arrays = [layer.keys, layer.values]
    if isinstance(layer, mlx_cache.BatchKVCache):
        arrays += [layer.offset, layer.left_padding]
    return [a for a in arrays if a is not None]


class RunningBatch:
    """The rows decoding together: ids in row order, their token counts, one cache per layer."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.tokens: list[int] = []  # tokens in each row's cache
        self.cache: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, rid: object) -> bool:
        return rid in self.ids

    @property
    def nbytes(self) -> int:
        return sum(int(c.nbytes) for c in self.cache) if self.cache else 0

    def join(self, rows: Sequence[tuple[int, list[Any]]]) -> None:
        """Add (id, per-sequence cache) rows at the end, written into free slots."""
        if not rows:
            return
        for rid, cache in rows:
            assert rid not in self.ids, rid
            assert cache_tokens(cache) > 0, "a row joins after its prompt was fed"
        first = rows[0][1]
        if self.cache is None:
            self.cache = [SlotKVCache([]) if isinstance(c, SpanKVCache) else None for c in first]
        for i, mine in enumerate(self.cache):
            layers = [cache[i] for _, cache in rows]
            if isinstance(mine, SlotKVCache):
                mine.take([(c.keys, c.values, int(c.offset), [0]) for c in layers])
            elif mine is None:
                self.cache[i] = _merge_recurrent(layers)
            else:
                mine.extend(_merge_recurrent(layers))
        self.ids += [rid for rid, _ in rows]
        self.tokens += [cache_tokens(cache) for _, cache in rows]
        self._evaluate()

    def join_batch(self, ids: Sequence[int], tokens: Sequence[int], cache: list[Any]) -> None:
        """Add rows that were prefilled together into a batch cache of their own (`prefill`)."""
        assert not set(ids) & set(self.ids)
        if self.cache is None:
            self.cache = cache
        else:
            for mine, theirs in zip(self.cache, cache, strict=True):
                if isinstance(mine, SlotKVCache):
                    mine.take([(theirs.keys, theirs.values, theirs._idx, theirs.pads)])
                else:
                    mine.extend(theirs)
        self.ids += list(ids)
        self.tokens += list(tokens)
        self._evaluate()

    def leave(
        self, ids: Iterable[int], views: Collection[int] = (), drop: Collection[int] = ()
    ) -> dict[int, list[Any]]:
        """Take rows out: each comes back as a per-sequence cache, except those in `drop`
        (nobody needs their KV). Rows in `views` come back as views (see `_row_caches`) when
        the batch empties; while rows stay, copies (a view would make the move below copy the
        batch). The last rows move into the holes (the row order changes; `ids` says it), the
        others stay where they are."""
        leaving = [rid for rid in dict.fromkeys(ids) if rid in self.ids]
        if not leaving:
            return {}
        assert self.cache is not None
        everyone = len(leaving) == len(self.ids)
        gone = set(leaving)
        order = _compaction(len(self.ids), {i for i, rid in enumerate(self.ids) if rid in gone})
        moved = [(p, o) for p, o in enumerate(order) if p != o]
        kept = [rid for rid in leaving if rid not in drop]
        viewed = [rid for rid in kept if everyone and rid in views]
        copied = [rid for rid in kept if rid not in viewed]
        out = {}
        for group, as_view in ((copied, False), (viewed, True)):
            if group:
                rows = [self.ids.index(rid) for rid in group]
                caches = _row_caches(
                    self.cache, rows, [self.tokens[r] for r in rows], views=as_view
                )
                out.update(zip(group, caches, strict=True))
        copies = [_arrays(c) for rid in copied for c in out[rid]]
        if everyone:  # nothing writes into the batch's buffers again: no need to wait
            mx.async_eval(copies)
            self.ids, self.tokens, self.cache = [], [], None
            return out
        reads, dst = {}, None
        if moved:
            dst = mx.array([p for p, _ in moved], mx.int32)
            movers = [o for _, o in moved]
            src = mx.array(movers, mx.int32)
            for i, c in enumerate(self.cache):
                if isinstance(c, SlotKVCache):
                    reads[i] = c.read_rows(movers, src)
        if copies or moved:
            # The one wait: the copies out and the moving rows' reads done, for every layer at
            # once, so the moves below and the next step write into the buffers in place.
            mx.eval(copies, [r[1:] for r in reads.values()])
        index = None
        for i, c in enumerate(self.cache):
            if isinstance(c, SlotKVCache):
                c.move(order, dst, reads.get(i))
            else:
                index = mx.array(order) if index is None else index
                c.filter(index)
        self.ids = [self.ids[i] for i in order]
        self.tokens = [self.tokens[i] for i in order]
        self._evaluate()
        return out

    def row_caches(self, rids: Sequence[int], *, views: bool = False) -> list[list[Any]]:
        """Per-sequence copies (or views, see `_row_caches`) of rows' caches; the rows stay."""
        assert self.cache is not None
        rows = [self.ids.index(rid) for rid in rids]
        out = _row_caches(self.cache, rows, [self.tokens[r] for r in rows], views=views)
        if not views:  # the reads done, so the batch's next step writes in place
            mx.eval([_arrays(c) for row in out for c in row])
        return out

    def trim(self, n: int = 1) -> None:
        """Take the last n tokens off every row (plain-attention batches only)."""
        for c in self.cache:
            c.trim(n)
        self.tokens = [t - n for t in self.tokens]

    def forward(self, model: nn.Module, tokens: Sequence[int] | mx.array) -> mx.array:
        """One decode step: row i is fed tokens[i]; returns (B, V) logits, lazily."""
        assert self.cache is not None and len(tokens) == len(self.ids)
        inputs = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.uint32)
        logits = model(inputs.reshape(-1, 1), cache=self.cache)
        self.tokens = [n + 1 for n in self.tokens]
        return logits[:, -1, :]

    def _evaluate(self) -> None:
        # Queue the copies now, so the old buffers are freed rather than kept by the graph; no
        # wait: what the next step writes in place is their output, which nothing else reads.
        mx.async_eval([_arrays(c) for c in self.cache])


class _RestoringSlots(SlotKVCache):
    """A prefill's batch cache whose rows' restored KV stands where their blocks of input reach
    back into their prefixes: the first update keeps the buffer's values at `keep` (B, 1, S, 1)
    rather than those computed there (computed only to fill the block; no query reads them)."""

    keep: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        keep, self.keep = self.keep, None
        if keep is not None:
            n, i, t = self.rows, self._idx, keys.shape[2]
            keys = mx.where(keep, self.keys[:n, :, i : i + t, :], keys)
            values = mx.where(keep, self.values[:n, :, i : i + t, :], values)
        return super().update_and_fetch(keys, values)


def restored_slots(
    caches: Sequence[Sequence[Any] | None], ends: Sequence[int], block: int, n_layers: int
) -> list[SlotKVCache]:
    """Batch caches for rows whose own caches (`caches[i]`: SpanKVCache layers, or None: empty)
    hold each a prefix of the row's first `ends[i]` tokens, to be followed by one `block` of
    inputs: rows right-aligned at T = max(ends), the block at [T - block, T), each prefix
    copied in right before its row's new tokens. Where a row's block reaches back into its
    prefix (its new tokens are fewer), the restored KV stands (`_RestoringSlots`)."""
    held = [0 if c is None else cache_tokens(c) for c in caches]
    total = max(ends)
    idx = total - block
    padding = [total - e for e in ends]
    assert all(0 <= h <= e and e - h <= block for h, e in zip(held, ends, strict=True))
    restored = [(row, c) for row, c in enumerate(caches) if c is not None and held[row]]
    # The block's positions whose restored KV stands (padding too: masked, never read).
    keep = None
    if restored and block:
        pos = mx.arange(idx, total)[None, :]
        stands = mx.array([p + h for p, h in zip(padding, held, strict=True)])[:, None]
        keep = (pos < stands)[:, None, :, None]
    out = []
    for layer in range(n_layers):
        c = _RestoringSlots(padding)
        if restored:
            first = restored[0][1][layer]
            size = -(-(total + 1) // c.step) * c.step  # room for the last token's step
            k0, v0 = first.keys, first.values
            keys = mx.zeros((len(caches), k0.shape[1], size, k0.shape[3]), k0.dtype)
            values = mx.zeros((len(caches), v0.shape[1], size, v0.shape[3]), v0.dtype)
            for row, cache in restored:
                a, n = padding[row], held[row]
                keys[row : row + 1, :, a : a + n, :] = cache[layer].keys[..., :n, :]
                values[row : row + 1, :, a : a + n, :] = cache[layer].values[..., :n, :]
            c.keys, c.values, c._idx = keys, values, idx
            c.offset = mx.array([idx - p for p in padding])
            c.keep = keep
        out.append(c)
    return out


def prefill_together(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    n_layers: int,
    caches: Sequence[Sequence[Any] | None] | None = None,
) -> tuple[mx.array, list[Any]]:
    """Prefill prompts of different lengths together, each after its own restored prefix.

    For models whose every layer is plain attention KV (`SpanKVCache`). Row i feeds
    `prompts[i]` after the prefix its per-sequence cache `caches[i]` holds (None, or no
    `caches`: nothing; then a prompt is the whole prompt). The rows are right-aligned, each
    restored prefix placed before its new tokens, shorter rows left-padded (a row's block
    reaches back over its prefix, whose KV stands: see `restored_slots`), and go through one
    (B, S) forward pass, S the most new tokens a row has, the head on the last position only
    (`forward`). For a model whose head runs on every position, all but the last tokens go
    through a (B, S - 1) pass without logits, then the last through a (B, 1) step, so the head
    runs for B positions rather than B x S. Returns the logits (B, V), lazily, and the batch
    caches, ready for `RunningBatch.join_batch`; the per-sequence caches are only read. The
    weights are read once per pass, not once per prompt, which is where short prompts spend
    their time.
    """
    caches = [None] * len(prompts) if caches is None else caches
    held = [0 if c is None else cache_tokens(c) for c in caches]
    block = max(len(p) for p in prompts)
    if block == 1 or head_follows_body(model):
        # Every row's last token stands at the block's last position: one pass, the head on
        # that position only (`forward`). Over a long context a pass costs more than its
        # tokens on a CPU (the 1-token step cost 180 ms at 1,700 tokens), and a GPU reads
        # the weights once rather than twice.
        ends = [n + len(p) for n, p in zip(held, prompts, strict=True)]
        cache = restored_slots(caches, ends, block, n_layers)
        rows = [[0] * (block - len(p)) + list(p) for p in prompts]
        return forward(model, cache, mx.array(rows, dtype=mx.uint32)), cache
    heads = [list(p[:-1]) for p in prompts]
    block -= 1
    ends = [n + len(h) for n, h in zip(held, heads, strict=True)]
    cache = restored_slots(caches, ends, block, n_layers)
    if block:
        rows = [[0] * (block - len(h)) + h for h in heads]
        model(mx.array(rows, dtype=mx.uint32), cache=cache)
        mx.eval([_arrays(c) for c in cache])
    last = mx.array([[p[-1]] for p in prompts], dtype=mx.uint32)
    return model(last, cache=cache)[:, -1, :], cache
