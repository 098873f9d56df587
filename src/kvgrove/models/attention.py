"""kvgrove's routes through attention, in place of mlx-lm's `scaled_dot_product_attention`.

`install` puts a wrapper in the model's module (mlx-lm's models call that function by name).
It takes two kinds of call off MLX's path, each exact in what it attends to; every other call
goes to mlx-lm's function unchanged.

On CUDA, a ragged batch's one-token decode. A running batch is left-padded (`SlotKVCache`): row
b's keys stand at positions [pads[b], T) of the batch's buffers. mlx-lm hands the fused
`mx.fast.scaled_dot_product_attention` an array mask saying so, and on CUDA an array mask sends
it to its unfused fallback (a matmul, a softmax and a matmul per layer, scores in bf16): on the
H200 a 64-row decode of an 8B model took about twice as long as the same batch with no padding
and no mask. Two ways around it:

- a batch with no padding at all (every row as long as the longest) needs no mask for a
  one-token query: `SlotKVCache.make_mask` answers None, as mlx-lm's own caches do, and MLX
  runs its fused decode kernel;
- otherwise the wrapper runs `ragged_decode` for a one-token query over a `SlotKVCache` whose
  mask is the one the cache made (left padding only: no window, nothing the model added), a
  kernel (`mx.fast.cuda_kernel`) that reads each row's span from its own start, scores and
  softmax in float32.

On a CPU, a float32 query of several tokens (a prefill) takes `host_exp.attention`: MLX's
own fallback with the softmax in numpy, since MLX's Linux CPU exp is scalar (see
kvgrove.models.host_exp, which also takes the same prefills' SwiGLU: `install` routes the
module's `swiglu` there too).
"""

from __future__ import annotations

import sys
from typing import Any

import mlx.core as mx

from kvgrove.models.host_exp import attention as host_attention
from kvgrove.models.host_exp import swiglu as host_swiglu
from kvgrove.models.host_exp import takes_attention, takes_swiglu

# The mask the last SlotKVCache.make_mask made for a one-token query, and the row paddings it
# encodes: the wrapper runs the kernel only for that very mask object.
_decode_mask: tuple[Any, list[int]] | None = None


def note_decode_mask(mask: Any, pads: list[int]) -> None:
    global _decode_mask
    _decode_mask = (mask, pads)


_SOURCE = r"""
    const int hq = q_shape[1];
    const int hkv = k_shape[1];
    const int T = k_shape[2];
    const int b = blockIdx.x / hq;
    const int h = blockIdx.x % hq;
    const int kvh = h / (hq / hkv);
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    constexpr int E = D / 32;

    const DT* qp = q + b * q_strides[0] + h * q_strides[1];
    const DT* kp = k + b * k_strides[0] + kvh * k_strides[1];
    const DT* vp = v + b * v_strides[0] + kvh * v_strides[1];
    const int64_t ks = k_strides[2], vs = v_strides[2], kd = k_strides[3], vd = v_strides[3];

    float qv[E];
    float acc[E];
    #pragma unroll
    for (int e = 0; e < E; ++e) {
        qv[e] = static_cast<float>(qp[(lane * E + e) * q_strides[3]]) * SCALE;
        acc[e] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    for (int t = pads[b] + warp; t < T; t += WARPS) {
        const DT* kt = kp + t * ks;
        float s = 0.0f;
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            s += qv[e] * static_cast<float>(kt[(lane * E + e) * kd]);
        }
        #pragma unroll
        for (int off = 16; off > 0; off /= 2) {
            s += __shfl_xor_sync(0xffffffff, s, off);
        }
        const float mn = fmaxf(m, s);
        const float corr = __expf(m - mn);
        const float p = __expf(s - mn);
        l = l * corr + p;
        const DT* vt = vp + t * vs;
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            acc[e] = acc[e] * corr + p * static_cast<float>(vt[(lane * E + e) * vd]);
        }
        m = mn;
    }

    __shared__ float sm[WARPS];
    __shared__ float sl[WARPS];
    __shared__ float sacc[WARPS][D];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
    #pragma unroll
    for (int e = 0; e < E; ++e) {
        sacc[warp][lane * E + e] = acc[e];
    }
    __syncthreads();
    if (warp == 0) {
        float M = -INFINITY;
        for (int w = 0; w < WARPS; ++w) {
            M = fmaxf(M, sm[w]);
        }
        float L = 0.0f;
        float f[WARPS];
        for (int w = 0; w < WARPS; ++w) {
            f[w] = sm[w] == -INFINITY ? 0.0f : __expf(sm[w] - M);
            L += sl[w] * f[w];
        }
        #pragma unroll
        for (int e = 0; e < E; ++e) {
            const int d = lane * E + e;
            float o = 0.0f;
            for (int w = 0; w < WARPS; ++w) {
                o += sacc[w][d] * f[w];
            }
            out[(b * hq + h) * D + d] = static_cast<DT>(o / L);
        }
    }
"""

_kernels: dict[float, Any] = {}
WARPS = (4, 8, 16, 32)
HEAD_DIMS = (32, 64, 96, 128, 256)


def _kernel(scale: float) -> Any:
    kernel = _kernels.get(scale)
    if kernel is None:
        # The scale is a constant of the model: part of the source, as a float literal.
        source = f"    constexpr float SCALE = {float(scale)!r}f;\n" + _SOURCE
        kernel = mx.fast.cuda_kernel(
            name="kvgrove_ragged_decode",
            input_names=["q", "k", "v", "pads"],
            output_names=["out"],
            source=source,
            ensure_row_contiguous=False,
        )
        _kernels[scale] = kernel
    return kernel


