"""Restoring spans into a live cache: greedy tokens unchanged, and room to grow without a copy."""

from __future__ import annotations

import mlx.core as mx

from kvgrove.models.caches import SpanKVCache, make_cache
from kvgrove.models.generate import forward, prefill_chunks
from kvgrove.models.loading import load
from tiny_models import write_tiny_model


def greedy(model, cache, token, n):
    out = []
    for _ in range(n):
        logits = forward(model, cache, mx.array([[token]], dtype=mx.uint32))
        token = int(mx.argmax(logits, axis=-1).item())
        out.append(token)
    return out


def test_restored_spans_decode_like_the_original_and_grow_in_place(tmp_path):
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    prompt = [(7 * i) % 50 + 3 for i in range(300)]  # past one 256-token step
    cache = make_cache(model)
    for _ in prefill_chunks(model, cache, prompt[:-1], chunk_tokens=97):
        pass
    spans = [[c.snapshot(a, b) for a, b in ((0, 100), (100, 256), (256, 299))] for c in cache]
    want = greedy(model, cache, prompt[-1], 12)

    restored = make_cache(model)
    for layer, layer_spans in zip(restored, spans, strict=True):
        assert isinstance(layer, SpanKVCache)
        layer.restore(layer_spans, 299)
        assert layer.offset == 299 and layer.keys.shape[2] > 299
    buffers = [layer.keys for layer in restored]
    # The next chunk (a later turn's new tokens) fits in the room: written in place, no copy.
    for _ in prefill_chunks(model, restored, prompt[-1:], chunk_tokens=1):
        pass
    assert all(layer.keys is buf for layer, buf in zip(restored, buffers, strict=True))
    assert greedy(model, restored, want[0], 11) == want[1:]
    # The stored snapshots were not written through.
    for layer_spans, layer in zip(spans, cache, strict=True):
        assert mx.array_equal(layer_spans[2][0], layer.keys[..., 256:299, :]).item()
