"""GGUF files as mlx-lm models: config from the metadata, weights renamed to Hugging Face names.

Two readers, by tensor type:
- every tensor F32/F16/Q4_0/Q4_1/Q8_0: `mx.load`, which returns Q4_0/Q4_1/Q8_0 as MLX affine
  triples (weight, scales, biases; group 32) exactly, and F16/F32 as plain arrays;
- anything else (BF16, the K-quants Q2_K..Q6_K, Q5_0/Q5_1, ...): llama.cpp's own reader, the
  `gguf` package (`GGUFReader` + `gguf.quants.dequantize`), one tensor at a time, to float32;
  then, when the caller wants the model kept small (GPU/Metal, or too big for float32), each
  matrix is re-quantized to MLX affine 4-bit (8-bit for Q5/Q6/Q8 sources), group 32.

llama.cpp's converter permutes the Q/K rows of llama-family models for its interleaved RoPE and
adds 1 to Gemma's RMSNorm weights; we undo both, so the weights are in Hugging Face layout and
mlx-lm's own architecture runs them unchanged. `GGUFRead.tensor_types` records, per GGUF tensor
type, how many tensors there were and what was done with them (`kvgrove show` prints it).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from kvgrove.tokenize.gguf_meta import read_gguf_metadata

# GGUF general.architecture -> mlx-lm model module.
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
SUPPORTED_ARCHITECTURES = tuple(MODEL_TYPES)
# Architectures whose converter permuted Q/K rows (llama.cpp's LlamaModel.permute).
_PERMUTED = {"llama", "mistral"}
_NATIVE_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # what mx.load reads
_EIGHT_BIT_SOURCES = {"Q8_0", "Q8_1", "Q8_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K"}

_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
_ARCH_BLOCK_NAMES = {
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"ffn_up": "mlp.gate_up_proj"},
}
_CONFIG_TENSORS = {"rope_factors_long", "rope_factors_short", "rope_freqs"}
_SKIPPED_PREFIXES = ("v.", "mm.")
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"(\w+)\.(weight|scales|biases|bias)$")


@attrs.frozen
class GGUFRead:
    weights: dict[str, mx.array]  # Hugging Face names
    config: dict[str, Any]  # mlx-lm config
    metadata: dict[str, Any]  # the raw GGUF key/values
    tensor_types: dict[str, str]  # GGUF type -> "N tensors: what happened"


def scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (mx.load returns 0-d arrays for numbers)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array | np.ndarray):
        return value.item() if value.ndim == 0 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def config_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch not in MODEL_TYPES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); use a Hugging Face/MLX folder instead"
        )

    def get(key: str, default: Any = None) -> Any:
        return scalar(metadata, f"{arch}.{key}", default)

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    n_vocab = get("vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads)
    config: dict[str, Any] = {
        "model_type": MODEL_TYPES[arch],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length", 0) or 0),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(n_vocab),
        "rope_theta": float(get("rope.freq_base") or get("rope.global.freq_base") or 10000.0),
        "max_position_embeddings": int(get("context_length", 2048)),
        "head_dim": head_dim,
    }
    scaling = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if scaling in ("linear", "yarn") and factor:
        config["rope_scaling"] = {"type": scaling, "factor": float(factor)}
        if scaling == "yarn":
            original = get("rope.scaling.original_context_length")
            if original:
                config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    if arch == "qwen3moe":
        config |= {
            "num_experts": int(get("expert_count")),
            "num_experts_per_tok": int(get("expert_used_count")),
            "moe_intermediate_size": int(get("expert_feed_forward_length")),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,  # llama.cpp's qwen3moe graph always renormalizes
        }
        if not config["intermediate_size"]:
            config["intermediate_size"] = config["moe_intermediate_size"]
    elif arch == "gemma3":
        big = config["num_hidden_layers"] == 62  # llama.cpp: the 27B scales by n_embd/n_head
        pattern = get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per-layer flags (True = sliding): period of the pattern
            pattern = next((i + 1 for i, swa in enumerate(pattern) if not swa), len(pattern))
        config |= {
            "query_pre_attn_scalar": hidden // n_heads if big else head_dim,
            "sliding_window": int(get("attention.sliding_window", 512)),
            "sliding_window_pattern": int(pattern),
            # llama.cpp's fixed value for the sliding layers; Ollama's converter writes it.
            "rope_local_base_freq": float(get("rope.local.freq_base", 10000.0)),
        }
        if scaling == "linear" and factor:
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif arch == "phi3":
        rope_dim = get("rope.dimension_count")
        if rope_dim:
            config["partial_rotary_factor"] = int(rope_dim) / head_dim
        original = get("rope.scaling.original_context_length")
        if original:
            config["original_max_position_embeddings"] = int(original)
    return config


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` (rows only, so it works on quantized
    weight, scales and biases alike)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_weights(
    weights: dict[str, mx.array], config: dict[str, Any], arch: str = "llama"
) -> dict[str, mx.array]:
    """Rename GGUF tensors to Hugging Face names and undo the converter's transformations."""
    names = {**_BLOCK_NAMES, **_ARCH_BLOCK_NAMES.get(arch, {})}
    out: dict[str, mx.array] = {}
    rope_factors: dict[str, list[float]] = {}
    for name, value in weights.items():
        if m := _BLOCK.match(name):
            layer, part, suffix = m.groups()
            if part not in names:
                raise ValueError(f"unexpected GGUF tensor {name!r} for architecture {arch!r}")
            if arch in _PERMUTED and part == "attn_q":
                value = _unpermute(value, config["num_attention_heads"])
            elif arch in _PERMUTED and part == "attn_k":
                value = _unpermute(value, config["num_key_value_heads"])
            if arch == "gemma3" and part.endswith("norm"):
                value = value - 1
            out[f"model.layers.{layer}.{names[part]}.{suffix}"] = value
        elif (m := _TOP.match(name)) and m.group(1) in _TENSOR_NAMES:
            if arch == "gemma3" and m.group(1) == "output_norm":
                value = value - 1
            out[f"{_TENSOR_NAMES[m.group(1)]}.{m.group(2)}"] = value
        elif name.startswith(_SKIPPED_PREFIXES):
            continue  # a vision tower in the same file (Ollama's gemma3): kvgrove serves text
        elif (m := _TOP.match(name)) and m.group(1) in _CONFIG_TENSORS:
            rope_factors[m.group(1)] = value.astype(mx.float32).tolist()
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r} for architecture {arch!r}")
    if "rope_freqs" in rope_factors:  # llama3-style scaling, baked per frequency by the converter
        config["_rope_freqs"] = rope_factors.pop("rope_freqs")
    if "rope_factors_long" in rope_factors and "rope_factors_short" in rope_factors:
        config["rope_scaling"] = {
            "type": "longrope",
            "long_factor": rope_factors["rope_factors_long"],
            "short_factor": rope_factors["rope_factors_short"],
        }
    elif rope_factors:
        raise ValueError(f"GGUF rope factor tensors {sorted(rope_factors)} are not supported")
    config["tie_word_embeddings"] = "lm_head.weight" not in out
    return out


