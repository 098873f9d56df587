"""`forward` over a chunk: the last position's logits, the same as the whole model's, whichever
way the head is reached (on the last position only where the model's head just follows its
body; through the model's own call otherwise)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvgrove.models.caches import cache_tokens, make_cache
from kvgrove.models.generate import _PLAIN_HEAD, forward, prefill_chunks
from kvgrove.models.loading import load
from tiny_models import write_tiny_model


@pytest.mark.parametrize(
    ("arch", "last_only"),
    [("llama", True), ("qwen3", True), ("gemma3", False), ("qwen3_next", False)],
)
def test_a_chunk_after_a_prefix_gives_the_whole_models_last_logits(tmp_path, arch, last_only):
    model = load(str(write_tiny_model(tmp_path / arch, arch))).model
    assert (type(model).__module__ in _PLAIN_HEAD) is last_only
    prefix = [(5 * i) % 50 + 3 for i in range(40)]
    chunk = [(11 * i) % 50 + 3 for i in range(20)]

    def cache_after_prefix():
        cache = make_cache(model)
        for _ in prefill_chunks(model, cache, prefix, chunk_tokens=40):
            pass
        return cache

    ours_cache, full_cache = cache_after_prefix(), cache_after_prefix()
    ours = forward(model, ours_cache, mx.array(chunk, dtype=mx.uint32)[None])
    full = model(mx.array(chunk, dtype=mx.uint32)[None], cache=full_cache)[:, -1, :]
    assert ours.shape == full.shape == (1, model.args.vocab_size)
    assert mx.allclose(ours, full, atol=1e-5).item()
    assert mx.argmax(ours).item() == mx.argmax(full).item()
    assert cache_tokens(ours_cache) == 60
    # The caches hold the same keys afterwards: the next step decodes alike.
    nxt = mx.array([[int(mx.argmax(ours).item())]], dtype=mx.uint32)
    assert mx.allclose(
        forward(model, ours_cache, nxt), forward(model, full_cache, nxt), atol=1e-5
    ).item()
