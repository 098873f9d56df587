"""Streaming detokenizer: "".join(adds) + flush() == decode(ids), for any id sequence.

Checked for a byte-level BPE (SmolLM2), a SentencePiece vocabulary built into `tokenizers` from
GGUF (llama-spm: byte-fallback pieces, leading-space stripping) and a `sentencepiece` model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgrove.tokenize import Tokenizer, load_tokenizer

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def llama_spm(llama_cpp_tokenizer) -> Tokenizer:
    return llama_cpp_tokenizer("llama-spm")


@pytest.fixture(scope="module")
def mistral_v1(mistral_v1_folder: Path) -> Tokenizer:
    return load_tokenizer(mistral_v1_folder)


@pytest.fixture(params=["smollm2", "llama_spm", "mistral_v1"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def byte_piece_ids(tok: Tokenizer) -> list[int]:
    """Ids of SentencePiece byte-fallback pieces, or byte-level single-byte tokens >= 0x80."""
    ids = [i for i in range(min(tok.vocab_size, 1000)) if len(tok.token_bytes(i)) == 1]
    return [i for i in ids if tok.token_bytes(i)[0] >= 0x80] or ids


def stream(tok: Tokenizer, ids: list[int], *, skip_special: bool) -> list[str]:
    detok = tok.detokenizer(skip_special=skip_special)
    return [detok.add(i) for i in ids] + [detok.flush()]


@st.composite
def id_sequences(draw, tok: Tokenizer, byte_ids: list[int]) -> list[int]:
    """Mixes of encoded text (multi-byte characters split across tokens), raw byte pieces,
    special ids and arbitrary ids."""
    parts: list[int] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["text", "bytes", "special", "any"]))
        if kind == "text":
            parts += tok.encode(draw(st.text(max_size=20)), parse_special=False)
        elif kind == "bytes":
            parts += draw(st.lists(st.sampled_from(byte_ids), max_size=6))
        elif kind == "special":
            parts += draw(st.lists(st.sampled_from(sorted(tok.eos_ids | {0, 1, 2})), max_size=2))
        else:
            parts += draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=4))
    return parts


@given(data=st.data())
@SETTINGS
def test_stream_equals_decode(tok: Tokenizer, data) -> None:
    ids = data.draw(id_sequences(tok, byte_piece_ids(tok)))
    for skip in (False, True):
        assert "".join(stream(tok, ids, skip_special=skip)) == tok.decode(ids, skip_special=skip)


@given(text=st.text(min_size=1, max_size=40))
@SETTINGS
def test_stream_of_valid_text_never_splits_characters(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, parse_special=False)
    chunks = stream(tok, ids, skip_special=False)
    assert "".join(chunks) == tok.decode(ids)
    # A chunk never holds part of a character: no U+FFFD unless the whole decode has one
    # (SmolLM2's vocabulary lacks a few bytes, e.g. 0xF1, so some code points are lost).
    if "\ufffd" not in tok.decode(ids):
        assert not any("\ufffd" in c for c in chunks)


def test_multibyte_character_split_over_byte_pieces(llama_spm: Tokenizer) -> None:
    ids = llama_spm.encode("🦙")  # not in the vocabulary: four byte-fallback pieces
    pieces = [llama_spm.backend.id_to_piece(i) for i in ids]
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert stream(llama_spm, ids, skip_special=False) == ["", "", "", "", "🦙", ""]
    assert llama_spm.decode(ids) == "🦙"


def test_sentencepiece_leading_space(mistral_v1: Tokenizer) -> None:
    ids = mistral_v1.encode("Hello world", add_special=True)
    assert stream(mistral_v1, ids, skip_special=True) == ["", "Hello", " world", ""]
    assert "".join(stream(mistral_v1, ids, skip_special=False)) == "<s> Hello world"


def test_truncated_character_is_replaced_at_flush(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("日")
    assert len(ids) > 1  # a byte-level vocabulary without this character as one token
    chunks = stream(smollm2, ids[:-1], skip_special=False)
    assert chunks[:-1] == [""] * (len(ids) - 1) and chunks[-1] == "\ufffd"
