"""Logprob request fields and response shapes of both APIs.

The sampler computes OpenAI's logprobs (log-softmax of the raw logits, before penalties,
temperature and any grammar mask) for the chosen token and up to 20 alternatives; each
``TextChunk`` carries the ``Token`` messages whose text it holds.

- OpenAI chat: ``logprobs`` (bool) and ``top_logprobs`` (0..20, needs ``logprobs``);
  ``choices[].logprobs.content`` lists ``{token, logprob, bytes, top_logprobs}``.
- OpenAI completions: ``logprobs`` (0..5 alternatives); ``choices[].logprobs`` holds
  ``tokens``, ``token_logprobs``, ``top_logprobs`` (dicts) and ``text_offset``.
- Ollama: top-level ``logprobs`` (bool) and ``top_logprobs`` (0..20); each response carries
  ``logprobs``: ``[{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from kvgrove.http.common import BadRequest, get_bool, get_int
from kvgrove.sampling import MAX_TOP_LOGPROBS


def with_logprobs(params: Any, body: dict, *, api: str) -> Any:
    """``params`` with the logprobs the request asks for (400 naming a bad field)."""
    if api == "openai-completions":
        n = get_int(body, "logprobs")
        if n is None:
            return params
        if not 0 <= n <= 5:
            raise BadRequest(f"logprobs must be in [0, 5], got {n}", param="logprobs")
        return attrs.evolve(params, logprobs=True, top_logprobs=n)
    on = get_bool(body, "logprobs", False)
    top = get_int(body, "top_logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise BadRequest(
            f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs"
        )
    if top and not on:
        if api == "openai":
            raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        on = True  # Ollama: asking for alternatives asks for logprobs
    if not on:
        return params
    return attrs.evolve(params, logprobs=True, top_logprobs=top or 0)


def _text(tok: Any, token: int) -> tuple[str, list[int]]:
    data = tok.token_bytes(token)
    return data.decode("utf-8", errors="replace"), list(data)


def _entry(tok: Any, token: int, logprob: float) -> dict[str, Any]:
    text, data = _text(tok, token)
    return {"token": text, "logprob": logprob, "bytes": data}


def token_entries(tok: Any, tokens: Iterable[Any]) -> list[dict[str, Any]]:
    """OpenAI chat's ``logprobs.content`` (also Ollama's ``logprobs``) for Token messages."""
    out = []
    for t in tokens:
        if t.logprob is None:
            continue
        entry = _entry(tok, t.token, t.logprob)
        entry["top_logprobs"] = [_entry(tok, i, lp) for i, lp in (t.top_logprobs or [])]
        out.append(entry)
    return out


def completion_logprobs(tok: Any, tokens: Iterable[Any], offset: int = 0) -> dict[str, Any]:
    """OpenAI completions' legacy ``logprobs`` object; ``offset`` is the text already sent."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for t in tokens:
        if t.logprob is None:
            continue
        text, _ = _text(tok, t.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({_text(tok, i)[0]: lp for i, lp in (t.top_logprobs or [])})
        out["text_offset"].append(offset)
        offset += len(text)
    return out
