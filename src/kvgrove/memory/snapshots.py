"""Per-layer snapshots of kvgrove's live caches: the payload of one trie node.

A payload covers the tokens [start, end) of one node and holds, per layer:
- a span for sliceable layers (plain attention KV, MLA latents): keys and values for exactly those
  tokens, cut along the token axis (-2);
- the whole state for non-sliceable layers (recurrent / SSM state, sliding windows), present only
  when the snapshot was taken with the live cache standing exactly at `end` (`whole`).

Arrays are keyed "<layer>.<index>" (a flat dict: what safetensors stores). On the device tier they
are evaluated, contiguous MLX arrays never shared with a live cache; on the host tier numpy arrays,
with bfloat16 kept as its raw uint16 bits (numpy has no bfloat16) and the MLX dtype recorded in
`dtypes`. Restoring a path stitches the spans of its nodes into one live cache and takes the whole
state of the last node. All of this runs on the MLX thread; nothing here blocks on I/O.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import mlx.core as mx
import numpy as np

from kvgrove import faults

SPAN = "span"
WHOLE = "whole"
TOKEN_AXIS = -2


Snapshot = tuple[mx.array, ...]


@runtime_checkable
class LiveCache(Protocol):
    """A layer's live cache the prefix cache can snapshot and restore (kvgrove.models.caches).

    `sliceable`: any token span can be cut out (`snapshot(start, end)` gives keys and values
    for it) and stitched back; otherwise the whole state is snapshotted, at its end only.
    `restore(pieces, tokens)` replaces the contents: the spans in token order (sliceable), or
    one whole state (or none, for empty), so that the layer holds `tokens` tokens.
    `tokens_seen` is the one count of tokens the layer holds."""

    sliceable: ClassVar[bool]

    @property
    def tokens_seen(self) -> int: ...

    def snapshot(self, start: int, end: int) -> Snapshot: ...

    def restore(self, pieces: Sequence[Snapshot], tokens: int) -> None: ...


class NotSnapshotCapable(Exception):
    """The model uses a cache kind the prefix cache cannot snapshot."""


def layout(cache: Sequence[Any]) -> tuple[str, ...]:
    """Per layer: SPAN (cut by tokens) or WHOLE (whole state at span ends only). Where the
    layout is decided: every layer must be a `LiveCache`."""
    kinds = []
    for i, c in enumerate(cache):
        if not isinstance(c, LiveCache):
            raise NotSnapshotCapable(f"layer {i}: {type(c).__name__} cannot be snapshotted")
        kinds.append(SPAN if c.sliceable else WHOLE)
    return tuple(kinds)


def held_tokens(cache: Sequence[LiveCache]) -> int:
    """How many tokens a snapshot-capable live cache holds (every layer holds as many)."""
    return cache[0].tokens_seen if cache else 0


@attrs.define(eq=False)
class Payload:
    """One node's snapshot. `arrays` is empty while the payload lives on disk (`key` names it)."""

    tokens: int
    kinds: tuple[str, ...]
    arrays: dict[str, Any]
    dtypes: dict[str, str]  # key -> MLX dtype name ("bfloat16", "float32", ...)
    shapes: dict[str, tuple[int, ...]]
    whole: bool
    tier: str = "device"
    key: str | None = None  # the disk file's key, on the disk tier
    checksum: int | None = None

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(self.shapes[k], self.dtypes[k]) for k in self.shapes)

    @property
    def has_whole_layers(self) -> bool:
        return WHOLE in self.kinds

    def restorable(self, k: int) -> bool:
        """Can every layer be restored just after this payload's first k tokens?"""
        return not self.has_whole_layers or (k == self.tokens and self.whole)


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def is_dtype_name(name: object) -> bool:
    """Whether `name` (read from a file) names an MLX dtype."""
    return isinstance(name, str) and isinstance(getattr(mx, name, None), mx.Dtype)


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    # math.prod, not numpy's: a payload has two arrays per layer and the trie reads their sizes
    # on every insert (numpy's reduction was ~9 µs an array, a sixth of storing a sequence).
    return math.prod(shape) * getattr(mx, dtype).size


