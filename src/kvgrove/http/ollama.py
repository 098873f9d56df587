"""Ollama's API: /api/generate, /api/chat (NDJSON streams), /api/tags, /api/show, /api/ps, ..."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from quart import Blueprint, Response

import kvgrove
from kvgrove.actors.api import Finished, GenerationError, GenerationRequest, Runtime, TextChunk
from kvgrove.http import catalog
from kvgrove.http.common import (
    BadRequest,
    check_model,
    collect,
    context_tokens,
    generation_request,
    get_bool,
    get_dict,
    get_int,
    get_number,
    get_stop,
    get_str,
    predict_limit,
    read_json,
    require_ready,
    runtime,
    tagged,
)
from kvgrove.http.errors import error_body
from kvgrove.http.fields import (
    OLLAMA_CHAT,
    OLLAMA_GENERATE,
    OLLAMA_MESSAGE,
    OLLAMA_OPTIONS,
    OLLAMA_ROLES,
    check_chat_messages,
    check_fields,
    keep_alive_seconds,
    read_request,
)
from kvgrove.http.logprobs import token_entries, with_logprobs
from kvgrove.http.structured import with_grammar
from kvgrove.http.tools import (
    ChatPlan,
    ReplyCalls,
    capabilities,
    chat_plan,
    ollama_fields,
    plain_plan,
)
from kvgrove.sampling import FLOAT_FIELDS, INT_FIELDS, SamplingParams

bp = Blueprint("ollama", __name__)

NS = 1_000_000_000


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def parse_options(body: dict) -> tuple[SamplingParams, int | None, int | None, tuple[str, ...]]:
    """Ollama's `options` -> (sampling params, max tokens or None, num_ctx or None, stop)."""
    requested = get_dict(body, "options")
    check_fields(requested, OLLAMA_OPTIONS, "options.")
    options = {**_manifest_options(), **requested}
    kwargs: dict[str, Any] = {}
    for name in FLOAT_FIELDS:
        value = get_number(options, name, label=f"options.{name}")
        if value is not None:
            kwargs[name] = value
    for name in INT_FIELDS:
        value = get_int(options, name, label=f"options.{name}")
        if value is not None:
            kwargs[name] = value
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        raise BadRequest(f"options.{e}", param="options") from None
    num_predict = get_int(options, "num_predict", -1, label="options.num_predict")
    if num_predict < -2:
        raise BadRequest(
            f"options.num_predict must be >= -2, got {num_predict}", param="options.num_predict"
        )
    num_ctx = get_int(options, "num_ctx", label="options.num_ctx")
    if num_ctx is not None and num_ctx <= 0:
        raise BadRequest(f"options.num_ctx must be > 0, got {num_ctx}", param="options.num_ctx")
    stop = get_stop(options, "stop", label="options.stop")
    return params, (None if num_predict < 0 else num_predict), num_ctx, stop


def _manifest_options() -> dict[str, Any]:
    """The default options of an Ollama store model's params layer (the request's win)."""
    params = getattr(runtime().loaded.info, "params", None) or {}
    known = {*FLOAT_FIELDS, *INT_FIELDS, "num_predict", "num_ctx", "stop"}
    return {k: v for k, v in params.items() if k in known}


def final_fields(done: Finished) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": done.reason,
        "total_duration": int(done.total_seconds * NS),
        "load_duration": 0,
        "prompt_eval_count": done.prompt_tokens,
        "prompt_cache_count": done.cached_tokens,  # kvgrove: prompt tokens reused from the cache
        "prompt_eval_duration": int(done.prefill_seconds * NS),
        "eval_count": done.generated_tokens,
        "eval_duration": int(done.decode_seconds * NS),
    }


async def _respond(
    rt: Runtime,
    model: str,
    request: GenerationRequest,
    stream: bool,
    plan: ChatPlan,
    *,
    chat: bool,
) -> Any:
    gen = rt.generation(request)
    splitter = plan.splitter()
    calls = ReplyCalls(plan)

    def piece(split: Any) -> dict[str, Any]:
        return ollama_fields(split, calls, chat=chat)

    headers = {"X-Request-Id": str(gen.request_id)}
    wants_logprobs = request.params.logprobs

    if not stream:
        try:
            text, tokens, final = await collect(gen)
        except GenerationError as e:
            return error_body(str(e), openai=False, status=500), 500, headers
        body = {"model": model, "created_at": now_iso(), **piece(plan.split_all(text))}
        if wants_logprobs:
            body["logprobs"] = token_entries(rt.loaded.tokenizer, tokens)
        return {**body, **final_fields(final)}, 200, headers

    async def lines() -> AsyncIterator[bytes]:
        async with aclosing(gen.stream()) as events:
            try:
                async for ev in events:
                    if isinstance(ev, TextChunk):
                        split = splitter.feed(ev.text)
                        if not split and not wants_logprobs:
                            continue  # held back: it may be the start of a marker
                        msg = {"model": model, "created_at": now_iso(), **piece(split)}
                        if wants_logprobs:
                            msg["logprobs"] = token_entries(rt.loaded.tokenizer, ev.tokens)
                        msg["done"] = False
                    else:  # the end goes out in one write
                        rest = splitter.finish()
                        head = ""
                        if rest:
                            msg = {"model": model, "created_at": now_iso(), **piece(rest)}
                            head = json.dumps({**msg, "done": False}) + "\n"
                        msg = {"model": model, "created_at": now_iso(), **piece(type(rest)())}
                        msg.update(final_fields(ev))
                        yield (head + json.dumps(msg) + "\n").encode()
                        return
                    yield (json.dumps(msg) + "\n").encode()
            except GenerationError as e:
                yield (json.dumps(error_body(str(e), openai=False)) + "\n").encode()

    response = Response(lines(), mimetype="application/x-ndjson", headers=headers)
    response.timeout = None
    return response


