"""The running batch: greedy tokens are the same alone or batched, through joins and leaves."""

from __future__ import annotations

import mlx.core as mx
import pytest

from kvgrove.models.batching import RunningBatch, prefill_together, unbatchable_reason
from kvgrove.models.caches import RecurrentCache, SpanKVCache, cache_tokens, make_cache
from kvgrove.models.generate import forward, generate, prefill_chunks
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model

GREEDY = SamplingParams(temperature=0)


def prefill(model, prompt):
    """A per-sequence cache holding `prompt`, and the greedy token after it (as generate does)."""
    cache = make_cache(model)
    for _ in prefill_chunks(model, cache, prompt[:-1]):
        pass
    logits = forward(model, cache, mx.array(prompt[-1:], dtype=mx.uint32)[None])
    return cache, int(mx.argmax(logits, axis=-1).item())


def batched_greedy(model, prompts, n):
    """Row 0 and 1 start together, row 2 joins at step 3, row 0 leaves at step 6 and finishes
    on its own extracted cache; returns each row's first n tokens."""
    out = {i: [] for i in range(len(prompts))}
    batch = RunningBatch()
    rows = []
    for i in (0, 1):
        cache, token = prefill(model, prompts[i])
        out[i].append(token)
        rows.append((i, cache))
    batch.join(rows)
    alone = None
    while any(len(out[i]) < n for i in batch.ids) or len(batch) < 2:
        step = len(out[1])
        if step == 3:
            cache, token = prefill(model, prompts[2])
            out[2].append(token)
            batch.join([(2, cache)])
        if step == 6:
            (alone,) = batch.leave([0]).values()
            assert all(isinstance(c, SpanKVCache | RecurrentCache) for c in alone)
            assert cache_tokens(alone) == len(prompts[0]) + len(out[0]) - 1
        logits = batch.forward(model, [out[r][-1] for r in batch.ids])
        for r, t in zip(batch.ids, mx.argmax(logits, axis=-1).tolist(), strict=True):
            out[r].append(t)
    while len(out[0]) < n:
        logits = forward(model, alone, mx.array([[out[0][-1]]], dtype=mx.uint32))
        out[0].append(int(mx.argmax(logits, axis=-1).item()))
    return [out[i][:n] for i in range(len(prompts))]


def check_same_alone_and_batched(model, prompts, n):
    solo = [[s.token for s in generate(model, p, GREEDY, max_tokens=n)] for p in prompts]
    assert unbatchable_reason(make_cache(model)) is None
    assert batched_greedy(model, prompts, n) == solo


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen3_next", "glm4_moe_lite"])
def test_tiny_models_greedy_same_alone_or_batched(tmp_path, arch):
    model = load(str(write_tiny_model(tmp_path / arch, arch))).model
    prompts = [list(range(5, 12)), list(range(40, 59)), [7, 8, 9]]
    check_same_alone_and_batched(model, prompts, 14)


def test_default_model_greedy_same_alone_or_batched(default_model):
    tok = default_model.tokenizer
    prompts = [
        tok.encode("The capital of France is"),
        tok.encode("Write a short poem about the sea, the wind and the long grey evenings."),
        tok.encode("1, 2, 3, 4,"),
    ]
    assert len({len(p) for p in prompts}) == 3
    check_same_alone_and_batched(default_model.model, prompts, 12)


def test_leave_everyone_then_join_again(tmp_path):
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    batch = RunningBatch()
    cache, token = prefill(model, [3, 4, 5])
    batch.join([(1, cache)])
    batch.forward(model, [token])
    (back,) = batch.leave([1]).values()
    assert len(batch) == 0 and batch.cache is None and batch.nbytes == 0
    assert cache_tokens(back) == 4
    batch.join([(1, back)])
    assert batch.tokens == [4] and len(batch) == 1


def test_joins_and_leaves_in_any_order_keep_each_rows_tokens(tmp_path):
    """Rows join mid-decode (longer than the batch: it shifts; past capacity: it grows), rows
    prefilled together join, rows leave from the middle (the last ones move into the holes):
    every row's greedy tokens are the ones it produces alone."""
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((5, 9, 30, 4, 12, 7, 16, 6))]
    n = 10
    solo = [[s.token for s in generate(model, p, GREEDY, max_tokens=n)] for p in prompts]
    out: dict[int, list[int]] = {}
    batch = RunningBatch()

    def join(*rows):
        caches = []
        for r in rows:
            cache, token = prefill(model, prompts[r])
            out[r] = [token]
            caches.append((r, cache))
        batch.join(caches)

    def join_together(*rows):
        logits, cache = prefill_together(model, [prompts[r] for r in rows], len(model.layers))
        for r, t in zip(rows, mx.argmax(logits, axis=-1).tolist(), strict=True):
            out[r] = [t]
        batch.join_batch(rows, [len(prompts[r]) for r in rows], cache)

    plan = {
        0: lambda: join(0, 1),
        2: lambda: join(2),  # longer than the batch's length: the batch shifts right
        3: lambda: join(3, 4),  # past capacity: the buffers double
        4: lambda: batch.leave([1]),  # from the middle: the last row takes its place
        5: lambda: join_together(5, 6),
        7: lambda: batch.leave([0, 5]),
        8: lambda: join(7),
    }
    finished = {}
    step = 0
    while batch.ids or step in plan or step < max(plan):
        if step in plan:
            left = plan[step]()
            for r, cache in (left or {}).items():
                finished[r] = cache
        for layer in batch.cache or []:
            assert layer.rows == len(batch) <= layer.capacity
        for r in [r for r in batch.ids if len(out[r]) >= n]:
            batch.leave([r])
        if batch.ids:
            logits = batch.forward(model, [out[r][-1] for r in batch.ids])
            for r, t in zip(batch.ids, mx.argmax(logits, axis=-1).tolist(), strict=True):
                out[r].append(t)
        step += 1
    for r, cache in finished.items():  # rows that left early finish on their own caches
        assert cache_tokens(cache) == len(prompts[r]) + len(out[r]) - 1
        while len(out[r]) < n:
            logits = forward(model, cache, mx.array([[out[r][-1]]], dtype=mx.uint32))
            out[r].append(int(mx.argmax(logits, axis=-1).item()))
    assert [out[r][:n] for r in range(len(prompts))] == solo
    assert batch.cache is None and batch.nbytes == 0


def test_capacity_grows_geometrically_and_shrinks_when_rows_leave(tmp_path):
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    batch = RunningBatch()
    capacities = []
    for r in range(12):
        cache, _ = prefill(model, [5 + r, 6, 7])
        batch.join([(r, cache)])
        capacities.append(batch.cache[0].capacity)
    assert capacities == [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16]
    batch.leave(range(9))
    assert batch.cache[0].rows == 3 and batch.cache[0].capacity == 8
    assert sorted(batch.ids) == [9, 10, 11]
