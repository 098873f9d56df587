"""The one tokenizer class kvgrove uses, over either the `tokenizers` library or `sentencepiece`.

Text is produced from token *bytes*: every id maps to the raw bytes it stands for (GPT-2 byte-level
pieces are mapped back through the byte table, SentencePiece's "▁" becomes a space and its
byte-fallback pieces such as "<0xE2>" become that byte, special tokens are their own text).
`decode` is then "concatenate the bytes, decode UTF-8 with replacement, drop SentencePiece's
dummy-prefix space at the very start", and the streaming detokenizer runs exactly the same
computation incrementally, so streamed text always equals the one-shot decode.

Tokenizers whose decoder is neither byte-level nor SentencePiece-style (WordPiece, ...) fall back
to the library's own decode ("opaque" style); their streaming output re-decodes a window.
"""

from __future__ import annotations

import codecs
import enum
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import tokenizers

from kvgrove.tokenize.chat import ChatTemplateError, render_chat_template

# Token texts that end a turn. When a vocabulary has one of these as a special (or added) token,
# it joins `eos_ids` next to the configured EOS id: instruction-tuned models end turns with them
# (SmolLM2 and Qwen2 with <|im_end|> and <|endoftext|>, Llama 3 with <|eot_id|>/<|eom_id|>/
# <|end_of_text|>, Gemma with <end_of_turn>, Phi-3 with <|end|>), as their HF generation configs
# list, and llama.cpp's end-of-generation list does the same by token text.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "<EOT>",
)

