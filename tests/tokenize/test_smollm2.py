"""The default model's tokenizer (SmolLM2-135M-Instruct GGUF): ids, EOS set, chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgrove.tokenize import (
    ChatTemplateError,
    DecodeStyle,
    Tokenizer,
    read_gguf_metadata,
    tokenizer_from_gguf,
)


def test_vocabulary_and_special_ids(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert smollm2.style is DecodeStyle.BYTE_LEVEL
    assert smollm2.bos_id == 1
    assert smollm2.bos_token == "<|im_start|>"
    assert smollm2.eos_token == "<|im_end|>"
    # HF's generation_config for SmolLM2-Instruct stops on <|im_end|> and <|endoftext|>.
    assert smollm2.eos_ids == frozenset({0, 2})
    assert smollm2.add_bos is False
    assert smollm2.is_special(0) and smollm2.is_special(1) and smollm2.is_special(2)
    assert not smollm2.is_special(smollm2.encode("Hello")[0])


def test_known_ids(smollm2: Tokenizer) -> None:
    assert smollm2.encode("<|im_start|>") == [1]
    assert smollm2.encode("<|im_end|>") == [2]
    assert smollm2.encode("<|endoftext|>") == [0]
    # With parse_special off the same text is ordinary characters.
    literal = smollm2.encode("<|im_start|>", parse_special=False)
    assert 1 not in literal and len(literal) > 1
    assert smollm2.decode(literal) == "<|im_start|>"
    # add_special adds nothing: SmolLM2 has add_bos_token false.
    assert smollm2.encode("Hi", add_special=True) == smollm2.encode("Hi")
    # Digits are split one by one ('smollm' pre-tokenizer, like starcoder).
    digits = smollm2.encode("12345")
    assert len(digits) == 5 and smollm2.decode(digits) == "12345"


def test_special_tokens_decode(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert ids[0] == 1 and 2 in ids
    assert smollm2.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n"
    assert smollm2.decode(ids, skip_special=True) == "user\nHi\n"


def test_mx_load_metadata_gives_the_same_tokenizer(smollm2_gguf_path: Path) -> None:
    import mlx.core as mx

    _, metadata = mx.load(str(smollm2_gguf_path), return_metadata=True)
    via_mx = tokenizer_from_gguf(metadata)
    via_reader = tokenizer_from_gguf(read_gguf_metadata(smollm2_gguf_path))
    text = "<|im_start|>system\nYou are 🦙, café 中文 12345<|im_end|>"
    assert via_mx.encode(text) == via_reader.encode(text)
    assert via_mx.eos_ids == via_reader.eos_ids
    assert via_mx.chat_template == via_reader.chat_template
    assert (via_mx.bos_id, via_mx.add_bos) == (via_reader.bos_id, via_reader.add_bos)


def test_round_trip(smollm2: Tokenizer, corpus: list[str]) -> None:
    for text in corpus:
        assert smollm2.decode(smollm2.encode(text)) == text


SYSTEM_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_chat_template_user_only(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template([{"role": "user", "content": "Hi there"}])
    assert prompt == (
        f"<|im_start|>system\n{SYSTEM_DEFAULT}<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = smollm2.encode(prompt)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_chat_template_system_and_user(smollm2: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    prompt = smollm2.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = smollm2.apply_chat_template(messages, add_generation_prompt=False)
    assert without == prompt.removesuffix("<|im_start|>assistant\n")


def test_chat_template_features() -> None:
    """transformers' environment: raise_exception, tojson, strftime_now, namespace, loop controls,
    trim_blocks/lstrip_blocks, and the extra keywords."""
    from kvgrove.tokenize.chat import render_chat_template

    template = (
        "{% set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "  {% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}\n"
        "  {% if m.role == 'skip' %}{% continue %}{% endif %}\n"
        "  {% set ns.n = ns.n + 1 %}\n"
        "{{ bos_token }}{{ m.content }}|{{ tools | tojson }}|{{ flag }}\n"
        "{% endfor %}\n"
        "{{ ns.n }}{{ strftime_now('%Y')[:2] }}"
    )
    out = render_chat_template(
        template,
        [{"role": "user", "content": "é<b>"}, {"role": "skip", "content": "x"}],
        add_generation_prompt=True,
        tools=[{"name": "f", "description": "ü"}],
        special_tokens={"bos_token": "<s>"},
        extra={"flag": True},
    )
    assert out == '<s>é<b>|[{"name": "f", "description": "ü"}]|True\n120'
    with pytest.raises(ChatTemplateError, match="bad role"):
        render_chat_template(
            template,
            [{"role": "bad", "content": ""}],
            add_generation_prompt=True,
            tools=None,
            special_tokens={},
            extra={},
        )


def test_chat_template_is_sandboxed() -> None:
    from kvgrove.tokenize.chat import render_chat_template

    with pytest.raises(ChatTemplateError):
        render_chat_template(
            "{{ messages.__class__.__mro__ }}{% set x = messages.append(1) %}",
            [],
            add_generation_prompt=True,
            tools=None,
            special_tokens={},
            extra={},
        )
