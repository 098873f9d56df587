"""decode(encode(x)) == x on a multilingual corpus, for lossless tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvgrove.tokenize import load_tokenizer

# Byte-level BPE vocabularies hold every byte, and llama-spm falls back to bytes: all lossless.
GGUF_VOCABS = ["gpt-2", "qwen2", "llama-bpe", "llama-spm", "phi-3", "starcoder", "falcon"]


@pytest.mark.parametrize("vocab", GGUF_VOCABS)
def test_gguf_round_trip(llama_cpp_tokenizer, vocab: str, corpus: list[str]) -> None:
    tok = llama_cpp_tokenizer(vocab)
    for text in corpus:
        ids = tok.encode(text, parse_special=False)
        assert tok.decode(ids) == text, repr(text)
        detok = tok.detokenizer()
        assert "".join(detok.add(i) for i in ids) + detok.flush() == text


def test_sentencepiece_round_trip(mistral_v1_folder: Path, corpus: list[str]) -> None:
    tok = load_tokenizer(mistral_v1_folder)
    for text in corpus:
        assert tok.decode(tok.encode(text, add_special=True), skip_special=True) == text
