"""kvgrove's live caches: mlx-lm's cache protocol, plus snapshots for the prefix trie.

mlx-lm's models call `update_and_fetch`, `offset`, `make_mask`, `state`, ... on whatever cache
objects they are handed. kvgrove hands them these subclasses, which add what the prefix cache
needs, the `kvgrove.memory.snapshots.LiveCache` protocol: whether a layer's state can be cut into
token spans (`sliceable`), a copy of a span or of the whole state (`snapshot`), rebuilding a live
cache from stored pieces (`restore(pieces, tokens)`, one signature), and the tokens it holds
(`tokens_seen`, the one counter).

Snapshots are contiguous, evaluated copies: never views (a view keeps its parent buffer alive) and
never the live buffers (KVCache writes in place, so a stored buffer would be corrupted by decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import cache as mlx_cache

from kvgrove.memory.snapshots import Snapshot


def _copy(arrays: Sequence[mx.array]) -> Snapshot:
    """Fresh contiguous copies, still lazy: whoever takes a snapshot evaluates it, once for all
    its layers (`snapshots.take`). An eval per layer waited on the device each time: storing
    64 finished sequences of a 32-layer model took 2,048 waits, ~0.2 s on the H200."""
    return tuple(mx.contiguous(a) if a.size else mx.array(a) for a in arrays)


class SpanKVCache(mlx_cache.KVCache):
    """Plain attention KV (and MLA latents): any token span can be cut out and stitched back."""

    sliceable = True

    @property
    def tokens_seen(self) -> int:
        return int(self.offset)

    def snapshot(self, start: int, end: int) -> Snapshot:
        """Keys and values for tokens [start, end), as fresh contiguous arrays."""
        if not 0 <= start <= end <= self.offset:
            raise ValueError(f"span [{start}, {end}) outside the cache's {self.offset} tokens")
        return _copy((self.keys[..., start:end, :], self.values[..., start:end, :]))

    def restore(self, spans: Sequence[Snapshot], tokens: int) -> None:
        """Replace the contents with the concatenation of `spans` (in token order), `tokens`."""
        if sum(s[0].shape[2] for s in spans) != tokens:
            raise ValueError(f"spans of {sum(s[0].shape[2] for s in spans)} tokens, not {tokens}")
        if not spans:
            self.keys = self.values = None
            self.offset = 0
            return
        # Into fresh buffers (the cache writes in place, which must never touch a stored
        # snapshot) with room to grow to the next `step` boundary, so the next prefill chunk or
        # decode step writes in place instead of concatenating a copy of the whole prefix.
        n = sum(s[0].shape[2] for s in spans)
        room = (n // self.step + 1) * self.step
        k0, v0 = spans[0]
        pad_k = mx.zeros((*k0.shape[:2], room - n, k0.shape[3]), k0.dtype)
        pad_v = mx.zeros((*v0.shape[:2], room - n, v0.shape[3]), v0.dtype)
        # One concatenation: a single pass that writes a fresh array.
        keys = mx.concatenate([*(s[0] for s in spans), pad_k], axis=2)
        values = mx.concatenate([*(s[1] for s in spans), pad_v], axis=2)
        mx.eval(keys, values)
        self.keys, self.values, self.offset = keys, values, n


class _WholeState:
    """Mixin for layers whose state cannot be cut by tokens: snapshot it whole, at span ends."""

    sliceable = False

    def snapshot(self, start: int, end: int) -> Snapshot:
        if end != self.tokens_seen:
            raise ValueError(
                f"{type(self).__name__} can only be snapshotted at its end ({self.tokens_seen}), "
                f"not at {end}"
            )
        return _copy([a for a in self._state_arrays() if a is not None])

    @property
    def tokens_seen(self) -> int:
        return self._tokens_seen


class RecurrentCache(_WholeState, mlx_cache.ArraysCache):
    """Recurrent / SSM state (qwen3_next's gated delta, Mamba convolutions): whole state only."""

    def __init__(self, size: int, left_padding: list[int] | None = None):
        super().__init__(size, left_padding)
        self._tokens_seen = 0

    def _state_arrays(self) -> list[mx.array]:
        return list(self.cache)

    def restore(self, pieces: Sequence[Snapshot], tokens: int) -> None:
        """The whole state (`pieces` holds one), standing after `tokens` tokens."""
        (state,) = pieces
        self.cache = [mx.array(a) for a in state]
        self._tokens_seen = tokens

    def note_tokens(self, n: int) -> None:
        self._tokens_seen += n


class WindowKVCache(_WholeState, mlx_cache.RotatingKVCache):
    """Sliding-window attention: the ring buffer is restored whole, at span ends.

    Once the ring has wrapped, the buffer's slots are out of temporal order (`_idx` is where the
    next token goes, not how many are held). A snapshot is the held tokens in temporal order —
    what mlx-lm's own `_temporal_order` gives before a multi-token update — and a restore puts
    that buffer back with `_idx` at its end and the sequence's offset, which is exactly the
    state mlx-lm's next update (in place or concatenating) expects: it trims to the window, and
    its masks depend only on `offset` and the buffer's length.
    """

    @property
    def tokens_seen(self) -> int:
        return int(self.offset)

    def _state_arrays(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self._temporal_order(self.keys), self._temporal_order(self.values)]

    def restore(self, pieces: Sequence[Snapshot], tokens: int) -> None:
        """The held tokens in temporal order (`pieces` holds one, or none: empty)."""
        tokens_seen = tokens
        state = pieces[0] if pieces else ()
        if not state:
            self.keys = self.values = None
            self.offset = self._idx = 0
            return
        keys, values = (mx.array(a) for a in state)
        if keys.shape[2] > tokens_seen or keys.shape[2] < min(tokens_seen, self.max_size):
            raise ValueError(
                f"a window of {keys.shape[2]} tokens cannot stand at {tokens_seen} "
                f"(window {self.max_size})"
            )
        self.keys, self.values = keys, values
        self.offset = tokens_seen
        self._idx = keys.shape[2]


def _ours(cache: Any) -> Any:
    """kvgrove's cache in place of a freshly made, empty mlx-lm one (same kind, more methods)."""
    if isinstance(cache, mlx_cache.CacheList):
        cache.caches = tuple(_ours(c) for c in cache.caches)
        return cache
    kind = type(cache)
    if kind is mlx_cache.KVCache:
        return SpanKVCache()
    if kind is mlx_cache.ArraysCache:
        return RecurrentCache(len(cache.cache))
    if kind is mlx_cache.RotatingKVCache:
        return WindowKVCache(cache.max_size, cache.keep)
    return cache  # an exotic cache kind: usable for generation, not snapshotted


def make_cache(model: nn.Module) -> list[Any]:
    """One live cache per layer, as the model wants them (mlx-lm's choice), in kvgrove's classes."""
    return [_ours(c) for c in mlx_cache.make_prompt_cache(model)]


def note_tokens(cache: Sequence[Any], n: int) -> None:
    """Tell whole-state caches that n more tokens went through (they keep no offset)."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.note_tokens(n)


def cache_tokens(cache: Sequence[Any]) -> int:
    """How many tokens the cache holds (the first layer that knows)."""
    for c in cache:
        if isinstance(c, SpanKVCache | RecurrentCache | WindowKVCache):
            return c.tokens_seen
        if isinstance(c, mlx_cache.KVCache | mlx_cache.RotatingKVCache):
            return int(c.offset)
    return 0


def cache_nbytes(cache: Sequence[Any]) -> int:
    return sum(int(getattr(c, "nbytes", 0)) for c in cache)


def token_nbytes(cache: Sequence[Any]) -> int:
    """Bytes one more cached token of one row takes in these layers (one sequence's, or a
    batch's): the keys and values of one position, not the buffers' spare rows and positions.
    Layers with no per-position buffers (recurrent state: fixed per row) add nothing; 0 when
    nothing is allocated yet."""
    total = 0
    for c in cache:
        keys, values = getattr(c, "keys", None), getattr(c, "values", None)
        if getattr(keys, "ndim", 0) == 4 and getattr(values, "ndim", 0) == 4:
            slots = keys.shape[0] * keys.shape[2]  # rows x positions
            if slots:
                total += (int(keys.nbytes) + int(values.nbytes)) // slots
    return total