def _load_only(model: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "created_at": now_iso(), **extra, "done": True, "done_reason": "load"}


@bp.post("/api/generate")
async def generate() -> Any:
    rt, body = await read_request(OLLAMA_GENERATE)
    model = check_model(rt, body)
    keep_alive_seconds(body)
    prompt = get_str(body, "prompt", "")
    system = get_str(body, "system")
    raw = get_bool(body, "raw", False)
    stream = get_bool(body, "stream", True)
    params, max_tokens, num_ctx, stop = parse_options(body)
    params = with_logprobs(with_grammar(rt, params, body, api="ollama"), body, api="ollama")
    if prompt == "" and not system:
        return _load_only(model, {"response": ""})
    tok = rt.loaded.tokenizer
    if raw:
        if body.get("think") is not None:
            raise BadRequest(
                "think cannot be combined with raw (no template is used)", param="think"
            )
        plan = plain_plan(rt, prompt)
        ids = tok.encode(prompt, add_special=True)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + (
            [{"role": "user", "content": prompt}] if prompt else []
        )
        plan = chat_plan(rt, body, messages, api="ollama")
        ids = tok.encode(plan.prompt)
    max_tokens = predict_limit(rt, max_tokens, "options.num_predict")
    request = generation_request(
        rt, body, ids, params, max_tokens, stop, api="ollama", num_ctx=num_ctx
    )
    return await _respond(rt, model, request, stream, plan, chat=False)


@bp.post("/api/chat")
async def chat() -> Any:
    rt, body = await read_request(OLLAMA_CHAT)
    model = check_model(rt, body)
    keep_alive_seconds(body)
    messages = check_chat_messages(body.get("messages") or [], OLLAMA_MESSAGE, OLLAMA_ROLES)
    stream = get_bool(body, "stream", True)
    params, max_tokens, num_ctx, stop = parse_options(body)
    params = with_logprobs(with_grammar(rt, params, body, api="ollama"), body, api="ollama")
    if not messages:
        return _load_only(model, {"message": {"role": "assistant", "content": ""}})
    plan = chat_plan(rt, body, messages, api="ollama")
    params = plan.apply(params, body)
    ids = rt.loaded.tokenizer.encode(plan.prompt)
    max_tokens = predict_limit(rt, max_tokens, "options.num_predict")
    request = generation_request(
        rt, body, ids, params, max_tokens, stop, api="ollama", num_ctx=num_ctx
    )
    return await _respond(rt, model, request, stream, plan, chat=True)


def _details(rt: Runtime) -> dict[str, Any]:
    info = rt.loaded.info
    return {
        "parent_model": "",
        "format": info.source_format,
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": _param_size(info.parameters),
        "quantization_level": info.quantization or info.dtype.upper(),
    }


def _param_size(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _model_entry(rt: Runtime) -> dict[str, Any]:
    info = rt.loaded.info
    modified = datetime.datetime.fromtimestamp(rt.started_at, datetime.UTC)
    name = tagged(info.name)
    return {
        "name": name,
        "model": name,
        "modified_at": modified.isoformat().replace("+00:00", "Z"),
        "size": info.nbytes,
        "digest": info.fingerprint,
        "details": _details(rt),
    }


@bp.get("/api/tags")
async def tags() -> Any:
    rt = runtime()
    require_ready(rt)
    entry = _model_entry(rt)
    return {"models": [entry, *catalog.store_entries({entry["name"]})]}


@bp.post("/api/show")
async def show() -> Any:
    rt = runtime()
    body = await read_json()
    require_ready(rt)
    if "name" in body and "model" not in body:
        body = {**body, "model": body["name"]}
    check_model(rt, body)
    info = rt.loaded.info
    return {
        "modelfile": f"FROM {info.path}\n",
        "parameters": catalog.modelfile_parameters(info),
        "template": info.template or rt.loaded.tokenizer.chat_template or "",
        "details": _details(rt),
        "model_info": {
            "general.architecture": info.architecture,
            "general.parameter_count": info.parameters,
            f"{info.architecture}.context_length": info.context_length,
            f"{info.architecture}.block_count": info.num_layers,
            **({"kvgrove.tensor_parallel": info.tensor_parallel} if info.tensor_parallel else {}),
        },
        "capabilities": capabilities(rt.loaded.tokenizer),
        "modified_at": _model_entry(rt)["modified_at"],
    }


@bp.get("/api/ps")
async def ps() -> Any:
    rt = runtime()
    require_ready(rt)
    entry = _model_entry(rt)
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650)
    return {
        "models": [
            {
                **entry,
                "expires_at": expires.isoformat().replace("+00:00", "Z"),
                "size_vram": rt.loaded.info.nbytes,
                "context_length": context_tokens(rt, None),
            },
            *catalog.ps_entries(rt),
        ]
    }


@bp.get("/api/version")
async def version() -> Any:
    return {"version": kvgrove.__version__}


@bp.route("/", methods=["GET", "HEAD"])
async def root() -> Any:
    return Response("Ollama is running", mimetype="text/plain")
