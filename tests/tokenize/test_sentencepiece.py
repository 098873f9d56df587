"""load_tokenizer on a folder with only tokenizer.model agrees with `sentencepiece` itself.

The models are real ones shipped in mistral-common's wheel (Mistral 7B v0.1's tokenizer.model.v1
and later instruct tokenizers with control tokens such as [INST]).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece

from kvgrove.tokenize import DecodeStyle, load_tokenizer

MODELS = [
    "tokenizer.model.v1",
    "mistral_instruct_tokenizer_240216.model.v2",
    "mistral_instruct_tokenizer_240323.model.v3",
]


@pytest.fixture(scope="module", params=MODELS)
def spm_folder(request, mistral_spm_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes((mistral_spm_dir / request.param).read_bytes())
    return folder


def test_agrees_with_sentencepiece(spm_folder: Path, corpus: list[str]) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    tok = load_tokenizer(spm_folder)
    assert tok.style is DecodeStyle.SENTENCEPIECE
    assert tok.vocab_size == sp.get_piece_size()
    assert tok.bos_id == sp.bos_id() == 1
    assert tok.eos_ids >= {sp.eos_id()}
    assert tok.add_bos
    for text in corpus:
        ids = tok.encode(text, parse_special=False)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)
        assert tok.encode(text, add_special=True) == [1, *sp.encode(text)]
        for token_id in ids:
            piece = sp.id_to_piece(token_id)
            if sp.is_byte(token_id):
                assert tok.token_bytes(token_id) == bytes([int(piece[3:5], 16)])
            else:
                assert tok.token_bytes(token_id) == piece.replace("▁", " ").encode()


def test_control_tokens_split_out(spm_folder: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_folder / "tokenizer.model"))
    tok = load_tokenizer(spm_folder)
    ids = tok.encode("<s>Hello</s>")
    assert ids == [1, *sp.encode("Hello"), 2]
    assert tok.decode(ids, skip_special=True) == "Hello"
    assert tok.decode(ids) == "<s> Hello</s>"  # as HF renders it (the space was the prefix)
    assert tok.encode("<s>Hello", parse_special=False) == sp.encode("<s>Hello")


def test_config_files(spm_folder: Path) -> None:
    """generation_config.json wins over config.json and tokenizer_config.json; a list of EOS ids
    is accepted; the chat template comes from tokenizer_config.json or chat_template.jinja."""
    (spm_folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "</s>", "add_bos_token": False, "chat_template": "A{{ eos_token }}"}
        )
    )
    (spm_folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 5}))
    tok = load_tokenizer(spm_folder)
    assert tok.eos_ids == {5} and not tok.add_bos
    assert tok.apply_chat_template([]) == "A" + tok.eos_token
    (spm_folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    (spm_folder / "chat_template.jinja").write_text("B{{ bos_token }}")
    tok = load_tokenizer(spm_folder)
    assert tok.eos_ids == {2, 3} and tok.eos_token == "</s>"
    assert tok.apply_chat_template([]) == "B<s>"
    for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
        (spm_folder / name).unlink()
    (spm_folder / "chat_template.jinja").unlink()
