"""Build a `Tokenizer` from GGUF metadata, inside the `tokenizers` library.

- 'gpt2' vocabularies (byte-level BPE): `models.BPE` from tokens and merges, the pre-tokenizer
  regexes llama.cpp's llama-vocab.cpp uses for the 'tokenizer.ggml.pre' name (each a `Split`,
  "isolated", applied in order), then `ByteLevel` without its own regex.
- 'llama' vocabularies (SentencePiece): `models.BPE` with merges derived from the scores (as
  transformers' `generate_merges` does), byte fallback, and a normalizer that prepends "▁" (when
  'add_space_prefix') and turns spaces into "▁", as HF's LlamaConverter does.

Special tokens: token_type CONTROL (3) become special added tokens, USER_DEFINED (4) plain added
tokens (both split out before BPE; only CONTROL ones obey `parse_special=False`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from kvgrove.tokenize.tokenizer import (
    DecodeStyle,
    HFBackend,
    Tokenizer,
    end_of_turn_ids,
)

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
    r"|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_CODER = [
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
]
_DEEPSEEK_LLM = [
    r"[\r\n]",
    # Non-NFC chars are written as escapes: editors and tools normalize them away.
    "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    "[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
]

# 'tokenizer.ggml.pre' name -> (regexes applied in order, ignore_merges), from llama-vocab.cpp.
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {}
for _names, _regexes, _ignore_merges in [
    (
        (
            "default",
            "gpt-2",
            "phi-2",
            "mpt",
            "olmo",
            "jais",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "exaone4",
            "trillion",
            "granite-docling",
            "roberta-bpe",
            "jina-v1-en",
            "jina-v2-code",
        ),
        [_GPT2],
        False,
    ),
    (
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        [r"\p{N}", _GPT2],
        False,
    ),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        [_LLAMA3],
        True,
    ),
    (("dbrx", "smaug-bpe", "chatglm-bpe"), [_LLAMA3], False),
    (("glm4", "glm5"), [_LLAMA3], True),
    (("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan", "kormo"), [_QWEN2], False),
    (("qwen35",), [_QWEN35], False),
    (("falcon",), [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"], False),
    (("deepseek-coder",), _DEEPSEEK_CODER, False),
    (("deepseek-llm",), _DEEPSEEK_LLM, False),
]:
    for _name in _names:
        PRE_TOKENIZERS[_name] = (list(_regexes), _ignore_merges)

# Pre-tokenizers that llama.cpp marks add_bos regardless of the file.
_ADD_BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0"}


class GGUFTokenizerError(ValueError):
    """The GGUF metadata describes a vocabulary kvgrove cannot build."""


def _value(v: Any) -> Any:
    """A Python scalar from an mx.array / numpy scalar / plain value."""
    if hasattr(v, "item") and getattr(v, "size", 1) == 1:
        return v.item()
    return v


def _int_array(v: Any) -> np.ndarray:
    return np.asarray(v).astype(np.int64).reshape(-1)


def _float_array(v: Any) -> np.ndarray:
    return np.asarray(v).astype(np.float64).reshape(-1)


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """A `Tokenizer` from GGUF metadata (`mx.load(..., return_metadata=True)[1]` or
    `read_gguf_metadata`; values may be mx.array, numpy or plain Python)."""
    kind = _value(metadata.get("tokenizer.ggml.model", ""))
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    n = len(tokens)
    if "tokenizer.ggml.token_type" in metadata:
        types = _int_array(metadata["tokenizer.ggml.token_type"])
    else:
        types = np.full(n, NORMAL, dtype=np.int64)
    pre = str(_value(metadata.get("tokenizer.ggml.pre", "default")))

    def opt_id(key: str) -> int | None:
        v = metadata.get(key)
        if v is None:
            return None
        v = int(_value(v))
        return v if 0 <= v < n else None

    bos_id = opt_id("tokenizer.ggml.bos_token_id")
    eos_id = opt_id("tokenizer.ggml.eos_token_id")
    unk_id = opt_id("tokenizer.ggml.unknown_token_id")

    if kind == "gpt2":
        tok = _byte_level_bpe(metadata, tokens, pre)
        style, strip = DecodeStyle.BYTE_LEVEL, False
        default_add_bos = pre in _ADD_BOS_PRE
    elif kind == "llama":
        add_prefix = bool(_value(metadata.get("tokenizer.ggml.add_space_prefix", True)))
        tok = _sentencepiece_bpe(metadata, tokens, types, unk_id, add_prefix)
        style, strip = DecodeStyle.SENTENCEPIECE, add_prefix
        default_add_bos = True
    else:
        raise GGUFTokenizerError(f"unsupported GGUF tokenizer model {kind!r}")

    special = [i for i in range(n) if types[i] in (CONTROL, UNKNOWN)]
    user_defined = [i for i in range(n) if types[i] == USER_DEFINED]
    # Added tokens are registered in id order; their ids are already in the model vocab.
    tok.add_special_tokens(
        [
            tokenizers.AddedToken(tokens[i], special=True, normalized=False)
            for i in special
            if types[i] == CONTROL and tokens[i]
        ]
    )
    tok.add_tokens(
        [
            tokenizers.AddedToken(tokens[i], special=False, normalized=False)
            for i in user_defined
            if tokens[i]
        ]
    )
    backend = HFBackend(tok)
    eos_ids = {eos_id} if eos_id is not None else set()
    eos_ids |= end_of_turn_ids(backend, [*special, *user_defined])
    add_bos = bool(_value(metadata.get("tokenizer.ggml.add_bos_token", default_add_bos)))
    add_eos = bool(_value(metadata.get("tokenizer.ggml.add_eos_token", False)))
    template = metadata.get("tokenizer.chat_template")
    return Tokenizer(
        backend,
        style=style,
        special_ids=special,
        raw_ids=user_defined,
        byte_ids=[i for i in range(n) if types[i] == BYTE],
        strip_leading_space=strip,
        bos_id=bos_id,
        eos_ids=eos_ids,
        eos_id=eos_id,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=None if template is None else str(template),
        name=str(_value(metadata.get("general.name", ""))),
    )


def _byte_level_bpe(
    metadata: Mapping[str, Any], tokens: list[str], pre: str
) -> tokenizers.Tokenizer:
    if pre not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(f"unknown GGUF pre-tokenizer {pre!r}")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(
    metadata: Mapping[str, Any],
    tokens: list[str],
    types: np.ndarray,
    unk_id: int | None,
    add_prefix: bool,
) -> tokenizers.Tokenizer:
    scores = _float_array(metadata["tokenizer.ggml.scores"])
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    merges = _merges_from_scores(mergeable, scores)
    unk = tokens[unk_id] if unk_id is not None else None
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = tokenizers.Tokenizer(model)
    steps = [normalizers.Prepend("\u2581")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            *([decoders.Strip(" ", 1, 0)] if add_prefix else []),
        ]
    )
    return tok


def _merges_from_scores(vocab: dict[str, int], scores: np.ndarray) -> list[tuple[str, str]]:
    """BPE merges ranked by the merged piece's score, like transformers' `generate_merges`."""
    ranked: list[tuple[float, int, int, int, int, str, str]] = []
    for piece, piece_id in vocab.items():
        score = float(scores[piece_id])
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                ranked.append((-score, -len(left), -len(right), li, ri, left, right))
    ranked.sort(key=lambda r: r[:5])
    return [(r[5], r[6]) for r in ranked]
