from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from kvgrove.models import bundled, loading
from kvgrove.models.caches import RecurrentCache, SpanKVCache, make_cache
from kvgrove.models.generate import generate
from kvgrove.sampling import SamplingParams
from tiny_models import ARCHITECTURES, CONFIGS, write_tiny_model

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        (arch, q): write_tiny_model(root / f"{arch}-{q}", arch, quantized=q)
        for arch in ARCHITECTURES
        for q in (False, True)
    }


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "q4"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_load_and_generate(tiny_folders, arch, quantized):
    lm = loading.load(tiny_folders[arch, quantized], dequantize=False)
    assert lm.info.architecture == CONFIGS[arch]["model_type"]
    assert lm.info.source_format == "hf"
    assert lm.info.context_length == 512
    assert lm.info.nbytes > 0
    if quantized:
        assert lm.info.quantization.startswith("Q4 (group 32)")
        kinds = {type(m) for _, m in lm.model.named_modules()}
        assert nn.QuantizedLinear in kinds
        if arch in ("qwen3_next", "glm4_moe_lite"):
            assert QuantizedSwitchLinear in kinds, "MoE experts must be quantized too"
    else:
        assert lm.info.quantization is None
    prompt = lm.tokenizer.encode("The capital of France is")
    tokens = [s.token for s in generate(lm.model, prompt, GREEDY, max_tokens=8)]
    assert len(tokens) == 8
    assert all(0 <= t < 320 for t in tokens)
    # Greedy decoding through the cache equals re-running the whole sequence each time.
    seq = list(prompt)
    for t in tokens[:3]:
        logits = lm.model(mx.array([seq]))[0, -1]
        assert int(mx.argmax(logits).item()) == t
        seq.append(t)


def test_quantized_model_dequantizes_on_cpu_by_default(tiny_folders):
    lm = loading.load(tiny_folders["llama", True])
    assert lm.info.quantization is None
    assert lm.info.dtype == "float32"
    kinds = {type(m) for _, m in lm.model.named_modules()}
    assert nn.QuantizedLinear not in kinds


def test_cache_kinds_follow_the_architecture(tiny_folders):
    lm = loading.load(tiny_folders["qwen3_next", False])
    kinds = [type(c) for c in make_cache(lm.model)]
    assert kinds.count(SpanKVCache) == 1  # one full-attention layer in four
    assert kinds.count(RecurrentCache) == 3
    lm = loading.load(tiny_folders["glm4_moe_lite", False])
    assert {type(c) for c in make_cache(lm.model)} == {SpanKVCache}  # MLA latents


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        loading.load("no-such-model")
    (tmp_path / "x.bin").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"neither a \.gguf file"):
        loading.load(tmp_path / "x.bin")


def test_default_model_reports_itself(default_model):
    info = default_model.info
    assert info.name == "smollm2"
    assert info.architecture == "llama"
    assert info.context_length == 8192
    assert info.num_layers == 30
    assert info.dtype == "float32"
    assert 130_000_000 < info.parameters < 140_000_000
    assert info.nbytes == info.parameters * 4
    assert bundled.SMOLLM2.path.exists()


def test_default_model_answers_paris(default_model):
    tok = default_model.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    )
    steps = generate(default_model.model, prompt, GREEDY, max_tokens=24, stop_ids=tok.eos_ids)
    text = tok.decode([s.token for s in steps], skip_special=True)
    assert "Paris" in text
