"""Tiny random-weight models written twice: as a Hugging Face folder (mlx-lm's route) and as a
GGUF file (kvgrove's route) holding the same weights, written with llama.cpp's `gguf` writer the
way llama.cpp's convert_hf_to_gguf.py lays them out (Q/K rows permuted for llama, Gemma norms
stored as 1 + w, tensor names from gguf-py's tensor map).

"The same weights": for a lossy tensor type the folder holds what the GGUF dequantizes to, so
the two routes differ only by what kvgrove's reader does (renaming, un-permuting, config).
- F32/F16/BF16/Q8_0/Q4_0/Q4_1: `gguf.quants.quantize` writes the blocks.
- Q2_K..Q6_K: `gguf.quants.quantize` has no K-quant encoder (gguf 0.19's Q2_K..Q6_K classes
  define only `dequantize_blocks`; `quantize` raises NotImplementedError), so the blocks are
  random bytes (every bit pattern of the packed scales/quants is a valid block) with the f16
  super-block scales set so the weights have a sane spread; the folder gets
  `gguf.quants.dequantize` of those bytes.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import dequantize, quantize
from mlx.utils import tree_flatten

from tiny_models import _write_tokenizer

VOCAB = 320
_BASE = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
}
CONFIGS: dict[str, dict] = {
    "llama": {**_BASE, "model_type": "llama", "tie_word_embeddings": False},
    "qwen2": {**_BASE, "model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1e6},
    "qwen3": {**_BASE, "model_type": "qwen3", "tie_word_embeddings": False},
    "qwen3moe": {
        **_BASE,
        "model_type": "qwen3_moe",
        "tie_word_embeddings": False,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 256,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "gemma3": {
        **_BASE,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": 64,
        "sliding_window": 4,  # shorter than the test prompt: the sliding layers matter
        "sliding_window_pattern": 2,
    },
    "phi3": {**_BASE, "model_type": "phi3", "tie_word_embeddings": False},
}
ARCHES = tuple(CONFIGS)
EXACT_TYPES = ("F32", "F16", "BF16")
LEGACY_QUANTS = ("Q8_0", "Q4_0", "Q4_1")
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_TOP = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.switch_mlp.gate_proj": "ffn_gate_exps",
    "mlp.switch_mlp.up_proj": "ffn_up_exps",
    "mlp.switch_mlp.down_proj": "ffn_down_exps",
}
_GEMMA_BLOCK = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Byte offsets of the f16 super-block scales in each K-quant block (ggml-common.h).
_K_SCALE_OFFSETS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def gguf_name(hf: str, arch: str) -> str:
    prefix, _, suffix = hf.rpartition(".")
    if prefix in _TOP:
        return f"{_TOP[prefix]}.{suffix}"
    parts = prefix.split(".")
    assert parts[:2] == ["model", "layers"], hf
    rest = ".".join(parts[3:])
    table = {**_BLOCK, **_GEMMA_BLOCK} if arch == "gemma3" else _BLOCK
    return f"blk.{parts[2]}.{table[rest]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (works on rows of block bytes too)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def random_k_blocks(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Random valid `kind` blocks for a float tensor of `shape` (as uint8 rows), spread ~0.05."""
    qtype = GGMLQuantizationType[kind]
    from gguf.quants import quant_shape_to_byte_shape

    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    blocks = rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
    flat = blocks.reshape(
        -1, {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind]
    )

    def set_scale(value: float) -> None:
        for off in _K_SCALE_OFFSETS[kind]:
            flat[:, off : off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)

    set_scale(1.0)
    spread = float(np.std(dequantize(blocks, qtype)))
    set_scale(0.05 / spread)
    return blocks


def _encode(
    value: np.ndarray, kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(what the GGUF stores, the float32 values it decodes to)."""
    if kind == "F32":
        return value, value
    if kind == "F16":
        stored = value.astype(np.float16)
        return stored, stored.astype(np.float32)
    qtype = GGMLQuantizationType[kind]
    stored = random_k_blocks(value.shape, kind, rng) if kind in K_QUANTS else quantize(value, qtype)
    return stored, dequantize(stored, qtype).reshape(value.shape).astype(np.float32)


def _quantizable(hf_name: str, value: np.ndarray, kind: str) -> bool:
    """llama.cpp keeps 1-D tensors (norms, biases) and the MoE router in F32."""
    if kind == "F32" or value.ndim < 2 or hf_name.endswith("mlp.gate.weight"):
        return False
    block = 256 if kind in K_QUANTS else 32
    return value.shape[-1] % block == 0


def llama3_rope_factors(config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for a llama3 rope_scaling config."""
    scaling = config["rope_scaling"]
    base, dim = config["rope_theta"], config["head_dim"]
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # tiny, so most frequencies are scaled
}


def write_pair(
    root: Path,
    arch: str,
    kind: str,
    *,
    seed: int = 0,
    rope_scaling: dict | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> tuple[Path, Path]:
    """(HF folder, GGUF file) for a random `arch` model whose matrices are stored as `kind`."""
    config = dict(CONFIGS[arch])
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    params = {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}
    for k, v in params.items():  # default inits are too flat for decisive logits
        if v.ndim >= 2:
            params[k] = (rng.standard_normal(v.shape) * 0.05).astype(np.float32)
        elif k.endswith("norm.weight"):
            params[k] = (1.0 if arch != "gemma3" else 0.0) + rng.standard_normal(v.shape).astype(
                np.float32
            ) * 0.1
        else:
            params[k] = (rng.standard_normal(v.shape) * 0.05).astype(np.float32)

    folder = root / f"{arch}-{kind}-hf"
    folder.mkdir(parents=True)
    _write_tokenizer(folder)
    gguf_path = root / f"{arch}-{kind}.gguf"
    writer = GGUFWriter(str(gguf_path), arch)
    _write_metadata(writer, arch, config, folder)
    hf_weights: dict[str, np.ndarray] = {}
    for name, value in params.items():
        target = gguf_name(name, arch)
        stored_kind = kind if _quantizable(name, value, kind) else "F32"
        hf_order = value
        if arch == "gemma3" and name.endswith("norm.weight"):
            value = value + 1  # Gemma3Model.norm_shift
        stored, decoded = _encode(value, stored_kind, rng)
        if arch == "gemma3" and name.endswith("norm.weight"):
            decoded = decoded - 1
        hf_weights[name] = decoded if stored_kind != "F32" else hf_order
        if arch == "llama" and target.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            heads = config["num_attention_heads"]
            if "attn_k" in target:
                heads = config["num_key_value_heads"]
            stored = llama_cpp_permute(stored, heads)
        raw = None if stored_kind in ("F32", "F16") else GGMLQuantizationType[stored_kind]
        writer.add_tensor(target, stored, raw_dtype=raw)
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    mx.save_safetensors(
        str(folder / "model.safetensors"), {k: mx.array(v) for k, v in hf_weights.items()}
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder, gguf_path


def _write_metadata(writer: GGUFWriter, arch: str, config: dict, folder: Path) -> None:
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["head_dim"])
    if arch == "qwen3moe":
        writer.add_expert_count(config["num_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if arch == "gemma3":
        writer.add_sliding_window(config["sliding_window"])
        writer.add_uint32(
            "gemma3.attention.sliding_window_pattern", config["sliding_window_pattern"]
        )

    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == VOCAB
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    added = {t["content"] for t in tok["added_tokens"]}
    types = [
        TokenType.CONTROL
        if t in special
        else TokenType.USER_DEFINED
        if t in added
        else TokenType.NORMAL
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok_config["chat_template"])