def _device_payload(
    tokens: int, kinds: tuple[str, ...], arrays: dict[str, mx.array], whole: bool
) -> Payload:
    dtypes = {k: _dtype_name(a.dtype) for k, a in arrays.items()}
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    return Payload(tokens, kinds, arrays, dtypes, shapes, whole, "device")


# While `deferred()` is open (on the MLX thread): the arrays of each snapshot `take` made (and of
# each device payload `split` or `join` made), still lazy, for the caller to evaluate together.
_deferred: list[list[mx.array]] | None = None


@contextlib.contextmanager
def deferred() -> Iterator[list[list[mx.array]]]:
    """Snapshots taken inside stay lazy; their arrays are listed in what this yields, for the
    caller to evaluate before the live caches they were cut from are written again (one wait
    on the device for a whole store, not one per sequence: on a GPU each wait also gives up
    the GIL, to be waited for again). So do the device payloads cut or joined inside: a store
    whose prompt shares the start of a cached one splits that node (a wave of prompts that
    share a few tokens split one node per prompt, each a wait of its own before)."""
    global _deferred
    outer, _deferred = _deferred, []
    try:
        yield _deferred
    finally:
        _deferred = outer


def take(
    cache: Sequence[Any], start: int, end: int, kinds: tuple[str, ...] | None = None
) -> Payload:
    """Snapshot tokens [start, end) of a live (batch 1) cache: spans of sliceable layers, plus the
    whole state of the others iff the cache stands exactly at `end`."""
    kinds = kinds if kinds is not None else layout(cache)
    faults.check("snapshot.take")
    live = held_tokens(cache)
    if not 0 <= start <= end <= live:
        raise ValueError(f"span [{start}, {end}) outside the cache's {live} tokens")
    whole = WHOLE in kinds and end == live and end > 0
    arrays: dict[str, Any] = {}
    for i, (c, kind) in enumerate(zip(cache, kinds, strict=True)):
        if kind == SPAN and end > start:
            keys, values = c.snapshot(start, end)
            arrays[f"{i}.0"], arrays[f"{i}.1"] = keys, values
        elif kind == WHOLE and whole:
            for j, a in enumerate(c.snapshot(start, end)):
                arrays[f"{i}.{j}"] = a
    _evaluate(list(arrays.values()))  # one wait for all layers (their snapshots come lazy)
    return _device_payload(end - start, kinds, arrays, whole)


def _evaluate(arrays: list[mx.array]) -> None:
    """Evaluate device arrays now, or with the rest of a `deferred()` block's."""
    if _deferred is not None:
        _deferred.append(arrays)
    else:
        mx.eval(arrays)


def stitch(cache: Sequence[Any], pieces: Sequence[Payload], tokens: int) -> float:
    """Rebuild a fresh live cache from the device payloads of a path, holding its first `tokens`
    tokens (the last piece may be used in part only if every layer is sliceable). Returns the
    seconds the stitch took."""
    t0 = time.perf_counter()
    if tokens == 0:
        return 0.0
    if any(p.tier != "device" for p in pieces):
        raise ValueError("stitch needs every piece on the device tier (promote first)")
    total = sum(p.tokens for p in pieces)
    last = pieces[-1]
    if not (total - last.tokens < tokens <= total):
        raise ValueError(f"{tokens} tokens do not end in the last of pieces covering {total}")
    if not last.restorable(tokens - (total - last.tokens)):
        raise ValueError(f"the path cannot be restored at {tokens} tokens")
    for i, (c, kind) in enumerate(zip(cache, last.kinds, strict=True)):
        if kind == SPAN:
            spans, left = [], tokens
            for p in pieces:
                n = min(p.tokens, left)
                left -= n
                if n == 0:
                    continue
                keys, values = p.arrays[f"{i}.0"], p.arrays[f"{i}.1"]
                if n < p.tokens:
                    keys, values = keys[..., :n, :], values[..., :n, :]
                spans.append((keys, values))
            c.restore(spans, tokens)
        else:
            state = tuple(last.arrays[f"{i}.{j}"] for j in range(_count(last, i)))
            c.restore([state], tokens)
    return time.perf_counter() - t0