def _requantize_spec(type_name: str, value: np.ndarray) -> tuple[int, int] | None:
    """(bits, group size) to re-quantize a dequantized tensor, None to keep it float."""
    if value.ndim < 2:
        return None
    bits = 8 if type_name in _EIGHT_BIT_SOURCES else 4
    # Group 32, the size of a K-quant sub-block: a group never straddles two sub-block scales
    # (Q2_K/Q3_K/Q6_K sub-blocks are 16, so two share a group).
    return (bits, 32) if value.shape[-1] % 32 == 0 else None


def _read_with_gguf(
    path: Path, requantize: bool, progress: Callable[[float], None] | None = None
) -> tuple[dict[str, mx.array], dict[str, str]]:
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    weights: dict[str, mx.array] = {}
    counts: Counter[str] = Counter()
    actions: dict[str, set[str]] = {}
    total = max(1, sum(int(t.n_bytes) for t in reader.tensors))
    done = 0
    for tensor in reader.tensors:
        done += int(tensor.n_bytes)
        if progress is not None:
            progress(done / total)
        qtype = GGMLQuantizationType(tensor.tensor_type)
        kind = qtype.name
        counts[kind] += 1
        data = np.asarray(tensor.data)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            value = data.reshape(tuple(reversed(tensor.shape.tolist())))
            weights[tensor.name] = mx.array(value)
            actions.setdefault(kind, set()).add("read as is")
            continue
        try:
            value = dequantize(data, qtype)
        except NotImplementedError as exc:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has type {kind}, which the gguf package cannot "
                "dequantize"
            ) from exc
        value = value.reshape(tuple(reversed(tensor.shape.tolist()))).astype(np.float32)
        spec = _requantize_spec(kind, value) if requantize and kind != "BF16" else None
        base = tensor.name.rsplit(".", 1)[0]
        if spec is None:
            if kind == "BF16":
                weights[tensor.name] = mx.array(value).astype(mx.bfloat16)
                actions.setdefault(kind, set()).add("read as bfloat16 (gguf)")
            else:
                weights[tensor.name] = mx.array(value)
                actions.setdefault(kind, set()).add("dequantized to float32 (gguf)")
            continue
        bits, group = spec
        w, scales, biases = mx.quantize(mx.array(value), group_size=group, bits=bits)
        mx.eval(w, scales, biases)
        weights[f"{base}.weight"], weights[f"{base}.scales"] = w, scales
        weights[f"{base}.biases"] = biases
        actions.setdefault(kind, set()).add(
            f"dequantized (gguf), re-quantized to MLX affine Q{bits} (group {group})"
        )
    report = {
        kind: f"{counts[kind]} tensors: {'; '.join(sorted(actions[kind]))}" for kind in counts
    }
    return weights, report


