"""OpenAI's API: /v1/chat/completions, /v1/completions (SSE with `data: [DONE]`), /v1/models."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response

from kvgrove.actors.api import Finished, GenerationError, GenerationRequest, Runtime, TextChunk
from kvgrove.http.catalog import store_entries
from kvgrove.http.common import (
    BadRequest,
    check_model,
    collect,
    generation_request,
    get_bool,
    get_dict,
    get_int,
    get_number,
    get_stop,
    predict_limit,
    require_ready,
    runtime,
    tagged,
)
from kvgrove.http.errors import error_body
from kvgrove.http.fields import (
    OPENAI_CHAT,
    OPENAI_COMPLETIONS,
    OPENAI_MESSAGE,
    OPENAI_ROLES,
    check_chat_messages,
    read_request,
)
from kvgrove.http.logprobs import completion_logprobs, token_entries, with_logprobs
from kvgrove.http.structured import with_grammar
from kvgrove.http.tools import ChatPlan, OpenAIStream, ReplyCalls, chat_plan, openai_message
from kvgrove.sampling import SamplingParams

bp = Blueprint("openai", __name__)


def parse_sampling(rt: Runtime, body: dict) -> tuple[SamplingParams, int, tuple[str, ...]]:
    kwargs: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = get_number(body, name)
        if value is not None:
            kwargs[name] = value
    seed = get_int(body, "seed")
    if seed is not None:
        kwargs["seed"] = seed
    if kwargs.get("temperature", 1.0) > 2:
        raise BadRequest("temperature must be in [0, 2]", param="temperature")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= kwargs.get(name, 0.0) <= 2:
            raise BadRequest(f"{name} must be in [-2, 2]", param=name)
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        raise BadRequest(str(e), param=str(e).split()[0]) from None
    field = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = get_int(body, field)
    if max_tokens is not None and max_tokens < 1:
        raise BadRequest(f"{field} must be >= 1, got {max_tokens}", param=field)
    max_tokens = predict_limit(rt, max_tokens, field)
    n = get_int(body, "n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    stop = get_stop(body, "stop")
    if len(stop) > 4:
        raise BadRequest("stop may hold at most 4 strings", param="stop")
    return params, max_tokens, stop


def usage(done: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.generated_tokens,
        "total_tokens": done.prompt_tokens + done.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


DONE = b"data: [DONE]\n\n"


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _respond(
    rt: Runtime,
    body: dict,
    model: str,
    request: GenerationRequest,
    *,
    chat: bool,
    plan: ChatPlan | None = None,
) -> Any:
    stream = get_bool(body, "stream", False)
    include_usage = get_bool(
        get_dict(body, "stream_options"), "include_usage", False, label="stream_options"
    )
    gen = rt.generation(request)
    prefix = "chatcmpl" if chat else "cmpl"
    ident = f"{prefix}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    headers = {"X-Request-Id": str(gen.request_id)}

    wants_logprobs = request.params.logprobs
    sent = 0  # characters of completion text sent so far (for text_offset)

    def logprobs_of(tokens: tuple) -> Any:
        if not wants_logprobs:
            return None
        if not chat:
            return completion_logprobs(rt.loaded.tokenizer, tokens, sent)
        return {"content": token_entries(rt.loaded.tokenizer, tokens), "refusal": None}

    splitter = plan.splitter() if plan is not None else None
    calls = ReplyCalls(plan) if plan is not None else None
    streamed = OpenAIStream(splitter, calls) if plan is not None else None

    def choice(
        text: str | None,
        finish: str | None,
        *,
        delta: bool,
        tokens: tuple = (),
        message: dict | None = None,
    ) -> dict[str, Any]:
        logprobs = logprobs_of(tokens) if (tokens or not delta) else None
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        key = "delta" if delta else "message"
        content = {} if text is None else {"role": "assistant", "content": text}
        if message is not None:
            content = message
        return {"index": 0, key: content, "logprobs": logprobs, "finish_reason": finish}

    def finish_reason(reason: str) -> str:
        return "tool_calls" if calls is not None and calls.made else reason

    def envelope(choices: list, **extra: Any) -> dict[str, Any]:
        kind = obj + ".chunk" if (stream and chat) else obj
        return {
            "id": ident,
            "object": kind,
            "created": created,
            "model": model,
            "system_fingerprint": f"kvgrove-{rt.loaded.info.fingerprint}",
            "choices": choices,
            **extra,
        }

    if not stream:
        try:
            text, tokens, final = await collect(gen)
        except GenerationError as e:
            return error_body(str(e), openai=True, status=500), 500, headers
        message = openai_message(plan.split_all(text), calls) if plan is not None else None
        only = choice(
            text, finish_reason(final.reason), delta=False, tokens=tuple(tokens), message=message
        )
        return envelope([only], usage=usage(final)), headers

    # A chunk's envelope is the same every time but for its choice: encoded once, the choice
    # appended (byte for byte what _sse(envelope([c])) gives; "choices" is its last key).
    head = f"data: {json.dumps(envelope([]))[: -len('[]}')]}"

    def frame(c: dict) -> bytes:
        return f"{head}[{json.dumps(c)}]}}\n\n".encode()

    async def events_out() -> AsyncIterator[bytes]:
        nonlocal sent
        async with aclosing(gen.stream()) as events:
            try:
                async for ev in events:
                    if isinstance(ev, TextChunk) and splitter is not None:
                        deltas = streamed.deltas(splitter.feed(ev.text))
                        if not deltas and wants_logprobs:
                            deltas = [{}]  # the tokens' logprobs, their text held back
                        for k, d in enumerate(deltas):
                            toks = ev.tokens if k == 0 else ()
                            c = choice(None, None, delta=True, tokens=toks, message=d)
                            yield frame(c)
                    elif isinstance(ev, TextChunk):
                        yield frame(choice(ev.text, None, delta=True, tokens=ev.tokens))
                        sent += len(ev.text)
                    else:
                        # The end goes out in one write (on the H200 each write cost the trio
                        # thread ~0.2 ms, 64 streams ending together ~4 writes each).
                        frames = []
                        if splitter is not None:
                            for d in streamed.deltas(splitter.finish()):
                                frames.append(frame(choice(None, None, delta=True, message=d)))
                        last = choice(None if chat else "", finish_reason(ev.reason), delta=True)
                        frames.append(frame(last))
                        if include_usage:
                            frames.append(_sse(envelope([], usage=usage(ev))))
                        yield b"".join([*frames, DONE])
                        return
            except GenerationError as e:
                yield _sse(error_body(str(e), openai=True, status=500))
        yield DONE

    response = Response(events_out(), mimetype="text/event-stream", headers=headers)
    response.timeout = None
    return response


def _prepare(
    rt: Runtime,
    body: dict,
    render: Callable[[], str],
    *,
    add_special: bool,
    chat: bool,
    plan: ChatPlan | None = None,
) -> tuple[str, GenerationRequest]:
    model = check_model(rt, body)
    params, max_tokens, stop = parse_sampling(rt, body)
    api = "openai" if chat else "openai-completions"
    params = with_logprobs(with_grammar(rt, params, body, api=api), body, api=api)
    if plan is not None:
        params = plan.apply(params, body)
    ids = rt.loaded.tokenizer.encode(render(), add_special=add_special)
    return model, generation_request(rt, body, ids, params, max_tokens, stop, api="openai")


@bp.post("/v1/chat/completions")
async def chat_completions() -> Any:
    rt, body = await read_request(OPENAI_CHAT)
    if "messages" not in body:
        raise BadRequest("messages is required", param="messages")
    messages = check_chat_messages(body["messages"], OPENAI_MESSAGE, OPENAI_ROLES)
    if not messages:
        raise BadRequest("messages must not be empty", param="messages")
    plan = chat_plan(rt, body, messages, api="openai")
    model, request = _prepare(
        rt, body, lambda: plan.prompt, add_special=False, chat=True, plan=plan
    )
    return await _respond(rt, body, model, request, chat=True, plan=plan)


@bp.post("/v1/completions")
async def completions() -> Any:
    rt, body = await read_request(OPENAI_COMPLETIONS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string", param="prompt")
    model, request = _prepare(rt, body, lambda: prompt, add_special=True, chat=False)
    return await _respond(rt, body, model, request, chat=False)


@bp.get("/v1/models")
async def models() -> Any:
    rt = runtime()
    require_ready(rt)
    info = rt.loaded.info
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": int(rt.started_at),
                "owned_by": "kvgrove",
            }
            for name in (info.name, *(e["name"] for e in store_entries({tagged(info.name)})))
        ],
    }
