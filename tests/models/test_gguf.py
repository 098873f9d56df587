"""Every GGUF architecture and tensor type kvgrove reads, against mlx-lm's folder route on the
same weights (see gguf_files.py for how the pair is written)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from gguf_files import ARCHES, EXACT_TYPES, K_QUANTS, LEGACY_QUANTS, LLAMA3_ROPE, write_pair
from kvgrove.models import loading
from kvgrove.models.gguf import read_gguf

PROMPT = "The capital of France is Paris. hello world"


def _logits(lm: loading.LoadedModel, ids: list[int]) -> mx.array:
    return lm.model(mx.array([ids]))[0].astype(mx.float32)


def _both(tmp_path, arch: str, kind: str, **kw):
    folder, path = write_pair(tmp_path, arch, kind)
    ref = loading.load(folder, dequantize=True)
    ours = loading.load(path, **kw)
    return ref, ours


@pytest.mark.parametrize("arch", ARCHES)
def test_each_architecture_matches_the_folder_route(tmp_path, arch):
    ref, ours = _both(tmp_path, arch, "F32")
    assert ours.info.source_format == "gguf"
    assert ours.info.architecture == ref.info.architecture
    assert ours.info.num_layers == ref.info.num_layers
    assert ours.info.parameters == ref.info.parameters
    ids = ref.tokenizer.encode(PROMPT)
    assert ours.tokenizer.encode(PROMPT) == ids
    assert len(ids) > 8  # longer than gemma3's sliding window (4)
    messages = [{"role": "user", "content": "hi"}]
    assert ours.tokenizer.apply_chat_template(messages) == ref.tokenizer.apply_chat_template(
        messages
    )
    assert ours.tokenizer.eos_ids == ref.tokenizer.eos_ids
    diff = float(mx.abs(_logits(ref, ids) - _logits(ours, ids)).max())
    assert diff < 1e-3, diff


@pytest.mark.parametrize("kind", EXACT_TYPES + LEGACY_QUANTS + K_QUANTS)
@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_each_tensor_type_matches_the_folder_route(tmp_path, arch, kind):
    """On CPU every type becomes float32 and agrees with the folder holding the decoded values
    to < 1e-3 (K-quants included: both routes see the same decoded weights)."""
    ref, ours = _both(tmp_path, arch, kind)
    assert ours.info.dtype == "float32"
    assert ours.info.quantization is None
    assert kind in ours.info.tensor_types
    assert ours.info.tensor_types[kind].endswith("model in float32")
    ids = ref.tokenizer.encode(PROMPT)
    ref_logits, our_logits = _logits(ref, ids), _logits(ours, ids)
    assert float(mx.abs(ref_logits - our_logits).max()) < 1e-3
    assert mx.array_equal(mx.argmax(ref_logits, -1), mx.argmax(our_logits, -1))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "BF16"])
def test_gguf_reader_reports_each_tensor_type(tmp_path, kind):
    _, path = write_pair(tmp_path, "qwen3", kind)
    read = read_gguf(path)
    assert set(read.tensor_types) == {kind, "F32"}  # norms stay F32, as llama.cpp writes them
    what = read.tensor_types[kind]
    assert what.endswith("read as bfloat16 (gguf)" if kind == "BF16" else "to float32 (gguf)")
    assert read.weights["model.embed_tokens.weight"].dtype == (
        mx.bfloat16 if kind == "BF16" else mx.float32
    )


@pytest.mark.parametrize(("kind", "bits"), [("Q4_K", 4), ("Q6_K", 8), ("Q2_K", 4), ("Q4_0", 4)])
def test_kept_quantized_requantizes_to_mlx_affine(tmp_path, kind, bits):
    """The GPU policy (forced here with dequantize=False): K-quants become MLX affine 4/8-bit
    (group 32); Q4_0 arrives from mx.load already affine. Stated bound: the logits move from
    float no more than 1.5x as far as MLX's own quantization (same bits, group 32) of the float
    folder moves them (the peer, run alongside)."""
    ref, ours = _both(tmp_path, "llama", kind, dequantize=False)
    assert ours.info.quantization is not None
    assert f"Q{bits}" in ours.info.quantization
    kinds = {type(m) for _, m in ours.model.named_modules()}
    assert nn.QuantizedLinear in kinds
    if kind in K_QUANTS:
        assert f"re-quantized to MLX affine Q{bits} (group 32)" in ours.info.tensor_types[kind]
    ids = ref.tokenizer.encode(PROMPT)
    expected = _logits(ref, ids)
    nn.quantize(ref.model, group_size=32, bits=bits)
    peer = float(mx.abs(_logits(ref, ids) - expected).max())
    diff = float(mx.abs(_logits(ours, ids) - expected).max())
    assert diff <= 1.5 * peer, (diff, peer)


def test_llama3_rope_scaling_arrives_through_rope_freqs(tmp_path):
    """Llama 3.x GGUFs carry their rope scaling as llama.cpp's per-frequency `rope_freqs`
    tensor; the folder route runs mlx-lm's Llama3RoPE from the config."""
    folder, path = write_pair(tmp_path, "llama", "F32", rope_scaling=LLAMA3_ROPE)
    ref, ours = loading.load(folder), loading.load(path)
    ids = ref.tokenizer.encode(PROMPT * 3)  # positions past the "original" context (16)
    diff = float(mx.abs(_logits(ref, ids) - _logits(ours, ids)).max())
    assert diff < 1e-3, diff
    plain = loading.load(write_pair(tmp_path / "plain", "llama", "F32")[1])
    assert float(mx.abs(_logits(plain, ids) - _logits(ours, ids)).max()) > 1e-2


def test_a_vision_tower_in_the_file_is_left_out(tmp_path):
    """Ollama's gemma3 GGUFs hold the vision encoder too (v.*, mm.*): text serving skips it."""
    import numpy as np

    vision = {
        "v.blk.0.attn_q.weight": np.ones((8, 8), np.float32),
        "mm.input_projection.weight": np.ones((8, 8), np.float32),
    }
    folder, path = write_pair(tmp_path, "gemma3", "F32", extra_tensors=vision)
    ref, ours = loading.load(folder), loading.load(path)
    ids = ref.tokenizer.encode(PROMPT)
    assert float(mx.abs(_logits(ref, ids) - _logits(ours, ids)).max()) < 1e-3


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "x.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'mamba' is not supported"):
        loading.load(path)


def test_load_reports_progress_tensor_by_tensor(tmp_path):
    _, path = write_pair(tmp_path, "qwen3", "Q4_K")
    seen: list[float] = []
    loading.load(path, progress=seen.append)
    assert len(seen) > 10  # one report per tensor, then done
    assert seen == sorted(seen) and seen[-1] == 1.0
