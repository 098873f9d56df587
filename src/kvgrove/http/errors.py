"""The error bodies of the two APIs, built in one place for the routes, the app and the guard."""

from __future__ import annotations

from typing import Any


def is_openai(path: str) -> bool:
    """Whether `path` is one of OpenAI's routes (which answer in OpenAI's error shape)."""
    return path.startswith("/v1/")


def error_body(
    message: str,
    *,
    openai: bool,
    status: int = 400,
    param: str | None = None,
    kind: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Ollama's `{"error": message}`, or OpenAI's `{"error": {message, type, param, code}}` whose
    type is `kind`, by default what `status` says (a client's error or the server's)."""
    if not openai:
        return {"error": message}
    if kind is None:
        kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
