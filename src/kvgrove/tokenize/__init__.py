"""Tokenizers: loading (HF/MLX folders, SentencePiece, GGUF), chat templates, streaming decode."""

from kvgrove.tokenize.chat import ChatTemplateError
from kvgrove.tokenize.gguf import GGUFTokenizerError, tokenizer_from_gguf
from kvgrove.tokenize.gguf_meta import read_gguf_metadata
from kvgrove.tokenize.loading import load_tokenizer
from kvgrove.tokenize.tokenizer import (
    END_OF_TURN_TOKENS,
    DecodeStyle,
    StreamingDetokenizer,
    Tokenizer,
)

__all__ = [
    "END_OF_TURN_TOKENS",
    "ChatTemplateError",
    "DecodeStyle",
    "GGUFTokenizerError",
    "StreamingDetokenizer",
    "Tokenizer",
    "load_tokenizer",
    "read_gguf_metadata",
    "tokenizer_from_gguf",
]
