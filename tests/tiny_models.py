"""Tiny random-weight models written as Hugging Face folders (config.json + safetensors + a
tokenizer.json), so tests exercise the real loading path without downloading anything."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import quantize_model

from kvgrove.models.caches import make_cache
from kvgrove.models.generate import prefill_chunks

VOCAB = 320  # 256 byte tokens + merges + specials, padded with <extra_i> to exactly this

_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": VOCAB,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

CONFIGS: dict[str, dict] = {
    "llama": _LLAMA,
    "qwen3": {
        "model_type": "qwen3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
    },
    "qwen3_next": {
        "model_type": "qwen3_next",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 64,
        "mlp_only_layers": [],
        "moe_intermediate_size": 64,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": 512,
        "full_attention_interval": 4,
    },
    "glm4_moe_lite": {
        "model_type": "glm4_moe_lite",
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "n_shared_experts": 1,
        "n_routed_experts": 4,
        "kv_lora_rank": 64,
        "q_lora_rank": 64,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 512,
        "num_nextn_predict_layers": 0,
    },
    # Sliding-window attention (mlx-lm's RotatingKVCache) with a window short enough that the
    # ring buffer wraps in a test conversation; mlx-lm's llama needs one full-attention layer.
    "window": {
        **_LLAMA,
        "num_hidden_layers": 3,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    },
    # gemma3-style mixed layers: two local (window 16) layers, then one global, repeating.
    "gemma3": {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "sliding_window": 16,
        "sliding_window_pattern": 3,
        "max_position_embeddings": 512,
    },
}

ARCHITECTURES = tuple(CONFIGS)
# Not in ARCHITECTURES: a llama whose 3 heads (1 KV head) do not split over 2 ranks, as the
# bundled SmolLM2's 9 (3) do not (tensor parallel splits its MLP only).
CONFIGS["llama_3heads"] = {**CONFIGS["llama"], "num_attention_heads": 3, "num_key_value_heads": 1}
CONFIGS["llama_3heads"]["head_dim"] = 16


def _write_tokenizer(folder: Path, chat_template: str | None = None) -> None:
    """A byte-level BPE tokenizer.json with ChatML specials (built with `tokenizers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["The capital of France is Paris.", "hello world " * 4, "def f(x): return x"] * 20
    tok.train_from_iterator(corpus, trainer)
    # Pad to the model's vocabulary, so every id the model can emit decodes.
    missing = VOCAB - tok.get_vocab_size()
    tok.add_tokens([f"<extra_{i}>" for i in range(missing)])
    assert tok.get_vocab_size() == VOCAB
    tok.save(str(folder / "tokenizer.json"))
    template = chat_template or (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "chat_template": template,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


def write_tiny_model(
    folder: Path,
    arch: str,
    *,
    quantized: bool = False,
    seed: int = 0,
    vocab_size: int | None = None,
    chat_template: str | None = None,
    context_length: int | None = None,
) -> Path:
    """Write a random-weight `arch` model (optionally 4-bit) as a Hugging Face folder.

    `vocab_size` larger than the tokenizer's (320) makes a model that can emit ids the tokenizer
    cannot decode (for error-path tests). `chat_template` replaces the plain ChatML one
    (tests/chat_templates.py holds real models' templates); `context_length` the 512 positions."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIGS[arch])
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    if context_length is not None:
        config["max_position_embeddings"] = context_length
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Default inits give near-uniform logits; scale embeddings up so greedy decoding is decisive.
    params = dict(tree_flatten(model.parameters()))
    mx.eval(params)
    if quantized:
        model, config = quantize_model(model, config, group_size=32, bits=4)
        params = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), params)
    (folder / "config.json").write_text(json.dumps(config))
    _write_tokenizer(folder, chat_template)
    return folder


def write_decodable_llama(folder: Path) -> Path:
    """The tiny llama, its tokenizer padded to the model's 320 ids so every token decodes."""
    write_tiny_model(folder, "llama")
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    ids = [*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]
    have = max(ids) + 1
    for i in range(have, VOCAB):
        tok["added_tokens"].append(
            {
                "id": i,
                "content": f"<pad{i}>",
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    path.write_text(json.dumps(tok))
    return folder


def prefilled(model, tokens, chunk_tokens: int = 64) -> list:
    """A fresh live cache of `model` holding `tokens`."""
    cache = make_cache(model)
    for _ in prefill_chunks(model, cache, tokens, chunk_tokens=chunk_tokens):
        pass
    return cache


class ShapeLogging:
    """A model that appends each forward pass's input shape to `shapes`, then runs `model`."""

    def __init__(self, model, shapes: list) -> None:
        self._model, self._shapes = model, shapes

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, inputs, cache=None):
        self._shapes.append(tuple(inputs.shape))
        return self._model(inputs, cache=cache)
