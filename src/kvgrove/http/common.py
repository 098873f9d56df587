"""Request parsing shared by the Ollama and OpenAI routes: typed fields, the model, the limits.

Every validation failure is a `BadRequest` whose message names the field; the routes turn it
into HTTP 400 in their API's error shape before any byte of the response is sent.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import aclosing
from typing import Any

from quart import current_app, request

from kvgrove.actors.api import Finished, GenerationRequest, Runtime, TextChunk
from kvgrove.http.guard import KEY_ID_SCOPE


class BadRequest(Exception):
    def __init__(
        self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code


class NotReady(Exception):
    """The model is still loading (or the server is stopping): 503."""


MISSING: Any = object()


def runtime() -> Runtime:
    """The running server's Runtime (the app's one handle on the actors)."""
    return current_app.config["KVGROVE_RUNTIME"]


MAX_JSON_DEPTH = 64
INT64 = 2**63


async def read_json() -> dict[str, Any]:
    """The body as a JSON object. Anything else is a 400 that says what is wrong with it:
    not UTF-8, not JSON, numbers past the parser's limits, nesting deeper than MAX_JSON_DEPTH,
    strings holding lone surrogates (which no tokenizer can encode). Bodies over the size
    limit never get here: Quart answers 413."""
    raw = await request.get_data()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not valid UTF-8: {e}") from None
    if not text.strip():
        return {}
    try:
        body = json.loads(text)
    except RecursionError:
        raise BadRequest(f"invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, and integers past the digit limit
        raise BadRequest(f"invalid JSON body: {_clip(str(e))}") from None
    if not isinstance(body, dict):
        raise BadRequest("the JSON body must be an object")
    _check_tree(body)
    return body


def _check_tree(body: Any) -> None:
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_text(k)
                stack.append((v, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, str):
            _check_text(value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("invalid JSON body: a string holds a lone surrogate escape") from None


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _type_error(name: str, what: str, value: Any) -> BadRequest:
    return BadRequest(f"{name} must be {what}, got {_clip(json.dumps(value))}", param=name)


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
    if not -INT64 <= value < INT64:
        raise _type_error(label or name, "a 64-bit integer", value)
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


def cache_namespace(body: dict) -> str:
    """The prefix-cache namespace of this request: its API key's identity (when keys are on)
    combined with the body's `cache_salt`. "" (shared) when there is neither. Requests share
    cached prompts only within one namespace, so one tenant cannot time another's."""
    kid = request.scope.get(KEY_ID_SCOPE, "")
    salt = get_str(body, "cache_salt", "")
    if not kid and not salt:
        return ""
    digest = hashlib.sha256(b"kvgrove-ns\0" + kid.encode() + b"\0" + salt.encode())
    return digest.hexdigest()[:32]


def predict_limit(runtime: Runtime, value: int | None, name: str) -> int:
    """The tokens to generate at most: `value` (None = until the context limit), which must not
    exceed the server's max_predict_tokens (400 naming the field); None becomes that cap."""
    cap = runtime.settings.max_predict_tokens
    if value is None:
        return cap
    if value > cap:
        raise BadRequest(f"{name} must be <= {cap}, got {value}", param=name)
    return value


async def collect(gen: Any) -> tuple[str, list, Finished]:
    """A generation read whole (a reply not streamed): its text, its tokens and how it
    finished. Raises the stream's GenerationError."""
    texts: list[str] = []
    tokens: list = []
    final: Finished | None = None
    async with aclosing(gen.stream()) as events:
        async for ev in events:
            if isinstance(ev, TextChunk):
                texts.append(ev.text)
                tokens.extend(ev.tokens)
            else:
                final = ev
    assert final is not None
    return "".join(texts), tokens, final


def require_ready(runtime: Runtime) -> None:
    if not runtime.ready:
        raise NotReady("the model is loading" if runtime.state == "loading" else "shutting down")


def tagged(name: str) -> str:
    """Ollama's full form of a model name: `:latest` added when it names no tag."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def model_names(runtime: Runtime) -> set[str]:
    info = runtime.loaded.info
    names = {info.name, tagged(info.name), info.name.removesuffix(":latest"), info.path}
    if runtime.registry is not None and runtime.loaded is runtime.default_loaded:
        names |= runtime.registry.own_aliases
    return names


def check_model(runtime: Runtime, body: dict) -> str:
    """The request's model name, which must be the loaded model."""
    from kvgrove.models import bundled

    name = get_str(body, "model")
    info = runtime.loaded.info
    if name is None or name == "":
        raise BadRequest("model is required", param="model")
    spec = bundled.lookup(name.removesuffix(":latest"))
    if name in model_names(runtime) or (spec is not None and spec.name == info.name):
        return name
    # 404, as Ollama and OpenAI answer (clients such as Open WebUI offer a pull on it).
    raise BadRequest(
        f"model {name!r} not found (this server serves {info.name!r})",
        param="model",
        status=404,
        code="model_not_found",
    )


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


def generation_request(
    runtime: Runtime,
    body: dict,
    ids: list[int],
    params: Any,
    max_tokens: int,
    stop: tuple[str, ...],
    *,
    api: str,
    num_ctx: int | None = None,
) -> GenerationRequest:
    """What the scheduler runs, once the prompt fits the request's context limit."""
    limit = context_tokens(runtime, num_ctx)
    check_prompt_length(len(ids), limit)
    return GenerationRequest(
        tuple(ids), params, max_tokens, limit, stop, api=api, namespace=cache_namespace(body)
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
                if isinstance(part, dict) and part.get("type") in ("image_url", "input_image"):
                    raise BadRequest(
                        f"{name}[{i}].content[{j}]: the loaded model has no vision tower and "
                        "cannot read images",
                        param=f"{name}[{i}].content",
                    )
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
