"""kvgrove's GGUF route against mlx-lm's own llama implementation on the same weights.

The reference is built independently of kvgrove's GGUF renaming and un-permutation: it keeps
llama.cpp's permuted Q/K rows and runs mlx-lm's llama with interleaved ("traditional") RoPE,
which is what that permutation was made for. Agreement means our un-permutation is exact.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.utils import dequantize_model, infer_quant_config

from kvgrove.models import bundled
from kvgrove.models.caches import make_cache
from kvgrove.models.generate import prefill_chunks

RENAME = {
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


def reference_model() -> llama.Model:
    weights, meta = mx.load(str(bundled.SMOLLM2.path), return_metadata=True)
    renamed = {}
    for name, value in weights.items():
        parts = name.split(".")
        if parts[0] == "blk":
            renamed[f"model.layers.{parts[1]}.{RENAME[parts[2]]}.{parts[3]}"] = value
        else:
            top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}[parts[0]]
            renamed[f"{top}.{parts[1]}"] = value
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"].item()),
        vocab_size=49152,
        rope_theta=100000.0,
        rope_traditional=True,
        tie_word_embeddings=True,
    )
    model = llama.Model(args)
    nn.quantize(
        model,
        class_predicate=lambda p, m: (
            hasattr(m, "to_quantized")
            and f"{p}.scales" in renamed
            and infer_quant_config(p, m, renamed)
        ),
    )
    model.load_weights(list(renamed.items()))
    model.set_dtype(mx.float32)  # dequantize in float32, as llama.cpp does
    model = dequantize_model(model)
    return model


def test_logits_match_mlx_lm_llama(default_model):
    tok = default_model.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Write a haiku about the sea, then explain it."}]
    )
    ids = tok.encode(text)
    reference = reference_model()
    expected = reference(mx.array([ids]))[0]
    ours = default_model.model(mx.array([ids]))[0]
    assert float(mx.abs(expected - ours).max()) < 1e-3
    # And through kvgrove's cache, prefilled in uneven chunks, then one decode step.
    cache = make_cache(default_model.model)
    list(prefill_chunks(default_model.model, cache, ids[:-1], chunk_tokens=7))
    last = default_model.model(mx.array([ids[-1:]]), cache=cache)[0, -1]
    assert float(mx.abs(expected[-1] - last).max()) < 1e-3
