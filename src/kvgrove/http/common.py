"""Request parsing shared by the Ollama and OpenAI routes: typed fields, the model, the limits.

Every validation failure is a `BadRequest` whose message names the field; the routes turn it
into HTTP 400 in their API's error shape before any byte of the response is sent.
"""

from __future__ import annotations

import json
import math
from typing import Any

from quart import request

from kvgrove.actors.runtime import Runtime


class BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


class NotReady(Exception):
    """The model is still loading (or the server is stopping): 503."""


MISSING: Any = object()


async def read_json() -> dict[str, Any]:
    raw = await request.get_data(as_text=True)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadRequest(f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    return body


def _type_error(name: str, what: str, value: Any) -> BadRequest:
    return BadRequest(f"{name} must be {what}, got {json.dumps(value)}", param=name)


def get_str(body: dict, name: str, default: Any = None, *, label: str | None = None) -> Any:
    value = body.get(name, MISSING)
    if value is MISSING or value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(label or name, "a string", value)
    return value


def get_bool(body: dict, name: str, default: bool, *, label: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(label or name, "a boolean", value)
    return value


def get_int(body: dict, name: str, default: Any = None, *, label: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(label or name, "an integer", value)
    return value


def get_number(body: dict, name: str, default: Any = None, *, label: str | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _type_error(label or name, "a number", value)
    return float(value)


def get_dict(body: dict, name: str, *, label: str | None = None) -> dict:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _type_error(label or name, "an object", value)
    return value


def get_stop(body: dict, name: str, *, label: str | None = None) -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _type_error(label or name, "a string or a list of strings", value)


def require_ready(runtime: Runtime) -> None:
    if not runtime.ready:
        raise NotReady("the model is loading" if runtime.state == "loading" else "shutting down")


def model_names(runtime: Runtime) -> set[str]:
    info = runtime.loaded.info
    return {info.name, f"{info.name}:latest", info.path}


def check_model(runtime: Runtime, body: dict, *, required: bool = True) -> str:
    """The request's model name, which must be the loaded model."""
    from kvgrove.models import bundled

    name = get_str(body, "model")
    info = runtime.loaded.info
    if name is None or name == "":
        if required:
            raise BadRequest("model is required", param="model")
        return info.name
    spec = bundled.lookup(name.removesuffix(":latest"))
    if name in model_names(runtime) or (spec is not None and spec.name == info.name):
        return name
    raise BadRequest(f"model {name!r} not found (this server serves {info.name!r})", param="model")


def context_tokens(runtime: Runtime, num_ctx: int | None) -> int:
    """The request's context limit: min(num_ctx or the default, the model's maximum, the cap)."""
    settings = runtime.settings
    limit = runtime.loaded.info.context_length
    if settings.max_context_tokens:
        limit = min(limit, settings.max_context_tokens)
    return min(num_ctx or settings.default_context_tokens, limit)


def check_prompt_length(n_tokens: int, limit: int) -> None:
    if n_tokens == 0:
        raise BadRequest("the prompt is empty", param="prompt")
    if n_tokens >= limit:
        raise BadRequest(
            f"input length ({n_tokens} tokens) exceeds the model's maximum context length "
            f"({limit} tokens)",
            param="prompt",
        )


def check_messages(messages: Any, name: str = "messages") -> list[dict]:
    if not isinstance(messages, list):
        raise _type_error(name, "a list", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _type_error(f"{name}[{i}]", "an object", m)
        role = m.get("role")
        if not isinstance(role, str):
            raise _type_error(f"{name}[{i}].role", "a string", role)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise BadRequest(
                        f"{name}[{i}].content[{j}]: only text parts are supported",
                        param=f"{name}[{i}].content",
                    )
                texts.append(str(part.get("text", "")))
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _type_error(f"{name}[{i}].content", "a string", content)
        out.append({**m, "role": role, "content": content})
    return out


def render_chat(runtime: Runtime, messages: list[dict], tools: Any = None) -> str:
    from kvgrove.tokenize.chat import ChatTemplateError

    try:
        return runtime.loaded.tokenizer.apply_chat_template(messages, tools=tools)
    except ChatTemplateError as e:
        raise BadRequest(str(e), param="messages") from None