def _warps(blocks: int, length: int) -> int:
    """Warps per (row, head) block: enough blocks x warps to fill a big GPU (~8k warps),
    each warp at least 8 positions, 4 to 32 of them, a power of two."""
    want = max(1, 8192 // max(1, blocks))
    want = min(want, max(1, length // 8))
    return next((w for w in WARPS if w >= want), WARPS[-1])


def ragged_decode(
    queries: mx.array, keys: mx.array, values: mx.array, pads: mx.array, scale: float
) -> mx.array:
    """Attention of one query per row over keys [pads[b], T): queries (B, Hq, 1, D), keys and
    values (B, Hkv, T, D) (any strides), pads (B,) int32. Returns (B, Hq, 1, D)."""
    b, hq, n, d = queries.shape
    assert n == 1 and keys.shape[0] == b and hq % keys.shape[1] == 0, (queries.shape, keys.shape)
    if (scale, queries.dtype, d) not in _compiled:
        _compile(scale, queries.dtype, d)
    return _launch(queries, keys, values, pads, scale, _warps(b * hq, keys.shape[2]))


def _launch(
    queries: mx.array, keys: mx.array, values: mx.array, pads: mx.array, scale: float, warps: int
) -> mx.array:
    b, hq, _, d = queries.shape
    (out,) = _kernel(scale)(
        inputs=[queries, keys, values, pads],
        template=[("DT", queries.dtype), ("D", d), ("WARPS", warps)],
        grid=(b * hq * 32 * warps, 1, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(b, hq, 1, d)],
        output_dtypes=[queries.dtype],
    )
    return out


_compiled: set[tuple[float, Any, int]] = set()


def _compile(scale: float, dtype: Any, d: int) -> None:
    """Compile every variant (warps per block) the model's batches may take, at its first
    use (the warm-up's batch, before the server says ready): a variant met mid-serving would
    stall that step for NVRTC's compile."""
    q = mx.zeros((1, 1, 1, d), dtype)
    kv = mx.zeros((1, 1, 8, d), dtype)
    pads = mx.zeros((1,), mx.int32)
    mx.eval([_launch(q, kv, kv, pads, scale, w) for w in WARPS])
    _compiled.add((scale, dtype, d))


def available() -> bool:
    """Whether the kernel can run here: MLX's default device is a CUDA GPU."""
    if mx.default_device().type != mx.DeviceType.gpu:
        return False
    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


def _uses_kernel(queries: Any, keys: Any, values: Any, cache: Any, mask: Any) -> bool:
    noted = _decode_mask
    return (
        noted is not None
        and mask is noted[0]
        and getattr(cache, "pads", None) == noted[1]
        and queries.shape[2] == 1
        and queries.shape[-1] in HEAD_DIMS
        and keys.shape[-1] == values.shape[-1] == queries.shape[-1]
        and queries.dtype in (mx.bfloat16, mx.float16, mx.float32)
        and keys.dtype == values.dtype == queries.dtype
        and keys.shape[0] == queries.shape[0] == len(noted[1])
        and keys.shape[2] == values.shape[2] == getattr(cache, "_idx", -1)
    )


# The routes the installed wrappers take: process-wide, as the wrappers are (they stand in
# mlx-lm's modules), so the last `install` decides them for every model in the process.
_routes = {"ragged": False, "host_exp": False}


def _wrap(original: Any) -> Any:
    def scaled_dot_product_attention(
        queries, keys, values, cache=None, scale=1.0, mask=None, sinks=None
    ):
        if sinks is None:
            if _routes["ragged"] and _uses_kernel(queries, keys, values, cache, mask):
                return ragged_decode(queries, keys, values, cache.left_padding, scale)
            if _routes["host_exp"] and takes_attention(queries, keys, values):
                return host_attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.kvgrove_original = original
    return scaled_dot_product_attention


def _wrap_swiglu(original: Any) -> Any:
    def swiglu(gate, x):
        if _routes["host_exp"] and takes_swiglu(gate, x):
            return host_swiglu(gate, x)
        return original(gate, x)

    swiglu.kvgrove_original = original
    return swiglu


_WRAPPERS = {"scaled_dot_product_attention": _wrap, "swiglu": _wrap_swiglu}


def install(model: Any, *, ragged: bool = True, host_exp: bool = True) -> bool:
    """Route the model's attention as the module docstring says: on CUDA ragged decodes to
    `ragged_decode` (`ragged`), on a CPU prefills' attention and SwiGLU to
    kvgrove.models.host_exp (`host_exp`; not on macOS, whose MLX has a vectorized exp). True
    if a route is on and installed (or already was): the model's modules call mlx-lm's
    `scaled_dot_product_attention` and `swiglu` by name. Installed whether or not the model
    batches: the ragged route only ever takes a `SlotKVCache`'s decode."""
    if available():
        _routes["ragged"], _routes["host_exp"] = ragged, False
    elif mx.default_device().type == mx.DeviceType.cpu and sys.platform != "darwin":
        _routes["ragged"], _routes["host_exp"] = False, host_exp
    else:
        return False
    if not any(_routes.values()):
        return False
    installed = False
    names = {type(m).__module__ for m in model.modules()}
    for name in sorted(n for n in names if n.startswith("mlx_lm.models.")):
        module = sys.modules.get(name)
        for attr, wrap in _WRAPPERS.items():
            fn = getattr(module, attr, None)
            if fn is None:
                continue
            if not hasattr(fn, "kvgrove_original"):
                setattr(module, attr, wrap(fn))
            installed = True
    return installed
