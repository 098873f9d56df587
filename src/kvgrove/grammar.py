"""Constrained decoding: grammars compiled by llguidance, token masks for the sampler.

llguidance (the engine llama.cpp and vLLM use) takes a grammar — JSON schema, regex, Lark —
and, token by token, says which tokens may come next. kvgrove uses it like this:

- ``json_schema_grammar`` / ``any_json_grammar`` / ``regex_grammar`` / ``lark_grammar`` turn
  a request's field into llguidance's grammar string; ``check_grammar`` compiles it against
  the model's vocabulary and raises ``GrammarError`` naming why the engine rejects it (the
  HTTP layer answers 400). The string rides in ``SamplingParams.grammar``.
- ``ll_tokenizer`` builds llguidance's view of a kvgrove ``Tokenizer`` (every token's bytes,
  the end-of-turn ids as EOS), once per tokenizer: it costs about a second.
- A ``Constraint`` is one sequence's matcher. The sampler asks it for the packed mask of
  allowed tokens before each draw (unpacked on the device) and feeds it each accepted
  token. EOS is in the mask only where the grammar can end; once the grammar is complete
  only EOS is. A grammar that is not complete when the token limit hits simply stops there
  ("length"): nothing claims it complete.

The MLX helper llguidance ships (``llguidance.mlx``) is a Metal kernel; the mask here is a
packed rows unpacked with shifts and applied with ``mx.where``, which runs on every MLX backend.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import numpy as np

# JSON written compactly: a small model cannot wander off into endless whitespace.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """The grammar engine rejected a grammar; the message says why."""


def json_schema_grammar(schema: Any) -> str:
    """The grammar for JSON matching ``schema`` (a dict, or True for any JSON value)."""
    import llguidance

    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults=_JSON_OPTIONS
        )
    except (ValueError, TypeError) as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def any_json_grammar() -> str:
    """Any JSON object (Ollama's ``format: "json"``, OpenAI's ``json_object``)."""
    return json_schema_grammar({"type": "object"})


def regex_grammar(pattern: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_regex(pattern)


def lark_grammar(lark: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


_tokenizers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


class _TokenizerView:
    """What llguidance's ``TokenizerWrapper`` reads from a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's tokenizer for a kvgrove ``Tokenizer`` (built once, then cached)."""
    import llguidance
    from llguidance._tokenizer import TokenizerWrapper

    with _tokenizers_lock:
        cached = _tokenizers.get(tokenizer)
        if cached is None:
            eos = sorted(tokenizer.eos_ids) or None
            cached = llguidance.LLTokenizer(
                TokenizerWrapper(_TokenizerView(tokenizer)), eos_token=eos
            )
            _tokenizers[tokenizer] = cached
        return cached


def check_grammar(grammar: str, tokenizer: Any) -> None:
    """Raise ``GrammarError`` naming why the engine rejects ``grammar`` for this vocabulary."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, ll_tokenizer(tokenizer)
    )
    if is_error:
        raise GrammarError(messages[0] if messages else "the grammar engine rejected it")


class Constraint:
    """One sequence's grammar state: the allowed-token mask before each draw.

    ``mask(width)`` is a boolean row of ``width`` (the logits' width; ids past the
    tokenizer's vocabulary are never allowed). ``accept(token)`` advances the grammar.
    """

    def __init__(self, grammar: str, tokenizer: Any) -> None:
        import llguidance

        self._ll = ll_tokenizer(tokenizer)
        self._matcher = llguidance.LLMatcher(self._ll, grammar, log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._eos = sorted(tokenizer.eos_ids)
        self._bitmask: np.ndarray | None = None  # for the state now (until the next accept)

    def bitmask(self, words: int) -> np.ndarray:
        """The allowed tokens packed 32 to a uint32 word, bit ``t % 32`` of word ``t // 32``.

        ``words`` is the logits' width in words; ids past the vocabulary are never allowed.
        Computed once per state: the executor asks for it early, while the device computes.
        """
        if self._bitmask is not None and self._bitmask.shape[0] == words:
            return self._bitmask
        self._bitmask = self._compute_bitmask(words)
        return self._bitmask

    def _compute_bitmask(self, words: int) -> np.ndarray:
        packed = np.zeros(words, dtype=np.uint32)
        if self._matcher.is_error():
            # A token the grammar did not allow got in (it cannot, through the sampler):
            # end the sequence rather than let it continue unconstrained.
            for t in self._eos:
                if t < 32 * words:
                    packed[t // 32] |= np.uint32(1 << (t % 32))
            return packed
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint32)
        n = min(words, bits.shape[0])
        packed[:n] = bits[:n]
        return packed

    def mask(self, width: int) -> np.ndarray:
        """The allowed tokens as a boolean row of ``width``."""
        packed = self.bitmask((width + 31) // 32)
        return np.unpackbits(packed.view(np.uint8), bitorder="little")[:width].astype(bool)

    def accept(self, token: int) -> None:
        self._bitmask = None
        if not self._matcher.is_stopped():
            self._matcher.consume_token(int(token))

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete sentence of the grammar."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() if self._matcher.is_error() else None
