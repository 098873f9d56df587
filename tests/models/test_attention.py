"""kvgrove's attention routes: a batch's decode gets no mask when no row is padded, kvgrove's
kernel on CUDA; a CPU prefill's softmax runs in numpy.

The kernel tests need MLX on a CUDA GPU (benchmarks/ragged_decode.py runs the same check and
times it there); elsewhere they are skipped. The host-softmax tests need a CPU.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import base

from kvgrove.models import attention
from kvgrove.models.batching import RunningBatch, SlotKVCache, prefill_together
from kvgrove.models.loading import load
from tiny_models import write_tiny_model

cuda = pytest.mark.skipif(not attention.available(), reason="needs MLX on a CUDA GPU")
cpu = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="the host softmax is a CPU's"
)


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
        assert attention.install(loaded.model, host_softmax=False) is False
        assert attention._routes == {"ragged": False, "host_softmax": False}
        assert attention.install(loaded.model) is True
        assert attention._routes == {"ragged": False, "host_softmax": True}
        wrapper = llama.scaled_dot_product_attention
        assert wrapper.kvgrove_original is base.scaled_dot_product_attention
        assert attention.install(loaded.model) is True  # once: never a wrapper of a wrapper
        assert llama.scaled_dot_product_attention is wrapper
    finally:
        attention.install(loaded.model)  # the runner's default, which other tests run under


def _mlx_attention(q, k, v, scale, mask):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def _masks(b: int, hq: int, n: int, t: int) -> dict[str, object]:
    rng = np.random.default_rng(b * 100 + n + t)
    keep = rng.random((b, 1, n, t)) > 0.3
    keep[0, 0, 0, :] = False  # a row that attends nothing (a left-padded query of a batch)
    return {
        "none": None,
        "causal": "causal",
        "boolean": mx.array(keep),
        "added": mx.array(np.where(keep[:, 0], 0.0, -1e9).astype(np.float32)[:, None]),
        "per head": mx.array(rng.random((1, hq, n, t)) > 0.2),
    }


@cpu
@pytest.mark.parametrize(("b", "hq", "hkv", "n", "t"), [(1, 9, 3, 25, 300), (2, 4, 4, 7, 40)])
@pytest.mark.parametrize("kind", ["none", "causal", "boolean", "added", "per head"])
def test_the_host_softmax_matches_mlx_attention(b, hq, hkv, n, t, kind):
    mask = _masks(b, hq, n, t)[kind]
    mx.random.seed(n + t)
    q = mx.random.normal((b, hq, n, 16))
    # Keys and values a slice of bigger buffers, as a cache hands them over.
    k = mx.random.normal((b, hkv, t + 13, 16))[..., :t, :]
    v = mx.random.normal((b, hkv, t + 13, 16))[..., :t, :]
    want = _mlx_attention(q, k, v, 0.25, mask)
    got = attention.host_softmax_attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape == (b, hq, n, 16)
    assert np.isfinite(np.asarray(got)).all()
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item(), mx.abs(got - want).max().item()


@cpu
def test_the_host_softmax_takes_only_big_float32_multi_token_queries():
    def takes(q_shape, t, dtype=mx.float32, quantized=False):
        q = mx.zeros(q_shape, dtype)
        kv = mx.zeros((q_shape[0], 2, t, q_shape[3]), dtype)
        if quantized:  # a quantized KV cache's (packed, scales, biases)
            kv = mx.quantize(kv, group_size=32, bits=4)
        return attention._takes_host_softmax(q, kv, kv)

    big = attention.HOST_SOFTMAX_MIN_SCORES
    assert takes((1, 4, 8, 16), big // 32)  # 1 x 4 x 8 x T scores: exactly the threshold
    assert not takes((1, 4, 8, 16), big // 32 - 1)  # too few to be worth the wait
    assert not takes((64, 4, 1, 16), big)  # a decode: one query token, stays lazy
    assert not takes((1, 4, 8, 16), big, mx.bfloat16)
    assert not takes((1, 4, 8, 32), big, quantized=True)
    assert not takes((1, 3, 8, 16), big)  # heads that do not group over the keys' 2


@cpu
def test_a_long_prefill_gives_the_logits_of_mlx_attention(tmp_path):
    """The same tiny model, a prompt prefilled over a restored context, with the route and
    without: the same logits (to float32 rounding), so the same greedy token."""
    from kvgrove.models.caches import make_cache
    from kvgrove.models.generate import forward

    loaded = load(str(write_tiny_model(tmp_path / "m", "llama")))
    model = loaded.model
    context = [3 + i % 250 for i in range(600)]
    prompt = [5 + i % 200 for i in range(40)]
    out = {}
    try:
        for on in (False, True):
            attention.install(model, host_softmax=on)
            cache = make_cache(model)
            mx.eval(forward(model, cache, mx.array([context], dtype=mx.uint32)))
            out[on] = forward(model, cache, mx.array([prompt], dtype=mx.uint32))
    finally:
        attention.install(model)
    assert mx.allclose(out[True], out[False], atol=1e-4).item()
    assert mx.argmax(out[True]).item() == mx.argmax(out[False]).item()


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
