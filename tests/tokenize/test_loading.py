"""load_tokenizer on tokenizer.json folders (written from GGUF-built tokenizers) and GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvgrove.tokenize import DecodeStyle, Tokenizer, load_tokenizer


def _save(tok: Tokenizer, folder: Path, **tok_config) -> Path:
    folder.mkdir()
    tok.backend.tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


def test_byte_level_tokenizer_json(smollm2: Tokenizer, tmp_path: Path, corpus: list[str]) -> None:
    folder = _save(
        smollm2,
        tmp_path / "smollm2",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=smollm2.chat_template,
    )
    tok = load_tokenizer(folder)
    assert tok.style is DecodeStyle.BYTE_LEVEL
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, {0, 2}, False)
    assert tok.chat_template == smollm2.chat_template
    for text in [*corpus, "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == smollm2.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode(text, parse_special=False) == smollm2.encode(text, parse_special=False)


def test_sentencepiece_style_tokenizer_json(
    llama_cpp_tokenizer, tmp_path: Path, corpus: list[str]
) -> None:
    spm = llama_cpp_tokenizer("llama-spm")
    folder = _save(spm, tmp_path / "llama-spm", bos_token="<s>", eos_token="</s>")
    tok = load_tokenizer(folder)
    assert tok.style is DecodeStyle.SENTENCEPIECE and tok.strip_leading_space
    assert (tok.bos_id, tok.eos_ids) == (1, {2})
    assert not tok.add_bos  # no add_bos_token and no post-processor adding it
    for text in corpus:
        ids = tok.encode(text)
        assert ids == spm.encode(text)
        assert tok.decode(ids) == spm.decode(ids) == text
        assert tok.decode(ids) == tok.backend.decode(ids, skip_special=False)


def test_gguf_file_path(smollm2_gguf_path: Path, smollm2: Tokenizer) -> None:
    tok = load_tokenizer(smollm2_gguf_path)
    assert tok.encode("<|im_start|>Hi") == smollm2.encode("<|im_start|>Hi")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "absent")


def test_metaspace_tokenizer_json(llama_cpp_tokenizer, tmp_path: Path) -> None:
    """Newer SentencePiece conversions use a Metaspace pre-tokenizer and decoder."""
    import tokenizers
    from tokenizers import decoders, pre_tokenizers

    spm = llama_cpp_tokenizer("llama-spm")
    hf = tokenizers.Tokenizer.from_str(spm.backend.tok.to_str())
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    hf.decoder = decoders.Metaspace(prepend_scheme="first", split=False)
    folder = tmp_path / "metaspace"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    tok = load_tokenizer(folder)
    assert tok.style is DecodeStyle.SENTENCEPIECE and tok.strip_leading_space
    ids = tok.encode("Hello world")
    assert ids == spm.encode("Hello world") and tok.decode(ids) == "Hello world"


def test_opaque_decoder_streams(tmp_path: Path) -> None:
    """A WordPiece vocabulary decodes through the library; streaming re-decodes."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[SEP]": 1, "hello": 2, "world": 3, "##s": 4, "!": 5}
    hf = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens(["[SEP]"])
    folder = tmp_path / "wordpiece"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    tok = load_tokenizer(folder)
    assert tok.style is DecodeStyle.OPAQUE and tok.eos_ids == {1}
    ids = tok.encode("hello worlds![SEP]")
    assert ids == [2, 3, 4, 5, 1]
    detok = tok.detokenizer(skip_special=True)
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == tok.decode(ids, skip_special=True) == "hello worlds!"
