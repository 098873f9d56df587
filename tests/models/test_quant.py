"""Quantized layers with a dense copy (kvgrove.models.quant): the same answers either way."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load_model

from kvgrove.models.quant import (
    DEFAULT_DENSE_ROWS,
    TILE_ROWS,
    DualEmbedding,
    DualLinear,
    add_dense_copies,
    compile_batched_kernels,
    memory_from_info,
    quantized_kinds,
)
from tiny_models import write_tiny_model


def _quantized_model(tmp_path):
    model, _ = load_model(write_tiny_model(tmp_path / "q", "llama", quantized=True))
    return model


def _logits(model, rows: int) -> np.ndarray:
    tokens = mx.array([[5, 17, 42, 99, 7, 3][:rows]], dtype=mx.uint32)
    return np.array(model(tokens)[0].astype(mx.float32))


def test_a_dual_layer_matches_the_quantized_kernel_on_both_sides_of_its_threshold():
    mx.random.seed(1)
    layer = nn.QuantizedLinear(64, 96, bias=True, group_size=32, bits=4)
    dual = DualLinear(layer, rows=3, dtype=mx.float32)
    for rows in (1, 2, 3, 8):  # below the threshold: the quantized kernel; from 3: dense
        x = mx.random.normal((rows, 64))
        np.testing.assert_allclose(np.array(dual(x)), np.array(layer(x)), rtol=1e-4, atol=1e-4)


def test_dense_copies_where_they_fit_and_none_where_they_do_not(tmp_path):
    model = _quantized_model(tmp_path)
    before = {rows: _logits(model, rows) for rows in (1, 6)}
    assert add_dense_copies(model, rows=4, weights_bytes=0, memory_bytes=1000) == 0
    assert not any(isinstance(m, DualLinear) for _, m in model.named_modules())
    added = add_dense_copies(model, rows=4, weights_bytes=0, memory_bytes=2**34)
    duals = [m for _, m in model.named_modules() if isinstance(m, DualLinear)]
    assert added > 0 and duals and added == sum(d.dense.nbytes for d in duals)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    for rows, logits in before.items():  # 1 row: the quantized kernel; 6 rows: the dense copy
        np.testing.assert_allclose(_logits(model, rows), logits, rtol=1e-3, atol=1e-3)
    assert add_dense_copies(model, rows=0, weights_bytes=0, memory_bytes=2**34) == 0


def test_the_device_memory_is_read_from_metal_and_cuda_device_info():
    # MLX 0.32 on CUDA names it "total_memory" (Metal: "memory_size"); reading only Metal's
    # key found 0 bytes on CUDA, so no dense copy was ever kept there.
    assert memory_from_info({"memory_size": 96 * 2**30}) == 96 * 2**30
    cuda = {"total_memory": 150754820096, "free_memory": 149557477376, "architecture": "sm_90"}
    assert memory_from_info(cuda) == 150754820096
    assert memory_from_info({"architecture": "x86_64", "device_name": "AMD EPYC"}) == 0


def test_by_default_every_input_takes_the_dense_copy_with_the_quantized_kernels_output(tmp_path):
    assert DEFAULT_DENSE_ROWS == 1  # measured faster on an H200 at every batch size (module doc)
    model = _quantized_model(tmp_path)
    before = {rows: _logits(model, rows) for rows in (1, 2, 6)}
    layers = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    added = add_dense_copies(model, rows=DEFAULT_DENSE_ROWS, weights_bytes=0, memory_bytes=2**34)
    duals = [m for _, m in model.named_modules() if isinstance(m, DualLinear)]
    assert added > 0 and len(duals) == len(layers) and all(d.rows == 1 for d in duals)
    for rows, logits in before.items():  # one row too: the dense copy
        np.testing.assert_allclose(_logits(model, rows), logits, rtol=1e-3, atol=1e-3)


def test_the_batched_kernels_are_run_once_per_tile_for_each_quantized_kind(tmp_path):
    model = _quantized_model(tmp_path)
    kinds = quantized_kinds(model)
    assert kinds and all(k[:3] == (4, 32, "affine") for k in kinds)  # the tiny model's kind
    assert compile_batched_kernels(model) == kinds
    assert TILE_ROWS == (16, 32, 64)
    add_dense_copies(model, rows=1, weights_bytes=0, memory_bytes=2**34)
    assert quantized_kinds(model) == kinds  # dual layers keep their quantized kind


def test_a_tied_quantized_embedding_keeps_its_lookup_and_gets_a_dense_head(tmp_path):
    model, _ = load_model(write_tiny_model(tmp_path / "tied", "qwen3", quantized=True))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert not any(name.endswith("lm_head") for name, _ in model.named_modules())
    before = {rows: _logits(model, rows) for rows in (1, 6)}
    untied = add_dense_copies(model, rows=1, weights_bytes=0, memory_bytes=2**34)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)  # tied=False: left alone
    embed = model.model.embed_tokens
    model, _ = load_model(write_tiny_model(tmp_path / "tied2", "qwen3", quantized=True))
    added = add_dense_copies(model, rows=4, weights_bytes=0, memory_bytes=2**34, tied=True)
    dual = model.model.embed_tokens
    assert isinstance(dual, DualEmbedding) and added == untied + dual.dense.nbytes
    ids = mx.array([[3, 17, 99]], dtype=mx.uint32)
    np.testing.assert_array_equal(np.array(dual(ids)), np.array(embed(ids)))  # the same lookup
    for rows, logits in before.items():  # 1 row: the quantized head; 6 rows: the dense one
        np.testing.assert_allclose(_logits(model, rows), logits, rtol=1e-3, atol=1e-3)
    x = mx.random.normal((5, dual.dims))
    np.testing.assert_allclose(
        np.array(dual.as_linear(x)), np.array(embed.as_linear(x)), rtol=1e-3, atol=1e-3
    )