def _count(p: Payload, layer: int) -> int:
    prefix = f"{layer}."
    return sum(1 for k in p.arrays if k.startswith(prefix))


# -- split and join (device or host tier) ---------------------------------------------------


def _layer(key: str) -> int:
    return int(key.split(".", 1)[0])


def split(p: Payload, k: int) -> tuple[Payload, Payload]:
    """(first k tokens, the rest). Whole state stays with the rest; copies, never views."""
    if not 0 < k < p.tokens:
        raise ValueError(f"cannot split {p.tokens} tokens at {k}")
    left: dict[str, Any] = {}
    right: dict[str, Any] = {}
    for key, a in p.arrays.items():
        if p.kinds[_layer(key)] == SPAN:
            left[key], right[key] = _cut(a, 0, k, p.tier), _cut(a, k, p.tokens, p.tier)
        else:
            right[key] = a
    if p.tier == "device":  # inside a store's deferred(), with its snapshots: one wait
        _evaluate([*left.values(), *right.values()])
    return _like(p, k, left, False), _like(p, p.tokens - k, right, p.whole)


def join(a: Payload, b: Payload) -> Payload:
    """One payload for a's tokens then b's (same tier); whole state from b."""
    if a.tier != b.tier:
        raise ValueError(f"join needs one tier, got {a.tier} and {b.tier}")
    arrays: dict[str, Any] = {}
    for key in a.arrays.keys() | b.arrays.keys():
        if a.kinds[_layer(key)] == SPAN:
            parts = [x.arrays[key] for x in (a, b) if key in x.arrays]
            arrays[key] = parts[0] if len(parts) == 1 else _concat(parts, a.tier)
        elif key in b.arrays:
            arrays[key] = b.arrays[key]
    if a.tier == "device":
        _evaluate(list(arrays.values()))
    return _like(a, a.tokens + b.tokens, arrays, b.whole, dtypes={**a.dtypes, **b.dtypes})


def _cut(a: Any, start: int, end: int, tier: str) -> Any:
    if tier == "device":
        return mx.contiguous(a[..., start:end, :])
    return np.ascontiguousarray(a[..., start:end, :])


def _concat(parts: list[Any], tier: str) -> Any:
    if tier == "device":
        return mx.concatenate(parts, axis=TOKEN_AXIS)
    return np.concatenate(parts, axis=TOKEN_AXIS)


def _like(
    p: Payload, tokens: int, arrays: dict[str, Any], whole: bool, dtypes: dict | None = None
) -> Payload:
    dtypes = dtypes if dtypes is not None else p.dtypes
    return Payload(
        tokens,
        p.kinds,
        arrays,
        {k: dtypes[k] for k in arrays},
        {k: tuple(a.shape) for k, a in arrays.items()},
        whole,
        p.tier,
    )


# -- device <-> host --------------------------------------------------------------------------


def to_host(p: Payload) -> Payload:
    """Copy a device payload into numpy buffers (bfloat16 as raw uint16 bits)."""
    if p.tier != "device":
        raise ValueError(f"to_host needs a device payload, got {p.tier}")
    arrays = {}
    for key, a in p.arrays.items():
        if a.dtype == mx.bfloat16:
            a = a.view(mx.uint16)
        arrays[key] = np.array(a, copy=True)
    return attrs.evolve(p, arrays=arrays, tier="host")


def to_device(p: Payload) -> Payload:
    """Copy a host payload back into MLX arrays of their recorded dtypes."""
    if p.tier != "host":
        raise ValueError(f"to_device needs a host payload, got {p.tier}")
    arrays = {key: host_to_mx(a, p.dtypes[key]) for key, a in p.arrays.items()}
    mx.eval(list(arrays.values()))
    return attrs.evolve(p, arrays=arrays, tier="device")


def host_to_mx(a: np.ndarray, dtype: str) -> mx.array:
    out = mx.array(a)
    if dtype == "bfloat16":
        out = out.view(mx.bfloat16)
    if _dtype_name(out.dtype) != dtype:
        raise ValueError(f"stored {out.dtype} where {dtype} was recorded")
    return out
