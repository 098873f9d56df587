"""The OpenAPI 3.1 description of the server, served at /openapi.json.

Written by hand, next to the routes it describes; tests/http/test_access.py checks that its
paths and methods are exactly the app's route table, and the fuzz tests draw from its schemas'
field names. Unknown fields in a body are accepted and ignored (as Ollama and OpenAI do).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

import kvgrove

bp = Blueprint("openapi", __name__)

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(schema: str) -> dict[str, Any]:
    return {"required": False, "content": {_JSON: {"schema": _ref(schema)}}}


def _ok(description: str, media: str = _JSON, schema: dict | None = None) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema or {}}}}


def _errors(api: str, *codes: int) -> dict[str, Any]:
    schema = _ref("OpenAIError" if api == "openai" else "OllamaError")
    text = {
        400: "Invalid request; the message names the field",
        401: "Missing or wrong API key (only when keys are configured)",
        404: "No such model here; for /api/pull, not a source kvgrove can fetch (the message says)",
        413: "Request body over max_body_bytes",
        429: "Over the concurrency and queue limits; see Retry-After",
        500: "Internal error (always with a JSON error body)",
        503: "The model is loading or the server is stopping",
    }
    out = {}
    for code in codes:
        out[str(code)] = {"description": text[code], "content": {_JSON: {"schema": schema}}}
        if code == 429:
            out[str(code)]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return out


_GEN_ERRORS = (400, 401, 404, 413, 429, 500, 503)

_OPTIONS = {
    "type": "object",
    "properties": {
        **{k: {"type": "number"} for k in ("temperature", "top_p", "min_p", "repeat_penalty")},
        **{k: {"type": "number"} for k in ("presence_penalty", "frequency_penalty")},
        "top_k": {"type": "integer"},
        "repeat_last_n": {"type": "integer", "minimum": -1},
        "seed": {"type": "integer"},
        "num_predict": {
            "type": "integer",
            "minimum": -2,
            "description": "-1/-2 = until the context limit, capped at max_predict_tokens; "
            "larger values than max_predict_tokens get 400",
        },
        "num_ctx": {"type": "integer", "minimum": 1},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string"},
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "null"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type"],
                        "properties": {
                            "type": {"const": "text"},
                            "text": {"type": "string"},
                        },
                    },
                },
            ]
        },
    },
}

_SALT = {
    "type": "string",
    "description": "Mixed into the prefix-cache namespace (with the API key's identity): "
    "requests share cached prompts only when both match",
}

_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

_OPENAI_COMMON = {
    "model": {"type": "string"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "n": {"const": 1},
    "stop": _STOP,
    "cache_salt": _SALT,
}

SCHEMAS: dict[str, Any] = {
    "OllamaError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "GenerateRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": "string", "description": "empty (with no system) = load only"},
            "system": {"type": "string"},
            "raw": {"type": "boolean"},
            "stream": {"type": "boolean", "default": True},
            "options": _OPTIONS,
            "keep_alive": {},
            "cache_salt": _SALT,
        },
    },
    "ChatRequest": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": _MESSAGE},
            "tools": {"type": "array"},
            "stream": {"type": "boolean", "default": True},
            "options": _OPTIONS,
            "keep_alive": {},
            "cache_salt": _SALT,
        },
    },
    "ShowRequest": {
        "type": "object",
        "properties": {"model": {"type": "string"}, "name": {"type": "string"}},
    },
    "PullRequest": {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "name": {"type": "string"},
            "stream": {"type": "boolean"},
            "insecure": {"type": "boolean"},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            **_OPENAI_COMMON,
            "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
            "tools": {"type": "array"},
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            **_OPENAI_COMMON,
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            },
        },
    },
}

_SECURED = [{"bearer": []}]


def _op(summary: str, responses: dict, body: str | None = None, *, open_: bool = False) -> dict:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        op["requestBody"] = _body(body)
    if open_:
        op["security"] = []
    return op


def _gen(summary: str, body: str, api: str, media: str) -> dict:
    return _op(
        summary,
        {"200": _ok("The answer, or its stream", media), **_errors(api, *_GEN_ERRORS)},
        body,
    )


def _get(summary: str, api: str = "ollama", *, media: str = _JSON, open_: bool = False) -> dict:
    codes = (503,) if open_ else (401, 503)
    return {"get": _op(summary, {"200": _ok(summary, media), **_errors(api, *codes)}, open_=open_)}


PATHS: dict[str, Any] = {
    "/api/generate": {
        "post": _gen("Ollama generate", "GenerateRequest", "ollama", "application/x-ndjson")
    },
    "/api/chat": {"post": _gen("Ollama chat", "ChatRequest", "ollama", "application/x-ndjson")},
    "/api/show": {
        "post": _op(
            "Ollama show",
            {"200": _ok("Model details"), **_errors("ollama", 400, 401, 404, 413, 503)},
            "ShowRequest",
        )
    },
    "/api/pull": {
        "post": _op(
            "Ollama pull: bundled models and Hugging Face repos, with progress lines",
            {
                "200": _ok("Progress lines, then success", "application/x-ndjson"),
                **_errors("ollama", 400, 401, 404, 413, 500),
            },
            "PullRequest",
        )
    },
    "/api/tags": _get("Models available"),
    "/api/ps": _get("Models loaded"),
    "/api/version": _get("Server version"),
    "/": {
        "get": _op("Ollama is running", {"200": _ok("Liveness", "text/plain")}, open_=True),
        "head": _op("Ollama is running", {"200": {"description": "Liveness"}}, open_=True),
    },
    "/v1/chat/completions": {
        "post": _gen(
            "OpenAI chat completions", "ChatCompletionRequest", "openai", "text/event-stream"
        )
    },
    "/v1/completions": {
        "post": _gen("OpenAI completions", "CompletionRequest", "openai", "text/event-stream")
    },
    "/v1/models": _get("OpenAI models", "openai"),
    "/health": _get('503 while loading, then {"status": "ok"}', open_=True),
    "/api/memory": _get("The byte ledger and MLX memory"),
    "/api/cache": {
        "get": {
            **_get("Prefix-cache summary: nodes, tokens, bytes and moves by tier, hit counters")[
                "get"
            ],
            "parameters": [
                {
                    "name": "check",
                    "in": "query",
                    "required": False,
                    "description": "1 or true: check (and repair) the trie against its tiers and "
                    "disk folder first; the report is under `integrity`",
                    "schema": {"type": "string", "enum": ["0", "1", "true", "false"]},
                }
            ],
        }
    },
    "/metrics": _get("Prometheus metrics", media="text/plain"),
    "/openapi.json": _get("This description", open_=True),
}


def spec() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "kvgrove",
            "version": kvgrove.__version__,
            "description": "Ollama- and OpenAI-compatible LLM inference with a prefix cache.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": _SECURED,
    }


@bp.get("/openapi.json")
async def openapi_json() -> Any:
    return spec()
