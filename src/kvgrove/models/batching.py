"""Batch cache glue: join live per-sequence caches into one running batch and split them back.

Synchronous, no trio: the executor drives a `RunningBatch` on its MLX thread.

A batch holds one mlx-lm batch cache per layer: `BatchKVCache` (left-padded, per-row offsets)
for attention / MLA layers, `ArraysCache` for recurrent layers (rows stacked, no padding). The
batch persists across steps; membership changes only through `join` and `leave`, and each of
those copies the whole batch KV once (however many rows come or go), so callers should group
their joins and their leaves per step rather than rebuild the batch.

Rows leave as kvgrove per-sequence caches (`SpanKVCache`, `RecurrentCache`): contiguous copies,
never views into the batch buffers, so a sequence's cache can be snapshotted or kept after the
batch moves on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

from kvgrove.models.caches import RecurrentCache, SpanKVCache, cache_tokens


def unbatchable_reason(cache: Sequence[Any]) -> str | None:
    """Why sequences with caches like `cache` cannot share a batch (None when they can)."""
    for i, c in enumerate(cache):
        if type(c) not in (SpanKVCache, RecurrentCache):
            return f"layer {i} uses {type(c).__name__}, which has no batched form here"
    return None


def _merge_layer(layers: list[Any]) -> Any:
    if isinstance(layers[0], SpanKVCache):
        return mlx_cache.BatchKVCache.merge(layers)
    merged = mlx_cache.ArraysCache.merge(layers)
    merged.left_padding = None  # rows are stacked whole: nothing to mask
    return merged


def _extract_layer(layer: Any, row: int, tokens: int) -> Any:
    if isinstance(layer, mlx_cache.BatchKVCache):
        row_cache = layer.extract(row)  # a contiguous copy
        out = SpanKVCache()
        out.keys, out.values, out.offset = row_cache.keys, row_cache.values, row_cache.offset
        return out
    out = RecurrentCache(len(layer.cache))
    # Copies, not views: a view would keep the whole batch state alive.
    out.cache = [mx.contiguous(a[row : row + 1]) if a is not None else None for a in layer.cache]
    out._tokens_seen = tokens
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
        """Add (id, per-sequence cache) rows at the end: one merge, then one extend."""
        if not rows:
            return
        for rid, cache in rows:
            assert rid not in self.ids, rid
            assert cache_tokens(cache) > 0, "a row joins after its prompt was fed"
        n_layers = len(rows[0][1])
        merged = [_merge_layer([cache[i] for _, cache in rows]) for i in range(n_layers)]
        if self.cache is None:
            self.cache = merged
        else:
            for mine, theirs in zip(self.cache, merged, strict=True):
                mine.extend(theirs)
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
                mine.extend(theirs)
        self.ids += list(ids)
        self.tokens += list(tokens)
        self._evaluate()

    def leave(self, ids: Iterable[int]) -> dict[int, list[Any]]:
        """Take rows out: each comes back as a per-sequence cache; the rest are kept (one copy)."""
        leaving = [rid for rid in dict.fromkeys(ids) if rid in self.ids]
        if not leaving:
            return {}
        assert self.cache is not None
        out = {}
        for rid in leaving:
            row = self.ids.index(rid)
            out[rid] = [_extract_layer(c, row, self.tokens[row]) for c in self.cache]
        mx.eval([_arrays(c) for cache in out.values() for c in cache])
        keep = [i for i, rid in enumerate(self.ids) if rid not in out]
        if not keep:
            self.ids, self.tokens, self.cache = [], [], None
            return out
        index = mx.array(keep)
        for c in self.cache:
            c.filter(index)
        self.ids = [self.ids[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self._evaluate()
        return out

    def row_copy(self, rid: int) -> list[Any]:
        """A per-sequence copy of one row's cache (the row stays in the batch)."""
        assert self.cache is not None
        row = self.ids.index(rid)
        out = [_extract_layer(c, row, self.tokens[row]) for c in self.cache]
        mx.eval([_arrays(c) for c in out])
        return out

    def forward(self, model: nn.Module, tokens: Sequence[int] | mx.array) -> mx.array:
        """One decode step: row i is fed tokens[i]; returns (B, V) logits, lazily."""
        assert self.cache is not None and len(tokens) == len(self.ids)
        inputs = tokens if isinstance(tokens, mx.array) else mx.array(tokens, dtype=mx.uint32)
        logits = model(inputs.reshape(-1, 1), cache=self.cache)
        self.tokens = [n + 1 for n in self.tokens]
        return logits[:, -1, :]

    def _evaluate(self) -> None:
        # Materialize the copies now, so the old buffers are freed rather than kept by the graph.
        mx.eval([_arrays(c) for c in self.cache])


def prefill_together(
    model: nn.Module, prompts: Sequence[Sequence[int]], n_layers: int
) -> tuple[mx.array, list[Any]]:
    """Prefill whole prompts (two tokens or more each) of different lengths together.

    For models whose every layer is plain attention KV (`SpanKVCache`). All but each prompt's
    last token go through one left-padded (B, T) forward pass whose logits are never computed;
    the last tokens then go through one (B, 1) step, so the vocabulary projection runs for B
    positions rather than B x T. Returns those logits (B, V), lazily, and the batch caches,
    ready for `RunningBatch.join_batch`. On a CPU the weights are read once per pass, not once
    per prompt, which is where short prompts spend their time.
    """
    heads = [list(p[:-1]) for p in prompts]
    longest = max(len(h) for h in heads)
    padding = [longest - len(h) for h in heads]
    rows = [[0] * pad + h for pad, h in zip(padding, heads, strict=True)]
    cache = [mlx_cache.BatchKVCache(padding) for _ in range(n_layers)]
    model(mx.array(rows, dtype=mx.uint32), cache=cache)
    mx.eval([_arrays(c) for c in cache])
    last = mx.array([[p[-1]] for p in prompts], dtype=mx.uint32)
    return model(last, cache=cache)[:, -1, :], cache
