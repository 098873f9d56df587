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
    last = {}
    for r in range(34):
        cache, last[r] = prefill(model, [5 + r, 6, 7])
        batch.join([(r, cache)])
        capacities.append(batch.cache[0].capacity)
    # Doubling up to 16 rows, then 16 rows at a time.
    assert capacities == [1, 2, *[4] * 2, *[8] * 4, *[16] * 8, *[32] * 16, 48, 48]
    batch.leave(range(22))
    assert batch.cache[0].rows == 12 and batch.cache[0].capacity == 24
    batch.leave(range(22, 31))
    assert batch.cache[0].rows == 3 and batch.cache[0].capacity == 12
    assert sorted(batch.ids) == [31, 32, 33]
    out = {r: [last[r]] for r in batch.ids}  # the rows left decode on, through the copies
    for _ in range(4):
        logits = batch.forward(model, [out[r][-1] for r in batch.ids])
        for r, t in zip(batch.ids, mx.argmax(logits, axis=-1).tolist(), strict=True):
            out[r].append(t)
    for r, tokens in out.items():
        assert tokens == [s.token for s in generate(model, [5 + r, 6, 7], GREEDY, max_tokens=5)]


def test_leaving_as_views_or_dropped(tmp_path):
    """Rows leaving as views (the batch empties) hold what copies hold; dropped rows come back
    with nothing; while rows stay, views are copies (a view would block the in-place move)."""
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    prompts = {1: [3, 4, 5, 6], 2: list(range(10, 19)), 3: [7, 8]}

    def batch_of_all():
        batch = RunningBatch()
        batch.join([(r, prefill(model, p)[0]) for r, p in prompts.items()])
        batch.forward(model, [1, 2, 3])
        return batch

    copies = batch_of_all().leave([1, 2, 3])
    partial = batch_of_all()
    assert set(partial.leave([2, 3], views=[2], drop=[3])) == {2}
    assert partial.ids == [1] and partial.cache[0].rows == 1
    views = batch_of_all().leave([1, 2, 3], views=[1, 2, 3])
    for r in prompts:
        assert cache_tokens(views[r]) == cache_tokens(copies[r]) == len(prompts[r]) + 1
        for v, c in zip(views[r], copies[r], strict=True):
            assert mx.array_equal(v.keys, c.keys) and mx.array_equal(v.values, c.values)


def test_padding_every_row_shares_is_dropped_when_the_long_row_leaves(tmp_path):
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    prompts = {1: [(7 * i) % 300 + 3 for i in range(300)], 2: [3, 4, 5, 6], 3: [9, 8, 7, 6, 5]}
    batch = RunningBatch()
    out = {}
    for r, p in prompts.items():
        cache, out[r] = prefill(model, p)
        out[r] = [out[r]]
        batch.join([(r, cache)])
    for step in range(6):
        if step == 2:
            batch.leave([1])
            assert batch.cache[0]._idx < 256  # the 296+ positions only row 1 used are gone
        logits = batch.forward(model, [out[r][-1] for r in batch.ids])
        for r, t in zip(batch.ids, mx.argmax(logits, axis=-1).tolist(), strict=True):
            out[r].append(t)
    for r in (2, 3):
        assert out[r] == [s.token for s in generate(model, prompts[r], GREEDY, max_tokens=7)]


