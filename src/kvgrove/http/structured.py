"""Structured-output request fields of both APIs -> one llguidance grammar (or None).

- Ollama: ``format`` is ``"json"`` (any JSON object) or a JSON schema, on generate and chat.
- OpenAI: ``response_format`` is ``{"type": "text"}``, ``{"type": "json_object"}`` or
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``. ``strict`` may be
  true or false: either way the output is constrained to the schema (stricter than asked).
- kvgrove's extension, both APIs: ``grammar`` is ``{"lark": "..."}`` or ``{"regex": "..."}``.

A grammar the engine rejects is a 400 naming the field and the engine's reason.
"""

from __future__ import annotations

from typing import Any

import attrs

from kvgrove.grammar import (
    GrammarError,
    any_json_grammar,
    check_grammar,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
)
from kvgrove.http.common import BadRequest


def with_grammar(rt: Any, params: Any, body: dict, *, api: str) -> Any:
    """``params`` with the request's grammar, checked against the model's vocabulary."""
    grammar, field = _requested(body, api)
    if grammar is None:
        return params
    try:
        check_grammar(grammar, rt.loaded.tokenizer)
    except GrammarError as e:
        raise BadRequest(f"{field}: the grammar engine rejected it: {e}", param=field) from None
    return attrs.evolve(params, grammar=grammar)


def _requested(body: dict, api: str) -> tuple[str | None, str]:
    found = []
    if api == "ollama" and body.get("format") not in (None, ""):
        found.append((ollama_format(body["format"]), "format"))
    if api == "openai" and body.get("response_format") is not None:
        grammar = openai_response_format(body["response_format"])
        if grammar is not None:
            found.append((grammar, "response_format"))
    if body.get("grammar") is not None:
        found.append((extension_grammar(body["grammar"]), "grammar"))
    if len(found) > 1:
        names = " and ".join(f for _, f in found)
        raise BadRequest(f"{names} cannot be combined", param=found[1][1])
    return found[0] if found else (None, "")


def _schema(schema: Any, field: str) -> str:
    try:
        return json_schema_grammar(schema)
    except GrammarError as e:
        raise BadRequest(f"{field}: {e}", param=field) from None


def ollama_format(value: Any) -> str:
    if value == "json":
        return any_json_grammar()
    if isinstance(value, dict):
        return _schema(value, "format")
    raise BadRequest('format must be "json" or a JSON schema object', param="format")


def openai_response_format(value: Any) -> str | None:
    if not isinstance(value, dict):
        raise BadRequest("response_format must be an object", param="response_format")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return any_json_grammar()
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise BadRequest(
                "response_format.json_schema must be an object with a name",
                param="response_format.json_schema",
            )
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise BadRequest(
                "response_format.json_schema.strict must be a boolean",
                param="response_format.json_schema.strict",
            )
        return _schema(spec.get("schema", {}), "response_format.json_schema.schema")
    raise BadRequest(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}",
        param="response_format.type",
    )


def extension_grammar(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, text),) = value.items()
        if kind == "lark" and isinstance(text, str):
            return lark_grammar(text)
        if kind == "regex" and isinstance(text, str):
            return regex_grammar(text)
    raise BadRequest('grammar must be {"lark": "..."} or {"regex": "..."}', param="grammar")
