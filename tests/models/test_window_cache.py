"""Sliding-window layers (mlx-lm's RotatingKVCache) snapshot and restore after the ring wrapped.

A snapshot taken at token n and restored into a fresh cache must continue exactly like the cache
it came from: same logits for a multi-token chunk (the concatenating update and its windowed
mask) and for single-token decode steps (the in-place ring update).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvgrove.memory import snapshots
from kvgrove.models.caches import WindowKVCache, make_cache
from kvgrove.models.generate import forward, prefill_chunks
from kvgrove.models.loading import load
from tiny_models import write_tiny_model


@pytest.fixture(scope="module", params=["window", "gemma3"])
def model(request, tmp_path_factory):
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny") / request.param, request.param)
    return load(str(folder)).model


def _continue(model, cache, chunk, decode):
    """Logits after a chunk, then after each decode token."""
    out = [forward(model, cache, mx.array([chunk], dtype=mx.uint32))]
    for t in decode:
        out.append(forward(model, cache, mx.array([[t]], dtype=mx.uint32)))
    mx.eval(out)
    return out


@pytest.mark.parametrize("decoded", [0, 5, 23])  # snapshot after prefill, or after decoding
@pytest.mark.parametrize("prompt", [10, 37, 64])  # inside the window, wrapped, wrapped a lot
def test_window_snapshot_restores_after_wrap(model, prompt, decoded):
    cache = make_cache(model)
    assert any(isinstance(c, WindowKVCache) for c in cache)
    tokens = [(7 * i) % 300 + 10 for i in range(prompt)]
    for _ in prefill_chunks(model, cache, tokens, chunk_tokens=16):
        pass
    for i in range(decoded):  # in-place updates: the ring wraps in the middle of its buffer
        forward(model, cache, mx.array([[(3 * i) % 300 + 5]], dtype=mx.uint32))
    n = prompt + decoded
    payload = snapshots.take(cache, 0, n)
    restored = make_cache(model)
    snapshots.restore(restored, [payload], n)
    chunk, decode = [11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
    expected = _continue(model, cache, chunk, decode)
    got = _continue(model, restored, chunk, decode)
    for e, g in zip(expected, got, strict=True):
        assert mx.array_equal(e, g), float(mx.max(mx.abs(e - g)))


def test_window_restore_refuses_a_window_that_cannot_stand_there(model):
    cache = make_cache(model)
    window = next(c for c in cache if isinstance(c, WindowKVCache))
    keys = mx.zeros((1, 2, 5, 16))
    with pytest.raises(ValueError, match="cannot stand"):
        window.restore([(keys, keys)], 40)
