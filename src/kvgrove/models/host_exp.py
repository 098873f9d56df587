"""On a CPU, the exp-heavy steps of a prefill in numpy: attention's softmax, SwiGLU's sigmoid.

MLX's Linux CPU build computes exp one element at a time: its SIMD types are one lane wide
there (`mlx/backend/cpu/simd/base_simd.h`), so each exp is a scalar polynomial, ~9 ns on this
machine's EPYC, where numpy's vectorized exp takes ~0.3 ns. It is most of what a short prompt
costs over a long context: for 25 queries over a 1,725-token context, SmolLM2's softmax (9
heads) took 3.5 ms a layer in MLX and 0.1 ms in numpy; its 25-token prefill over a cached
1,700-token context took 264 ms, 130 ms with the softmax in numpy, and a cold 1,700-token
prefill 12.6 s, 6.6 s. SwiGLU's sigmoid (1,536 per token and layer) cost another fifth of the
rest.

Each function here evaluates its inputs (a wait mid-forward, on the CPU's own stream), works in
place in the evaluated buffer where it is the array's own (a fresh matmul output, which only
this call reads), and hands the result back to MLX. Only for float32 multi-token inputs big
enough to be worth the wait (`takes_*`): a decode stays lazy, so the step run ahead overlaps
the delivery of the one before (`kvgrove.models.runner`). `kvgrove.models.attention.install`
routes mlx-lm's functions here.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

# At least this many exps (~0.15 ms of MLX's) to be worth the wait on the inputs, mid-forward.
MIN_ELEMENTS = 16_384
_FLOAT32_MIN = float(np.finfo(np.float32).min)


def _host(a: mx.array) -> tuple[np.ndarray, bool]:
    """The evaluated array on the host, and whether that is its own buffer (writable, C order:
    a fresh result, not a view of another array's), to be worked on in place."""
    host = np.asarray(a)
    if host.flags.writeable and host.flags.c_contiguous:
        return host, True
    return np.array(host), False  # the result goes back as a copy


def takes_attention(queries: Any, keys: Any, values: Any) -> bool:
    b, hq, n, _ = queries.shape
    return (
        n > 1
        # a quantized KV cache hands (packed, scales, biases) tuples: mlx-lm's own path
        and isinstance(keys, mx.array)
        and isinstance(values, mx.array)
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and keys.ndim == 4
        and hq % keys.shape[1] == 0
        and b * hq * n * keys.shape[2] >= MIN_ELEMENTS
    )


def attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any
) -> mx.array:
    """MLX's CPU fallback for attention, with the softmax in numpy, in place in the evaluated
    scores. Queries (B, Hq, N, D), keys and values (B, Hkv, T, D); mask None, "causal" (as MLX
    takes it: query i stands at position T - N + i) or an array that broadcasts to
    (B, Hq, N, T), boolean or added. The query heads that share a key head are stacked along
    the rows, so the scores are one matmul per key head."""
    b, hq, n, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    q = (queries * mx.array(scale, queries.dtype)).reshape(b, hkv, g * n, d)
    scores = q @ keys.swapaxes(-1, -2)
    if mask is not None and not isinstance(mask, str):
        m = mx.broadcast_to(mask, (b, hq, n, t)).reshape(b, hkv, g * n, t)
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, mx.array(_FLOAT32_MIN, scores.dtype))
        else:
            scores = scores + m.astype(scores.dtype)
    mx.eval(scores)
    host, own = _host(scores)
    if isinstance(mask, str):  # query i stands at position T - N + i: nothing after it
        above = np.triu(np.ones((n, n), dtype=bool), k=1)
        host.reshape(b, hkv, g, n, t)[..., t - n :][..., above] = _FLOAT32_MIN
    with np.errstate(all="ignore"):  # rows masked whole come out as MLX's would
        np.subtract(host, host.max(axis=-1, keepdims=True), out=host)
        np.exp(host, out=host)
        np.divide(host, host.sum(axis=-1, keepdims=True), out=host)
    probs = scores if own else mx.array(host)
    return (probs @ values).reshape(b, hq, n, d)


def takes_swiglu(gate: Any, x: Any) -> bool:
    return (
        isinstance(gate, mx.array)
        and isinstance(x, mx.array)
        and gate.ndim >= 2
        and gate.shape[-2] > 1
        and gate.shape == x.shape
        and gate.dtype == x.dtype == mx.float32
        and gate.size >= MIN_ELEMENTS
    )


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu`, silu(gate) * x = gate / (1 + exp(-gate)) * x, in numpy, in place in
    the evaluated gate."""
    mx.eval(gate, x)
    g, own = _host(gate)
    with np.errstate(all="ignore"):  # exp(-gate) overflows to inf for a very negative gate: 0
        out = np.negative(g)
        np.exp(out, out=out)
        out += 1.0
        np.divide(g, out, out=g)
        g *= np.asarray(x)
    return gate if own else mx.array(g)
