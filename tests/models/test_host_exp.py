"""On a CPU, a prefill's attention softmax and SwiGLU in numpy (kvgrove.models.host_exp):
the same results as MLX's (to float32 rounding), only where it is worth a wait."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import activations

from kvgrove.models import attention, host_exp
from kvgrove.models.loading import load
from tiny_models import write_tiny_model

pytestmark = pytest.mark.skipif(
    mx.default_device().type != mx.DeviceType.cpu, reason="a CPU's route"
)


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
        "2-D": mx.array(rng.random((n, t)) > 0.1),  # one mask for every row and head
    }


@pytest.mark.parametrize(("b", "hq", "hkv", "n", "t"), [(1, 9, 3, 25, 300), (2, 4, 4, 7, 40)])
@pytest.mark.parametrize("kind", ["none", "causal", "boolean", "added", "per head", "2-D"])
def test_the_attention_matches_mlx_attention(b, hq, hkv, n, t, kind):
    mask = _masks(b, hq, n, t)[kind]
    mx.random.seed(n + t)
    q = mx.random.normal((b, hq, n, 16))
    # Keys and values a slice of bigger buffers, as a cache hands them over.
    k = mx.random.normal((b, hkv, t + 13, 16))[..., :t, :]
    v = mx.random.normal((b, hkv, t + 13, 16))[..., :t, :]
    want = _mlx_attention(q, k, v, 0.25, mask)
    got = host_exp.attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape == (b, hq, n, 16)
    assert np.isfinite(np.asarray(got)).all()
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item(), mx.abs(got - want).max().item()


@pytest.mark.parametrize("kind", ["none", "causal", "boolean", "added", "per head", "2-D"])
@pytest.mark.parametrize("t", [70, 300])  # a cold prefill (as many keys as queries), and over more
def test_attention_in_blocks_of_rows_matches_mlx_attention(monkeypatch, kind, t):
    """Blocks of 16 rows (the least), the last one shorter: 70 queries in five blocks."""
    b, hq, hkv, n = 2, 6, 2, 70
    monkeypatch.setattr(host_exp, "SCORES_PER_BLOCK", 1)
    mask = _masks(b, hq, n, t)[kind]
    mx.random.seed(t)
    q = mx.random.normal((b, hq, n, 16))
    k = mx.random.normal((b, hkv, t, 16))
    v = mx.random.normal((b, hkv, t, 16))
    want = _mlx_attention(q, k, v, 0.25, mask)
    got = host_exp.attention(q, k, v, 0.25, mask)
    assert got.shape == want.shape
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item(), mx.abs(got - want).max().item()


def test_the_attention_takes_only_big_float32_multi_token_queries():
    def takes(q_shape, t, dtype=mx.float32, quantized=False):
        q = mx.zeros(q_shape, dtype)
        kv = mx.zeros((q_shape[0], 2, t, q_shape[3]), dtype)
        if quantized:  # a quantized KV cache's (packed, scales, biases)
            kv = mx.quantize(kv, group_size=32, bits=4)
        return host_exp.takes_attention(q, kv, kv)

    big = host_exp.MIN_ELEMENTS
    assert takes((1, 4, 8, 16), big // 32)  # 1 x 4 x 8 x T scores: exactly the threshold
    assert not takes((1, 4, 8, 16), big // 32 - 1)  # too few to be worth the wait
    assert not takes((64, 4, 1, 16), big)  # a decode: one query token, stays lazy
    assert not takes((1, 4, 8, 16), big, mx.bfloat16)
    assert not takes((1, 4, 8, 32), big, quantized=True)
    assert not takes((1, 3, 8, 16), big)  # heads that do not group over the keys' 2


def test_values_may_be_narrower_than_keys():
    """MLA-style heads (glm4_moe_lite, mimo_v2_flash): keys of 24, values of 16."""
    mx.random.seed(5)
    q = mx.random.normal((1, 4, 32, 24))
    k = mx.random.normal((1, 1, 600, 24))
    v = mx.random.normal((1, 1, 600, 16))
    assert host_exp.takes_attention(q, k, v)
    want = _mlx_attention(q, k, v, 0.2, "causal")
    got = host_exp.attention(q, k, v, 0.2, "causal")
    assert got.shape == want.shape == (1, 4, 32, 16)
    assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item()


def test_swiglu_matches_mlx_lm_and_leaves_its_inputs_alone():
    mx.random.seed(3)
    big = mx.random.normal((4, 30, 1200)) * 30
    up = mx.random.normal((2, 30, 600)) * 4
    mx.eval(big, up)
    cases = {
        "own buffer": (mx.random.normal((2, 30, 600)) * 30, up),
        "a strided view": (big[:2, :, ::2], up),
        "a contiguous view": (big[1:3], mx.random.normal((2, 30, 1200))),
        "the gate as x": (up, up),
    }
    for name, (gate, x) in cases.items():
        x = gate if x is None else x
        mx.eval(gate, x)
        before = (np.array(big), np.array(gate), np.array(x))
        lazy = gate * 2  # built before the call: must still read the gate as it was
        want = activations.swiglu(gate, x)
        got = host_exp.swiglu(gate, x)
        assert np.isfinite(np.asarray(got)).all(), name
        assert mx.allclose(got, want, atol=1e-5, rtol=1e-5).item(), (name, mx.abs(got - want).max())
        assert np.array_equal(np.asarray(big), before[0]), name
        assert np.array_equal(np.asarray(gate), before[1]), name
        assert np.array_equal(np.asarray(x), before[2]), name
        assert np.array_equal(np.asarray(lazy), 2 * before[1]), name


def test_swiglu_takes_only_big_float32_multi_token_inputs():
    def takes(shape, dtype=mx.float32, x_shape=None):
        return host_exp.takes_swiglu(mx.zeros(shape, dtype), mx.zeros(x_shape or shape, dtype))

    assert takes((1, 8, host_exp.MIN_ELEMENTS // 8))
    assert not takes((1, 8, host_exp.MIN_ELEMENTS // 8 - 1))
    assert not takes((64, 1, host_exp.MIN_ELEMENTS))  # a decode: stays lazy
    assert not takes((1, 8, host_exp.MIN_ELEMENTS), mx.bfloat16)
    assert not takes((1, 8, host_exp.MIN_ELEMENTS), x_shape=(1, 1, host_exp.MIN_ELEMENTS))


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
            attention.install(model, host_exp=on)
            cache = make_cache(model)
            mx.eval(forward(model, cache, mx.array([context], dtype=mx.uint32)))
            out[on] = forward(model, cache, mx.array([prompt], dtype=mx.uint32))
    finally:
        attention.install(model)
    assert mx.allclose(out[True], out[False], atol=1e-4).item()
    # numpy's exp rounds differently from MLX's: the same logits to the bit would mean the
    # route was not taken
    assert not mx.array_equal(out[True], out[False]).item()
    assert mx.argmax(out[True]).item() == mx.argmax(out[False]).item()