def gguf_summary(path: str | Path) -> tuple[Counter[str], int]:
    """(tensor count per GGUF type, total elements) without reading tensor data."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path))
    types = Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    return types, sum(int(t.n_elements) for t in reader.tensors)


def read_gguf(
    path: str | Path,
    *,
    requantize: bool = False,
    progress: Callable[[float], None] | None = None,
) -> GGUFRead:
    """Weights (Hugging Face names), config, metadata and what happened to each tensor type.

    requantize: for tensors that need the `gguf` dequantizer, re-quantize the float32 result to
    MLX affine 4/8-bit (otherwise they stay float32). progress: called with the fraction of
    tensor bytes read so far (the `gguf` route reads tensor by tensor)."""
    path = Path(path)
    metadata = read_gguf_metadata(path)
    config = config_from_metadata(metadata)
    types, _ = gguf_summary(path)
    if set(types) <= _NATIVE_TYPES:
        weights = mx.load(str(path), format="gguf")
        report = {
            kind: f"{n} tensors: "
            + (
                "read as is (mx.load)"
                if kind in ("F32", "F16")
                else "read as MLX affine, group 32 (mx.load)"
            )
            for kind, n in types.items()
        }
    else:
        weights, report = _read_with_gguf(path, requantize, progress)
    arch = str(metadata["general.architecture"])
    return GGUFRead(hf_weights(weights, config, arch), config, metadata, report)


class FactorRoPE(nn.Module):
    """RoPE with llama.cpp's per-frequency factors (the `rope_freqs` tensor): the period of each
    rotary pair is multiplied by its factor, which is how llama3's rope scaling reaches a GGUF.
    Equal to mlx-lm's Llama3RoPE for factors computed from the same scaling config."""

    def __init__(self, dims: int, base: float, factors: list[float], traditional: bool) -> None:
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        periods = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        self._freqs = periods * mx.array(factors, dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def apply_rope_factors(model: nn.Module, config: dict[str, Any]) -> None:
    """Swap each attention's RoPE for a FactorRoPE when the GGUF carried `rope_freqs`."""
    factors = config.pop("_rope_freqs", None)
    if factors is None:
        return
    for _, module in model.named_modules():
        rope = getattr(module, "rope", None)
        if isinstance(rope, nn.Module) and hasattr(rope, "dims"):
            if len(factors) != rope.dims // 2:
                raise ValueError(
                    f"GGUF rope_freqs has {len(factors)} factors for rotary dims {rope.dims}"
                )
            module.rope = FactorRoPE(
                rope.dims, config["rope_theta"], factors, bool(getattr(rope, "traditional", False))
            )
