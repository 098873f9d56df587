"""Quantized models on a GPU: a dequantized copy of each quantized layer for batched work.

MLX's quantized matmul on CUDA reads 4-bit weights fast for one row (the `qmv` kernel, batch-1
decode) but gains little from more rows: MLX's own batched decode loop on an H200 (Llama-3.1-8B
shape, 4-bit, group 64) makes 86 / 256 / 302 / 310 tok/s at batch 1 / 8 / 32 / 64, against 92 /
527 / 2,155 / 3,661 in bf16 (benchmarks/gpu_quant.py measures the matmuls alone). So where
memory allows, each quantized linear layer also keeps its weights dequantized (`DualLinear`):
inputs of at least `rows` rows (a batched decode step, a prefill chunk) take the dense matmul,
fewer rows the quantized kernel. The dense copy costs 16 / bits times the quantized weights'
memory, so it is kept only while the model's weights then take at most half the device's
memory; the weights' charge includes it.

`set_dense_rows` is the process's policy (serve sets it from `Settings.quantized_dense_rows`;
0 = off); loading applies it on a GPU. A CPU dequantizes quantized models at load anyway.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

DEFAULT_DENSE_ROWS = 8
_dense_rows = DEFAULT_DENSE_ROWS


def set_dense_rows(rows: int) -> None:
    global _dense_rows
    _dense_rows = rows


def dense_rows() -> int:
    return _dense_rows


class DualLinear(nn.Module):
    """A quantized linear layer that also holds its weights dequantized (see the module doc)."""

    def __init__(self, layer: nn.QuantizedLinear, rows: int, dtype: mx.Dtype) -> None:
        super().__init__()
        self.group_size, self.bits = layer.group_size, layer.bits
        self.mode = getattr(layer, "mode", "affine")
        self.rows = rows
        self.weight, self.scales = layer.weight, layer.scales
        self.biases = layer.get("biases")
        if "bias" in layer:
            self.bias = layer.bias
        self.dense = mx.dequantize(
            layer.weight,
            layer.scales,
            self.biases,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        ).astype(dtype)
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        if x.size >= self.rows * x.shape[-1]:
            y = x @ self.dense.T
        else:
            y = mx.quantized_matmul(
                x,
                self.weight,
                self.scales,
                self.biases,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
            )
        return y + self.bias if "bias" in self else y


def _device_memory_bytes() -> int:
    try:
        return int(mx.device_info().get("memory_size", 0))
    except Exception:
        return 0


def add_dense_copies(
    model: nn.Module, *, rows: int, weights_bytes: int, memory_bytes: int | None = None
) -> int:
    """Give every quantized linear layer of `model` a dense copy (in its scales' dtype) when
    they all fit in half of `memory_bytes` (None = the device's memory) beside the
    `weights_bytes` already loaded; returns the bytes added (0: off, nothing quantized, no
    room)."""
    if rows <= 0:
        return 0
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
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
    replacements = [(name, DualLinear(m, rows, m.scales.dtype)) for name, m in layers]
    mx.eval([d.dense for _, d in replacements])
    model.update_modules(_tree(replacements))
    log.info(
        "quantized layers keep a dense copy for inputs of %d rows or more (+%.1f GiB)",
        rows,
        extra / 2**30,
    )
    return extra


def _tree(replacements: list[tuple[str, nn.Module]]) -> dict:
    """{"a.b.0.c": m} as the nested dict/list structure `update_modules` takes."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(replacements)
