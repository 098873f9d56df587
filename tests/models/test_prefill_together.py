"""Prompts after restored prefixes prefill together: the same logits, KV and greedy tokens as
each prefilled on its own after its prefix."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvgrove.models.batching import RunningBatch, prefill_together
from kvgrove.models.caches import cache_tokens, make_cache
from kvgrove.models.generate import forward, prefill_chunks
from kvgrove.models.loading import load
from kvgrove.models.runner import prefill_groups
from tiny_models import ShapeLogging, write_tiny_model

# (cached prefix, new tokens): a suffix of 1 token; a prefix longer than other rows' whole
# prompts; a fresh prompt (no prefix) and a fresh 1-token one; the longest suffix (the block).
ROWS = [(30, 1), (5, 12), (0, 7), (44, 3), (2, 20), (0, 1), (17, 2)]


def prompt(row: int, n: int) -> list[int]:
    return [(7 * row + 3 * i) % 300 + 5 for i in range(n)]


def restored(model, tokens: list[int]) -> list:
    """A cache holding `tokens`, as the pager restores one: computed, then copied out."""
    computed, cache = make_cache(model), make_cache(model)
    for _ in prefill_chunks(model, computed, tokens):
        pass
    for c, src in zip(cache, computed, strict=True):
        if tokens:
            c.restore([src.snapshot(0, len(tokens))], len(tokens))
    return cache


def alone(model, cache: list, suffix: list[int]) -> mx.array:
    """The one-by-one path: feed all but the last token, then the last one's logits."""
    if len(suffix) > 1:
        for _ in prefill_chunks(model, cache, suffix[:-1]):
            pass
    return forward(model, cache, mx.array(suffix[-1:], dtype=mx.uint32)[None])[0]


def logprobs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "glm4_moe_lite"])
def test_restored_prefixes_prefill_together_as_alone(tmp_path, arch):
    model = load(str(write_tiny_model(tmp_path / arch, arch))).model
    prompts = [prompt(r, c + s) for r, (c, s) in enumerate(ROWS)]
    prefixes = [p[:c] for p, (c, _) in zip(prompts, ROWS, strict=True)]
    suffixes = [p[c:] for p, (c, _) in zip(prompts, ROWS, strict=True)]
    caches = [restored(model, p) if p else None for p in prefixes]
    before = [[mx.array(c.keys) for c in cache] if cache else None for cache in caches]

    logits, batch_cache = prefill_together(model, suffixes, len(model.layers), caches)
    solo_caches = [restored(model, p) for p in prefixes]
    solo = [alone(model, c, s) for c, s in zip(solo_caches, suffixes, strict=True)]
    for row, want in enumerate(solo):
        got = logprobs(logits[row])
        assert mx.allclose(got, logprobs(want), atol=1e-4).item(), (row, ROWS[row])
    assert mx.argmax(logits, axis=-1).tolist() == [int(mx.argmax(s).item()) for s in solo]
    # The restored caches are only read.
    for cache, keys in zip(caches, before, strict=True):
        for c, k in zip(cache or [], keys or [], strict=True):
            assert mx.array_equal(c.keys, k).item()

    # The rows decode on in the running batch as they would alone.
    batch = RunningBatch()
    ids = list(range(len(ROWS)))
    batch.join_batch(ids, [len(p) for p in prompts], batch_cache)
    rows = batch.row_caches(ids)
    for row, (c, s) in enumerate(ROWS):
        assert cache_tokens(rows[row]) == c + s
        for layer, (mine, theirs) in enumerate(zip(rows[row], solo_caches[row], strict=True)):
            n = c + s
            assert mx.allclose(mine.keys[..., :n, :], theirs.keys[..., :n, :], atol=1e-5).item()
            if c:  # where a row's block reached back into its prefix, the restored KV stands
                prefix = caches[row][layer].keys[..., :c, :]
                assert mx.array_equal(mine.keys[..., :c, :], prefix).item()
    tokens = mx.argmax(logits, axis=-1).tolist()
    nexts = [[t] for t in tokens]
    for _ in range(6):
        step = mx.argmax(batch.forward(model, [n[-1] for n in nexts]), axis=-1).tolist()
        for n, t in zip(nexts, step, strict=True):
            n.append(t)
    for row, cache in enumerate(solo_caches):
        want = [int(mx.argmax(solo[row]).item())]
        for _ in range(6):
            step = forward(model, cache, mx.array([[want[-1]]], dtype=mx.uint32))
            want.append(int(mx.argmax(step, axis=-1).item()))
        assert nexts[row] == want, (row, ROWS[row])


def test_restored_prefixes_with_one_token_each_skip_the_block(tmp_path):
    """Every row's new tokens are one (the prefix cache held all but the last): no (B, S) pass,
    only the (B, 1) step after the restored prefixes."""
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    shapes = []

    prompts = [prompt(r, n) for r, n in enumerate((9, 31, 4))]
    caches = [restored(model, p[:-1]) for p in prompts]
    logits, _ = prefill_together(
        ShapeLogging(model, shapes), [p[-1:] for p in prompts], len(model.layers), caches
    )
    assert shapes == [(3, 1)]
    for row, p in enumerate(prompts):
        want = alone(model, restored(model, p[:-1]), p[-1:])
        assert mx.allclose(logprobs(logits[row]), logprobs(want), atol=1e-4).item()


def test_groups_bound_the_padding_of_new_tokens_and_of_context():
    # Six prompts after one shared 1,700-token prefix, and six short fresh ones: two groups
    # (one pass each), not one whose fresh rows would be padded to 1,700 positions.
    rows = [(1700, 20 + i) for i in range(6)] + [(0, 30 + i) for i in range(6)]
    groups = prefill_groups(rows, 4096)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    mixed = [*rows, (40, 2000), (3, 1)]
    for limit in (64, 300, 4096):
        for group in prefill_groups(mixed, limit):
            ends = [sum(mixed[r]) for r in group]
            assert len(group) >= 2
            assert len(group) * max(mixed[r][1] for r in group) <= limit
            assert len(group) * max(ends) - sum(ends) <= limit
    assert prefill_groups([(0, 5)], 4096) == []  # one prompt prefills on its own