def test_rows_kv_after_joins_and_leaves_is_each_rows_own(tmp_path):
    """Rows joining one by one, several at once (a longer one shifting the batch), and rows
    prefilled together, then rows leaving from the middle (the last ones move into the holes),
    twice: every row's KV, read back or left as its own cache, is exactly its own cache's."""
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    lengths = (6, 11, 4, 23, 9, 3, 14, 8)
    prompts = {r: [(5 * r + 3 * i) % 200 + 3 for i in range(n)] for r, n in enumerate(lengths)}
    own = {r: prefill(model, p)[0] for r, p in prompts.items()}
    batch = RunningBatch()
    batch.join([(0, _copied(own[0]))])
    batch.join([(r, _copied(own[r])) for r in (1, 2, 3)])  # 3 is the longest: a shift
    _, together = prefill_together(model, [prompts[4], prompts[5]], len(model.layers))
    for row, r in enumerate((4, 5)):  # batched numerics: these rows' own are the batch's rows
        own[r] = [layer.extract(row) for layer in together]
    batch.join_batch([4, 5], [len(prompts[4]), len(prompts[5])], together)
    batch.join([(r, _copied(own[r])) for r in (6, 7)])
    left = batch.leave([1, 3], views=[1])  # rows stay: copies, 6 and 7 move into the holes
    assert batch.ids == [0, 6, 2, 7, 4, 5]
    left |= batch.leave([0, 2])  # short rows (copied from past the padding they share)
    assert batch.ids == [4, 6, 5, 7]
    read = zip(batch.ids, batch.row_caches(batch.ids), strict=True)
    for r, cache in [*left.items(), *read]:
        n = len(prompts[r])
        assert cache_tokens(cache) == n
        for mine, theirs in zip(cache, own[r], strict=True):
            assert mine.keys.shape[2] == n
            assert mx.array_equal(mine.keys, theirs.keys[..., :n, :]), r
            assert mx.array_equal(mine.values, theirs.values[..., :n, :]), r
    for layer in batch.cache:
        assert layer.pads == layer.left_padding.tolist()
        assert (layer.offset == layer._idx - layer.left_padding).all()


def _copied(cache):
    out = []
    for c in cache:
        fresh = SpanKVCache()
        fresh.keys, fresh.values, fresh.offset = mx.array(c.keys), mx.array(c.values), c.offset
        out.append(fresh)
    return out


class _Syncs:
    """Counts the host's waits on the device (`mx.eval`, reading an array back) while inside."""

    def __init__(self, monkeypatch):
        self.n = 0
        for target, names in ((mx, ("eval", "synchronize")), (mx.array, _READS)):
            for name in names:
                monkeypatch.setattr(target, name, self._counted(getattr(target, name)))

    def _counted(self, f):
        def counted(*args, **kwargs):
            self.n += 1
            return f(*args, **kwargs)

        return counted


_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")


def test_membership_changes_wait_on_the_device_at_most_once(tmp_path, monkeypatch):
    """On an accelerator each wait costs a round trip behind the queued work: a join, and a
    leave with nothing to copy or move, wait for nothing; a leave that copies or moves rows
    waits once, for all layers together. That wait keeps the writes in place: the next step's
    peak memory stays below one layer's buffer (an in-place write refused copies the buffer)."""
    model = load(str(write_tiny_model(tmp_path / "llama", "llama"))).model
    rows = [(r, prefill(model, [3 + r, 4, 5, 6 + r])[0]) for r in range(16)]
    batch = RunningBatch()

    def syncs(f, *args, **kw):
        counter = _Syncs(monkeypatch)
        f(*args, **kw)
        monkeypatch.undo()
        if batch.ids:  # the next step
            mx.eval(batch.forward(model, [1] * len(batch)))
        return counter.n

    assert syncs(batch.join, rows[:1]) == 0
    assert syncs(batch.join, rows[1:]) == 0
    last = batch.ids[-1]
    assert syncs(batch.leave, [last], drop=[last]) == 0  # nothing to copy, nothing moves
    assert syncs(batch.leave, batch.ids[2:4], drop=batch.ids[2:4]) == 1  # two rows move
    mx.eval([[c.keys, c.values] for c in batch.cache])
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    assert syncs(batch.leave, [batch.ids[1]]) == 1  # its copy out, and the last row moves
    assert mx.get_peak_memory() - before < batch.cache[0].nbytes
    everyone = list(batch.ids)
    assert syncs(batch.leave, everyone, views=everyone) == 0
