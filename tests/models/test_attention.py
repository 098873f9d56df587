"""kvgrove's attention routes: a batch's decode gets no mask when no row is padded, kvgrove's
kernel on CUDA; on a CPU, `install` routes prefills to kvgrove.models.host_exp
(test_host_exp.py).

The kernel tests need MLX on a CUDA GPU (benchmarks/ragged_decode.py runs the same check and
times it there); elsewhere they are skipped.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import activations, base

from kvgrove.models import attention
from kvgrove.models.batching import RunningBatch, SlotKVCache, prefill_together
from kvgrove.models.loading import load
from tiny_models import write_tiny_model

cuda = pytest.mark.skipif(not attention.available(), reason="needs MLX on a CUDA GPU")
cpu = pytest.mark.skipif(mx.default_device().type != mx.DeviceType.cpu, reason="a CPU's routes")


def slot_cache(pads: list[int], length: int) -> SlotKVCache:
    c = SlotKVCache(pads)
    keys = mx.zeros((len(pads), 2, length, 8))
    c.update_and_fetch(keys, keys)
    return c


def test_a_one_token_query_over_unpadded_rows_gets_no_mask():
    c = slot_cache([0, 0, 0], 5)
    assert c.make_mask(1) is None
    # Anything else keeps mlx-lm's mask: several tokens, an array asked for, a window.
    assert c.make_mask(2) is not None
    assert c.make_mask(1, return_array=True) is not None
    assert c.make_mask(1, window_size=3) is not None


def test_a_padded_row_keeps_the_mask_and_it_is_the_one_noted():
    c = slot_cache([0, 2, 4], 5)
    mask = c.make_mask(1)
    assert mask is not None
    # Made before the layers write the next token's keys: one position more.
    assert mask.reshape(3, -1).tolist() == [
        [True] * 6,
        [False, False, True, True, True, True],
        [False, False, False, False, True, True],
    ]
    assert attention._decode_mask[0] is mask and attention._decode_mask[1] == [0, 2, 4]
    windowed = c.make_mask(1, window_size=2)
    asked = c.make_mask(1, return_array=True)  # for a model that builds on it: not noted
    assert attention._decode_mask[0] is mask and mask is not windowed and mask is not asked


def test_uniform_and_ragged_batches_decode_as_each_row_alone(tmp_path):
    """Rows of one length (no mask) and of different lengths (the mask, or the kernel on
    CUDA) give each row the greedy tokens it gets alone."""
    loaded = load(str(write_tiny_model(tmp_path / "m", "llama")))
    model = loaded.model
    for lengths in ((9, 9, 9), (9, 4, 7)):
        prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate(lengths)]
        logits, cache = prefill_together(model, prompts, len(model.layers))
        batch = RunningBatch()
        batch.join_batch([0, 1, 2], list(lengths), cache)
        tokens = mx.argmax(logits, axis=-1).tolist()
        got = [[t] for t in tokens]
        for _ in range(6):
            tokens = mx.argmax(batch.forward(model, tokens), axis=-1).tolist()
            for row, t in zip(got, tokens, strict=True):
                row.append(t)
        for prompt, row in zip(prompts, got, strict=True):
            alone_logits, alone_cache = prefill_together(model, [prompt], len(model.layers))
            alone = RunningBatch()
            alone.join_batch([0], [len(prompt)], alone_cache)
            t = [int(mx.argmax(alone_logits, axis=-1).item())]
            want = list(t)
            for _ in range(6):
                t = mx.argmax(alone.forward(model, t), axis=-1).tolist()
                want += t
            assert row == want, (lengths, prompt)


@cpu
def test_install_on_a_cpu_routes_only_what_it_is_asked_to(tmp_path):
    loaded = load(str(write_tiny_model(tmp_path / "m", "llama")))
    from mlx_lm.models import llama

    try:
        assert attention.install(loaded.model, host_exp=False) is False
        assert attention._routes == {"ragged": False, "host_exp": False}
        assert attention.install(loaded.model) is True
        assert attention._routes == {"ragged": False, "host_exp": True}
        wrapper, glu = llama.scaled_dot_product_attention, llama.swiglu
        assert wrapper.kvgrove_original is base.scaled_dot_product_attention
        assert glu.kvgrove_original is activations.swiglu
        assert attention.install(loaded.model) is True  # once: never a wrapper of a wrapper
        assert llama.scaled_dot_product_attention is wrapper and llama.swiglu is glu
    finally:
        attention.install(loaded.model)  # the runner's default, which other tests run under


@cuda
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "d", "t"),
    [(1, 4, 2, 64, 5), (6, 32, 8, 128, 300), (64, 8, 8, 128, 33), (3, 14, 2, 96, 1000)],
)
def test_the_kernel_matches_masked_attention(b, hq, hkv, d, t):
    mx.random.seed(b + t)
    q = mx.random.normal((b, 1, hq, d)).astype(mx.bfloat16).transpose(0, 2, 1, 3)
    kbuf = mx.random.normal((b, hkv, t + 40, d)).astype(mx.bfloat16)
    vbuf = mx.random.normal((b, hkv, t + 40, d)).astype(mx.bfloat16)
    k, v = kbuf[..., :t, :], vbuf[..., :t, :]
    pads = mx.array([0] + [(7 * i) % t for i in range(1, b)], mx.int32)
    got = attention.ragged_decode(q, k, v, pads, d**-0.5).astype(mx.float32)
    mask = (mx.arange(t)[None, :] >= pads[:, None])[:, None, None, :]
    want = mx.fast.scaled_dot_product_attention(
        *(x.astype(mx.float32) for x in (q, k, v)), scale=d**-0.5, mask=mask
    )
    assert (mx.abs(got - want).max() / mx.abs(want).max()).item() < 1e-2


@cuda
def test_the_installed_kernel_runs_for_ragged_rows_only(tmp_path):
    loaded = load(str(write_tiny_model(tmp_path / "m", "llama")))
    from mlx_lm.models import llama

    assert attention.install(loaded.model)
    wrapped = llama.scaled_dot_product_attention
    try:
        assert wrapped.kvgrove_original is base.scaled_dot_product_attention
        assert attention.install(loaded.model)  # idempotent: not wrapped twice
        assert llama.scaled_dot_product_attention is wrapped
        c = SlotKVCache([0, 3])
        c.update_and_fetch(*(mx.zeros((2, 2, 6, 64)),) * 2)
        q = mx.zeros((2, 2, 1, 64))
        keys, values = c.keys_and_values()
        mask = c.make_mask(1)
        assert attention._uses_kernel(q, keys, values, c, mask)
        assert not attention._uses_kernel(q, keys, values, c, c.make_mask(1, return_array=True))
        assert not attention._uses_kernel(mx.zeros((2, 2, 2, 64)), keys, values, c, mask)
    finally:
        llama.scaled_dot_product_attention = wrapped.kvgrove_original