SPIECE_UNDERLINE = "\u2581"  # "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class DecodeStyle(enum.Enum):
    """How token pieces turn back into bytes."""

    BYTE_LEVEL = "byte_level"  # GPT-2 style: each char of a piece stands for one byte
    SENTENCEPIECE = "sentencepiece"  # "▁" is a space, "<0xNN>" pieces are single bytes
    OPAQUE = "opaque"  # anything else: ask the library


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> printable-unicode table, char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class Backend(Protocol):
    """What `Tokenizer` needs from a tokenization library."""

    def vocab_size(self) -> int: ...
    def encode(self, text: str, *, parse_special: bool) -> list[int]: ...
    def id_to_piece(self, token_id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int | None: ...
    def decode(self, ids: Sequence[int], *, skip_special: bool) -> str: ...


class HFBackend:
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from a GGUF vocabulary)."""

    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok = tok
        self._literal: tokenizers.Tokenizer | None = None

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, parse_special: bool) -> list[int]:
        tok = self.tok if parse_special else self._literal_tokenizer()
        return tok.encode(text, add_special_tokens=False).ids

    def _literal_tokenizer(self) -> tokenizers.Tokenizer:
        # A twin that reads special-token text as plain text. Non-special added tokens
        # (user-defined) still split out, as in llama.cpp with parse_special off.
        if self._literal is None:
            literal = tokenizers.Tokenizer.from_str(self.tok.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tok.id_to_token(token_id)
        return "" if piece is None else piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def decode(self, ids: Sequence[int], *, skip_special: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def added_tokens(self) -> dict[int, tokenizers.AddedToken]:
        return self.tok.get_added_tokens_decoder()


class SentencePieceBackend:
    """A `sentencepiece.SentencePieceProcessor` (tokenizer.model)."""

    def __init__(self, sp: Any) -> None:
        self.sp = sp
        n = sp.get_piece_size()
        self.control_ids = frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
        pieces = sorted({sp.id_to_piece(i) for i in self.control_ids} - {""}, key=len, reverse=True)
        # SentencePiece reads "<s>" in text as characters; split control pieces out ourselves.
        self._split = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, *, parse_special: bool) -> list[int]:
        if not parse_special or self._split is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self.sp.piece_to_id(part))
            elif part:
                # Each fragment gets SentencePiece's dummy prefix, as llama.cpp does after
                # a special token.
                ids.extend(self.sp.encode(part))
        return ids

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        if token_id == self.sp.unk_id() and piece != self.sp.id_to_piece(token_id):
            return None
        return token_id

    def decode(self, ids: Sequence[int], *, skip_special: bool) -> str:
        return self.sp.decode(list(ids))


def end_of_turn_ids(backend: Backend, candidates: Iterable[int]) -> frozenset[int]:
    """Ids of `END_OF_TURN_TOKENS` present among `candidates` (special/added token ids)."""
    wanted = set(END_OF_TURN_TOKENS)
    return frozenset(i for i in candidates if backend.id_to_piece(i) in wanted)


class Tokenizer:
    """Text <-> token ids, chat templates and streaming detokenization for one model.

    Build one with `load_tokenizer` (a model folder) or `tokenizer_from_gguf` (GGUF metadata).
    `encode(add_special=True)` prepends BOS when `add_bos` (and appends EOS when `add_eos`);
    `parse_special` decides whether special-token text such as "<|im_start|>" in the input
    becomes that token or is tokenized as characters.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        style: DecodeStyle,
        special_ids: Iterable[int],
        raw_ids: Iterable[int] = (),
        byte_ids: Iterable[int] | None = None,
        strip_leading_space: bool = False,
        bos_id: int | None,
        eos_ids: Iterable[int],
        eos_id: int | None = None,
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend
        self.style = style
        self.name = name
        self.vocab_size: int = backend.vocab_size()
        self._special = frozenset(special_ids)
        # Ids whose bytes are their text as written (special and added tokens).
        self._raw = self._special | frozenset(raw_ids)
        self._byte_ids = None if byte_ids is None else frozenset(byte_ids)
        self.strip_leading_space = strip_leading_space
        self.bos_id = bos_id
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        if eos_id is None and self.eos_ids:
            eos_id = min(self.eos_ids)
        self.eos_id = eos_id
        self.bos_token: str | None = None if bos_id is None else backend.id_to_piece(bos_id)
        self.eos_token: str | None = None if eos_id is None else backend.id_to_piece(eos_id)
        self.add_bos = add_bos and bos_id is not None
        self.add_eos = add_eos and eos_id is not None
        self.chat_template = chat_template
        self._bytes: list[bytes | None] = [None] * self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, style={self.style.value}, "
            f"bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)})"
        )

    # -- encoding ---------------------------------------------------------------------------

    def encode(
        self, text: str, *, add_special: bool = False, parse_special: bool = True
    ) -> list[int]:
        ids = self.backend.encode(text, parse_special=parse_special)
        if add_special:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    # -- decoding ---------------------------------------------------------------------------

    def is_special(self, id: int) -> bool:
        return id in self._special

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token `id` stands for (may be part of a UTF-8 character)."""
        cached = self._bytes[id] if 0 <= id < self.vocab_size else None
        if cached is not None:
            return cached
        if not 0 <= id < self.vocab_size:
            raise ValueError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")
        piece = self.backend.id_to_piece(id)
        if id in self._raw:
            data = piece.encode()
        elif self.style is DecodeStyle.BYTE_LEVEL:
            table = _byte_decoder()
            data = b"".join(bytes((table[c],)) if c in table else c.encode() for c in piece)
        elif self.style is DecodeStyle.SENTENCEPIECE:
            m = _BYTE_PIECE.fullmatch(piece)
            if m and (self._byte_ids is None or id in self._byte_ids):
                data = bytes((int(m.group(1), 16),))
            else:
                data = piece.replace(SPIECE_UNDERLINE, " ").encode()
        else:
            data = self.backend.decode([id], skip_special=False).encode()
        self._bytes[id] = data
        return data

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        if self.style is DecodeStyle.OPAQUE:
            return self.backend.decode(ids, skip_special=skip_special)
        data = b"".join(
            self.token_bytes(i) for i in ids if not (skip_special and i in self._special)
        )
        text = data.decode("utf-8", errors="replace")
        if self.strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text

    def detokenizer(self, *, skip_special: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one sequence of generated ids."""
        if self.style is DecodeStyle.OPAQUE:
            return _RedecodingDetokenizer(self, skip_special=skip_special)
        return StreamingDetokenizer(self, skip_special=skip_special)

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list | None = None,
        **extra: Any,
    ) -> str:
        """Render `messages` with the model's chat template, as transformers does.

        The template sees `messages`, `tools`, `add_generation_prompt`, `bos_token`,
        `eos_token` and any `extra` keyword (e.g. `enable_thinking=False`). A tokenizer without
        a chat template raises `ChatTemplateError` (no guessed fallback format: a wrong format
        silently degrades answers).
        """
        if self.chat_template is None:
            raise ChatTemplateError(f"tokenizer {self.name!r} has no chat template")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens={k: v for k, v in special.items() if v is not None},
            extra=extra,
        )


class StreamingDetokenizer:
    """Turns generated ids into text as they come, never splitting a UTF-8 character.

    Invariant: `"".join(add(i) for i in ids) + flush() == tokenizer.decode(ids)` (with the same
    `skip_special`). Bytes run through an incremental UTF-8 decoder with replacement, which
    produces exactly what a one-shot decode does, holding back an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_pending = tokenizer.strip_leading_space

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (possibly empty)."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._finish(self._decoder.decode(self._tokenizer.token_bytes(token_id)))

    def flush(self) -> str:
        """End of sequence: return what is left (an incomplete character becomes U+FFFD)."""
        return self._finish(self._decoder.decode(b"", final=True))

    def _finish(self, text: str) -> str:
        if self._strip_pending and text:
            self._strip_pending = False
            if text[0] == " ":
                text = text[1:]
        return text


class _RedecodingDetokenizer(StreamingDetokenizer):
    """For opaque decoders: re-decode the sequence, emit the stable new suffix."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        super().__init__(tokenizer, skip_special=skip_special)
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special=self._skip_special)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        new, self._emitted = text[len(self._emitted) :], text
        return new

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids, skip_special=self._skip_special)
        new = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted = text
        return new
