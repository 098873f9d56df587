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
# Attention's scores a block of query rows at a time (4 MiB of float32), at least this many rows.
SCORES_PER_BLOCK = 1 << 20
MIN_BLOCK_ROWS = 16
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
    (B, Hq, N, T), boolean or added.

    The queries go in blocks of rows whose scores stay in the cache (`SCORES_PER_BLOCK`), and
    under a causal mask a block's scores stop at its last query's position: a cold 1,700-token
    prefill of SmolLM2 took 148 ms a layer with the scores whole, 47 in blocks of 64 rows (MLX:
    334). The query heads that share a key head are stacked along the rows, so a block's
    scores are one matmul per key head."""
    b, hq, n, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    q = (queries * mx.array(scale, queries.dtype)).reshape(b, hkv, g, n, d)
    causal = isinstance(mask, str)
    masks = None
    if mask is not None and not causal:
        masks = mx.broadcast_to(mask, (b, hq, n, t)).reshape(b, hkv, g, n, t)
    rows = max(MIN_BLOCK_ROWS, SCORES_PER_BLOCK // (b * hq * t))
    out = [
        _block(q, keys, values, masks, causal, start, min(n, start + rows), t)
        for start in range(0, n, rows)
    ]
    return (out[0] if len(out) == 1 else mx.concatenate(out, axis=3)).reshape(b, hq, n, d)


def _block(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    masks: mx.array | None,
    causal: bool,
    start: int,
    stop: int,
    t: int,
) -> mx.array:
    """Attention of query rows [start, stop) of `q` (B, Hkv, G, N, D): (B, Hkv, G, rows, D)."""
    b, hkv, g, n, d = q.shape
    rows = stop - start
    end = t - n + stop if causal else t  # the keys the block's last query sees
    block = q[:, :, :, start:stop, :].reshape(b, hkv, g * rows, d)
    scores = block @ keys[:, :, :end, :].swapaxes(-1, -2)
    if masks is not None:
        m = masks[:, :, :, start:stop, :].reshape(b, hkv, g * rows, t)
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, mx.array(_FLOAT32_MIN, scores.dtype))
        else:
            scores = scores + m.astype(scores.dtype)
    mx.eval(scores)
    host, own = _host(scores)
    if causal:  # row r stands at position end - rows + r: nothing after it
        above = np.triu(np.ones((rows, rows), dtype=bool), k=1)
        host.reshape(b, hkv, g, rows, end)[..., end - rows :][..., above] = _FLOAT32_MIN
    with np.errstate(all="ignore"):  # rows masked whole come out as MLX's would
        np.subtract(host, host.max(axis=-1, keepdims=True), out=host)
        np.exp(host, out=host)
        np.divide(host, host.sum(axis=-1, keepdims=True), out=host)
    probs = scores if own else mx.array(host)
    return (probs @ values[:, :, :end, :]).reshape(b, hkv, g, rows, d)


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
