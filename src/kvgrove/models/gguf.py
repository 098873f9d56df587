"""GGUF files as mlx-lm models: config from the metadata, weights renamed to Hugging Face names.

`mx.load` reads GGUF natively: Q4_0, Q4_1 and Q8_0 tensors arrive as MLX affine-quantized triples
(weight, scales, biases; group size 32), F16/F32 as plain arrays. llama.cpp's converter permutes
the rows of the Q and K projections for its interleaved RoPE; we undo that so the weights are in
Hugging Face layout and mlx-lm's own architecture runs them unchanged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlx.core as mx

SUPPORTED_ARCHITECTURES = ("llama",)

_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|scales|biases|bias)$")
_TOP = re.compile(r"(\w+)\.(weight|scales|biases|bias)$")


def scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (mx.load returns 0-d arrays for numbers)."""
    value = metadata.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def config_from_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}); use a Hugging Face/MLX folder instead"
        )
    n_heads = int(scalar(metadata, f"{arch}.attention.head_count"))
    hidden = int(scalar(metadata, f"{arch}.embedding_length"))
    n_vocab = scalar(metadata, f"{arch}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(scalar(metadata, f"{arch}.block_count")),
        "intermediate_size": int(scalar(metadata, f"{arch}.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(scalar(metadata, f"{arch}.attention.head_count_kv", n_heads)),
        "rms_norm_eps": float(scalar(metadata, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(n_vocab),
        "rope_theta": float(scalar(metadata, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(scalar(metadata, f"{arch}.context_length", 2048)),
        "head_dim": int(
            scalar(metadata, f"{arch}.attention.key_length", None)
            or scalar(metadata, f"{arch}.rope.dimension_count", None)
            or hidden // n_heads
        ),
    }
    scaling = scalar(metadata, f"{arch}.rope.scaling.type")
    factor = scalar(metadata, f"{arch}.rope.scaling.factor")
    if scaling in ("linear", "yarn") and factor:
        config["rope_scaling"] = {"type": scaling, "factor": float(factor)}
    return config


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Inverse of llama.cpp's convert_hf_to_gguf `permute` (rows only, so it works on quantized
    weight, scales and biases alike)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def hf_weights(weights: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    """Rename GGUF tensors to Hugging Face names and undo the Q/K row permutation."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if m := _BLOCK.match(name):
            layer, part, suffix = m.groups()
            if part not in _BLOCK_NAMES:
                raise ValueError(f"unexpected GGUF tensor {name!r}")
            if part == "attn_q":
                value = _unpermute(value, config["num_attention_heads"])
            elif part == "attn_k":
                value = _unpermute(value, config["num_key_value_heads"])
            out[f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{suffix}"] = value
        elif (m := _TOP.match(name)) and m.group(1) in _TENSOR_NAMES:
            out[f"{_TENSOR_NAMES[m.group(1)]}.{m.group(2)}"] = value
        else:
            raise ValueError(f"unexpected GGUF tensor {name!r}")
    if "lm_head.weight" not in out:
        config["tie_word_embeddings"] = True
    else:
        config["tie_word_embeddings"] = False
    return out


def read_gguf(path: str | Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """(weights in Hugging Face names, config) plus the raw metadata in config['_gguf']."""
    weights, metadata = mx.load(str(path), return_metadata=True)
    config = config_from_metadata(metadata)
    return hf_weights(weights, config), {**config, "_gguf": metadata}
