"""On a CPU, the exp-heavy steps of a prefill in numpy: attention's softmax, SwiGLU's sigmoid.

MLX's Linux CPU build computes exp one element at a time: its SIMD types are one lane wide
there (`mlx/backend/cpu/simd/base_simd.h`; macOS builds use Accelerate's), so each exp is a
scalar polynomial, ~9 ns on this machine's EPYC, where numpy's vectorized exp takes ~0.3 ns.
It was most of what a short prompt cost over a long context: for 25 queries over a 1,725-token
context, SmolLM2's softmax (9 heads) took 3.5 ms a layer in MLX and 0.1 ms in numpy. With
both steps here, its 20-token prefill over a cached 1,700-token context took 107 ms against
213 with MLX's, and a cold 1,700-token prefill 3.1 s against 12.6 (`benchmarks/host_exp.py`).

Each function evaluates its inputs (a wait mid-forward, on the CPU's own stream) and hands its
result back to MLX; attention's softmax works in place in the scores it computed itself, which
no other array can reach. Only for float32 multi-token inputs big enough to be worth the wait
(`takes_*`): a decode stays lazy, so the step run ahead overlaps the delivery of the one before
(`kvgrove.models.runner`). Never inside `mx.compile`, `mx.vmap` (an evaluation there raises) or
a gradient (the softmax would be invisible to it): kvgrove transforms no forward pass.
`kvgrove.models.attention.install` routes mlx-lm's functions here. MoE layers (mlx-lm's
SwitchGLU hands SwiGLU one row per expert choice) keep MLX's.
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


def takes_attention(queries: Any, keys: Any, values: Any) -> bool:
    b, hq, n, _ = queries.shape
    return (
        n > 1
        # a quantized KV cache hands (packed, scales, biases) tuples: mlx-lm's own path
        and isinstance(keys, mx.array)
        and isinstance(values, mx.array)
        and queries.dtype == keys.dtype == values.dtype == mx.float32
        and keys.ndim == values.ndim == 4
        and keys.shape[:3] == values.shape[:3]
        and keys.shape[-1] == queries.shape[-1]
        and hq % keys.shape[1] == 0
        and b * hq * n * keys.shape[2] >= MIN_ELEMENTS
    )


def attention(
    queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any
) -> mx.array:
    """MLX's CPU fallback for attention, with the softmax in numpy, in place in the evaluated
    scores. Queries (B, Hq, N, D), keys (B, Hkv, T, D), values (B, Hkv, T, Dv); mask None,
    "causal" (as MLX takes it: query i stands at position T - N + i) or an array that
    broadcasts to (B, Hq, N, T), boolean or added.

    The queries go in blocks of rows whose scores stay in the cache (`SCORES_PER_BLOCK`), and
    under a causal mask a block's scores stop at its last query's position: a cold 1,700-token
    prefill of SmolLM2 took 148 ms a layer with the scores whole, 47 in blocks (of 68 rows;
    MLX: 334). The query heads that share a key head are stacked along the rows, so a block's
    scores are one matmul per key head."""
    b, hq, n, d = queries.shape
    hkv, t = keys.shape[1], keys.shape[2]
    g = hq // hkv
    q = (queries * mx.array(scale, queries.dtype)).reshape(b, hkv, g, n, d)
    causal = isinstance(mask, str)
    masks = None
    if mask is not None and not causal:  # 4-D, so that a block takes its rows of it
        masks = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    rows = max(MIN_BLOCK_ROWS, SCORES_PER_BLOCK // (b * hq * t))
    out = [
        _block(q, keys, values, masks, causal, start, min(n, start + rows))
        for start in range(0, n, rows)
    ]
    out = out[0] if len(out) == 1 else mx.concatenate(out, axis=3)
    return out.reshape(b, hq, n, values.shape[-1])


def _block(
    q: mx.array,
    keys: mx.array,
    values: mx.array,
    masks: mx.array | None,
    causal: bool,
    start: int,
    stop: int,
) -> mx.array:
    """Attention of query rows [start, stop) of `q` (B, Hkv, G, N, D): (B, Hkv, G, rows, Dv)."""
    b, hkv, g, n, d = q.shape
    t, rows = keys.shape[2], stop - start
    end = t - n + stop if causal else t  # the keys the block's last query sees
    block = q[:, :, :, start:stop, :].reshape(b, hkv, g * rows, d)
    scores = block @ keys[:, :, :end, :].swapaxes(-1, -2)
    if masks is not None:
        m = masks if masks.shape[2] == 1 else masks[:, :, start:stop, :]
        m = mx.broadcast_to(m, (b, hkv * g, rows, t)).reshape(b, hkv, g * rows, t)
        if m.dtype == mx.bool_:
            scores = mx.where(m, scores, mx.array(_FLOAT32_MIN, scores.dtype))
        else:
            scores = scores + m.astype(scores.dtype)
    mx.eval(scores)
    host = np.asarray(scores)
    own = host.flags.writeable and host.flags.c_contiguous  # a fresh result: always, today
    if not own:
        host = np.array(host)
    if causal:  # row r stands at position end - rows + r: nothing after it
        above = np.triu(np.ones((rows, rows), dtype=bool), k=1)
        host.reshape(b, hkv, g, rows, end)[..., end - rows :][..., above] = _FLOAT32_MIN
    with np.errstate(all="ignore"):  # rows masked whole come out as MLX's would
        np.subtract(host, host.max(axis=-1, keepdims=True), out=host)
        np.exp(host, out=host)
        np.divide(host, host.sum(axis=-1, keepdims=True), out=host)
    probs = scores if own else mx.array(host)
    return (probs @ values[:, :, :end, :]).reshape(b, hkv, g, rows, values.shape[-1])


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
    """mlx-lm's `swiglu`, silu(gate) * x = gate / (1 + exp(-gate)) * x, in numpy. The inputs
    are only read (`gate` may be a view others read, or `x` itself): the result is a new
    array."""
    mx.eval(gate, x)
    g = np.asarray(gate)
    with np.errstate(all="ignore"):  # exp(-gate) overflows to inf for a very negative gate: 0
        out = np.negative(g)
        np.exp(out, out=out)
        out += 1.0
        np.divide(g, out, out=out)
        out *= np.asarray(x)
    return mx.array(out)
