"""Quantized models on a GPU: a dequantized copy of each quantized layer, and MLX's kernels.

MLX 0.32.4's quantized matmul on CUDA runs `qmv` below 8 rows (one row per block: the weights
are read again for every row) and `qmm_sm80` from 8 rows (group sizes below K never take the
Hopper `qmm_sm90`). Measured on an H200, one decode step's weight matmuls of Llama-3.1-8B
(benchmarks/gpu_quant.py, tok/s at batch 1 / 2 / 4 / 8 / 16 / 32 / 64):

    bf16 (a dense copy)       236 / 237 / 458 / 856 / 1,916 / 4,023 / 7,344
    4-bit group 64            192 / 213 / 229 / 601 / 1,190 / 1,606 / 2,936
    4-bit group 32 / 128      same below 8 rows; 493-2,334 / 600-2,567 from 8
    8-bit group 64            218 / 255 / 293 / 684 / 1,354 / 2,036 / 3,491
    4-bit dequantized per step 52 / 101 / 201 / 401 / 796 / 1,599 / 3,108

The dense copy is faster at every batch size, one row included. So where memory allows, each
quantized linear layer also keeps its weights dequantized (`DualLinear`): inputs of at least
`rows` rows (default 1: all of them) take the dense matmul, fewer rows the quantized kernel.
The copy costs 16 / bits times the quantized weights' memory, so it is kept only while the
model's weights then take at most half the device's memory; the weights' charge includes it.
On the H200's 8B-shaped 4-bit model (+13.4 GiB) kvgrove's server then makes 97 / 381 / 695 /
665 tok/s at concurrency 1 / 8 / 32 / 64, where MLX's own batched loop on the quantized layers
makes 103 / 261 / 306 / 314.

`qmm_sm80` is compiled by NVRTC the first time a process meets it, once per tile (MLX picks a
16-, 32- or 64-row tile from the rows) and per (dtype, bits, group size, mode): 40-50 s each
on the H200's host, then cached on disk (MLX_PTX_CACHE_DIR, default /tmp/mlx/<version>/ptx).
Where the quantized kernel still meets 8 rows or more (no dense copy, or a tied quantized
embedding as the head), `compile_batched_kernels` runs it once per tile at load, so that
stall comes before the server says ready instead of inside the first batched requests.

`set_dense_rows` is the process's policy (serve sets it from `Settings.quantized_dense_rows`;
0 = off); loading applies it on a GPU. A CPU dequantizes quantized models at load anyway.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

DEFAULT_DENSE_ROWS = 1
_dense_rows = DEFAULT_DENSE_ROWS


def set_dense_rows(rows: int) -> None:
    global _dense_rows
    _dense_rows = rows


def dense_rows() -> int:
    return _dense_rows


class _Dual(nn.Module):
    """Quantized weights kept as they are plus a dequantized copy: `matmul` (x @ W.T) takes
    the dense copy for inputs of at least `rows` rows, the quantized kernel below that."""

    def __init__(self, layer: nn.Module, rows: int, dtype: mx.Dtype) -> None:
        super().__init__()
        self.group_size, self.bits = layer.group_size, layer.bits
        self.mode = getattr(layer, "mode", "affine")
        self.rows = rows
        self.weight, self.scales = layer.weight, layer.scales
        self.biases = layer.get("biases")
        self.dense = mx.dequantize(
            layer.weight,
            layer.scales,
            self.biases,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        ).astype(dtype)

    def matmul(self, x: mx.array) -> mx.array:
        if x.size >= self.rows * x.shape[-1]:
            return x @ self.dense.T
        return mx.quantized_matmul(
            x,
            self.weight,
            self.scales,
            self.biases,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


class DualLinear(_Dual):
    """A quantized linear layer that also holds its weights dequantized (see the module doc)."""

    def __init__(self, layer: nn.QuantizedLinear, rows: int, dtype: mx.Dtype) -> None:
        super().__init__(layer, rows, dtype)
        if "bias" in layer:
            self.bias = layer.bias
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.matmul(x)
        return y + self.bias if "bias" in self else y


class DualEmbedding(_Dual):
    """A quantized embedding that is also the model's head (tied weights): the lookup stays
    quantized (a gather of a few rows), the head (`as_linear`) takes a dense copy for inputs of
    at least `rows` rows, as DualLinear does."""

    def __init__(self, layer: nn.QuantizedEmbedding, rows: int, dtype: mx.Dtype) -> None:
        super().__init__(layer, rows, dtype)
        self.num_embeddings = layer.weight.shape[0]
        self.dims = layer.weight.shape[1] * 32 // layer.bits
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        biases = self.get("biases")
        return mx.dequantize(
            self["weight"][x],
            scales=self["scales"][x],
            biases=biases[x] if biases is not None else None,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )

    def as_linear(self, x: mx.array) -> mx.array:
        return self.matmul(x)


def memory_from_info(info: dict) -> int:
    """The device's memory in bytes from `mx.device_info()`: Metal names it "memory_size",
    CUDA "total_memory" (MLX 0.32 on CUDA has no "memory_size": reading that key alone
    found 0 bytes there, so no dense copy was ever kept on a GPU); 0 = unknown (a CPU)."""
    for key in ("memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    return 0


def _device_memory_bytes() -> int:
    try:
        return memory_from_info(mx.device_info())
    except Exception:
        return 0


def add_dense_copies(
    model: nn.Module,
    *,
    rows: int,
    weights_bytes: int,
    memory_bytes: int | None = None,
    tied: bool = False,
) -> int:
    """Give every quantized linear layer of `model` a dense copy (in its scales' dtype) when
    they all fit in half of `memory_bytes` (None = the device's memory) beside the
    `weights_bytes` already loaded; `tied`: the quantized embeddings are the head too, and get
    one as well. Returns the bytes added (0: off, nothing quantized, no room)."""
    if rows <= 0:
        return 0
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding) if tied else (nn.QuantizedLinear,)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    if not layers:
        return 0
    extra = sum(
        m.weight.shape[0] * m.weight.shape[1] * 32 // m.bits * m.scales.dtype.size
        for _, m in layers
    )
    memory = _device_memory_bytes() if memory_bytes is None else memory_bytes
    if not memory or weights_bytes + extra > memory // 2:
        log.info(
            "quantized layers keep no dense copy: %.1f GiB more would not fit in half of %.1f GiB",
            extra / 2**30,
            memory / 2**30,
        )
        return 0
    replacements = [(name, _dual(m, rows)) for name, m in layers]
    mx.eval([d.dense for _, d in replacements])
    model.update_modules(_tree(replacements))
    log.info(
        "quantized layers keep a dense copy for inputs of %d rows or more (+%.1f GiB)",
        rows,
        extra / 2**30,
    )
    return extra


def _dual(layer: nn.Module, rows: int) -> nn.Module:
    kind = DualLinear if isinstance(layer, nn.QuantizedLinear) else DualEmbedding
    return kind(layer, rows, layer.scales.dtype)


def _tree(replacements: list[tuple[str, nn.Module]]) -> dict:
    """{"a.b.0.c": m} as the nested dict/list structure `update_modules` takes."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(replacements)


# Rows that make MLX 0.32's CUDA quantized matmul pick each of qmm_sm80's tiles (qmm_sm80.cu:
# max(16, min(64, next power of 2))); fewer than 8 rows take the precompiled qmv instead.
TILE_ROWS = (16, 32, 64)


def quantized_kinds(model: nn.Module) -> list[tuple[int, int, str, mx.Dtype]]:
    """(bits, group size, mode, activation dtype) of every quantized layer kind in `model`."""
    kinds: dict[tuple, tuple[int, int, str, mx.Dtype]] = {}
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding | DualLinear | DualEmbedding):
            mode = getattr(m, "mode", "affine")
            dtype = m.scales.dtype if mx.issubdtype(m.scales.dtype, mx.floating) else mx.bfloat16
            kinds[(m.bits, m.group_size, mode, str(dtype))] = (m.bits, m.group_size, mode, dtype)
    return list(kinds.values())


def compile_batched_kernels(model: nn.Module) -> list[tuple[int, int, str, mx.Dtype]]:
    """Run MLX's quantized matmul once per qmm_sm80 tile (TILE_ROWS) for each quantized kind of
    `model`, on a small matrix (the compiled kernel depends on the tile and the kind, not on
    the shape), so that NVRTC's first-use compile happens now; returns the kinds."""
    kinds = quantized_kinds(model)
    start = time.monotonic()
    for bits, group, mode, dtype in kinds:
        k = max(64, group)  # qmm_sm80 wants K divisible by max(64, group) and N by 128
        packed = mx.quantize(mx.random.normal((128, k)).astype(dtype), group, bits, mode=mode)
        weight, scales = packed[0], packed[1]
        biases = packed[2] if len(packed) > 2 else None
        for rows in TILE_ROWS:
            x = mx.random.normal((rows, k)).astype(dtype)
            mx.eval(
                mx.quantized_matmul(
                    x,
                    weight,
                    scales,
                    biases,
                    transpose=True,
                    group_size=group,
                    bits=bits,
                    mode=mode,
                )
            )
    if kinds:
        log.info(
            "MLX's batched quantized kernels ready for %s in %.1fs (compiled at first use on a "
            "machine, then cached)",
            ", ".join(f"{b}-bit group {g} {m}" for b, g, m, _ in kinds),
            time.monotonic() - start,
        )
    return kinds
