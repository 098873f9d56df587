"""Every request field of both APIs, and what the server does with it (the README's table).

Each generation route checks its body against its table: a field the table does not know is a
400 naming it (the OpenAI API answers unknown arguments the same way; for Ollama, whose server
drops them, kvgrove is stricter so nothing is silently ignored). A field marked REJECT is a 400
naming it unless it holds its neutral value (absent, null, or the value in `neutral`). IGNORE
fields are accepted and have no effect, each with its reason. SUPPORTED fields are parsed by
the routes (tool calls and the reasoning split: kvgrove.http.tools).

Also here: chat roles, `keep_alive` (Go durations, as Ollama parses them) and images.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from kvgrove import timeline
from kvgrove.actors.api import Runtime
from kvgrove.http.common import BadRequest, check_messages, read_json, require_ready, runtime

SUPPORTED = "supported"
IGNORE = "accepted, ignored"
REJECT = "rejected (400) unless neutral"

# field -> (state, note; for REJECT the neutral values as a tuple in `NEUTRAL`)
Table = dict[str, tuple[str, str]]

_TOOLS = (
    "rendered by the model's chat template (a generic instruction if it knows none); calls "
    "parsed with mlx-lm's tool parser for the family"
)
_THINK = (
    "reasoning split into thinking; false renders the template with enable_thinking=false "
    "where it supports that; effort strings where the template reads reasoning_effort"
)

# Rows more than one table holds, and the runs of rows both tables of an API hold.
_MODEL = (SUPPORTED, "must name the loaded model")
_CACHE_SALT = (SUPPORTED, "kvgrove: prefix-cache namespace")
_GRAMMAR = (SUPPORTED, 'kvgrove: {"lark": ...} or {"regex": ...}, constrained decoding')
_TRUNCATE = (REJECT, "a prompt over the context is 400, never truncated")
_SHIFT = (REJECT, "no context shifting: generation stops at the context limit")
_OLLAMA_REQUEST: Table = {
    "stream": (SUPPORTED, ""),
    "options": (SUPPORTED, "see the options table"),
    "keep_alive": (
        SUPPORTED,
        "Go durations; idle time of a model loaded on demand (--model stays)",
    ),
}
_OLLAMA_OUTPUT: Table = {
    "format": (SUPPORTED, '"json" or a JSON schema: constrained decoding (llguidance)'),
    "grammar": _GRAMMAR,
    "think": (SUPPORTED, _THINK),
    "logprobs": (SUPPORTED, ""),
    "top_logprobs": (SUPPORTED, "0-20"),
}


def _openai_request(**after_max_tokens: tuple[str, str]) -> Table:
    """The sampling, streaming and namespace rows of both OpenAI endpoints."""
    return {
        "temperature": (SUPPORTED, ""),
        "top_p": (SUPPORTED, ""),
        "presence_penalty": (SUPPORTED, ""),
        "frequency_penalty": (SUPPORTED, ""),
        "seed": (SUPPORTED, ""),
        "max_tokens": (SUPPORTED, ""),
        **after_max_tokens,
        "n": (SUPPORTED, "1 only; other values are 400"),
        "stop": (SUPPORTED, "up to 4 strings"),
        "stream": (SUPPORTED, ""),
        "stream_options": (SUPPORTED, "include_usage"),
        "cache_salt": _CACHE_SALT,
        "user": (IGNORE, "no per-user accounting; keys namespace the cache"),
    }


OLLAMA_GENERATE: Table = {
    "model": _MODEL,
    "prompt": (SUPPORTED, ""),
    "system": (SUPPORTED, ""),
    "raw": (SUPPORTED, ""),
    **_OLLAMA_REQUEST,
    "images": (REJECT, "no model served has a vision tower: 400 says so"),
    "suffix": (REJECT, "fill-in-the-middle is not implemented"),
    "template": (REJECT, "the model's own chat template is always used"),
    "context": (REJECT, "deprecated token context: send the conversation (the cache reuses it)"),
    "truncate": _TRUNCATE,
    "shift": _SHIFT,
    "width": (REJECT, "image generation is not implemented"),
    "height": (REJECT, "image generation is not implemented"),
    "steps": (REJECT, "image generation is not implemented"),
    "cache_salt": _CACHE_SALT,
    **_OLLAMA_OUTPUT,
}

OLLAMA_CHAT: Table = {
    "model": _MODEL,
    "messages": (SUPPORTED, "roles system, user, assistant, tool"),
    **_OLLAMA_REQUEST,
    "truncate": _TRUNCATE,
    "shift": _SHIFT,
    "cache_salt": _CACHE_SALT,
    "tools": (SUPPORTED, _TOOLS),
    **_OLLAMA_OUTPUT,
}

OLLAMA_MESSAGE: Table = {
    "role": (SUPPORTED, ""),
    "content": (SUPPORTED, ""),
    "images": (REJECT, "no model served has a vision tower: 400 says so"),
    "tool_calls": (SUPPORTED, "assistant calls, rendered by the template"),
    "tool_name": (SUPPORTED, "a tool result's function"),
    "thinking": (SUPPORTED, "earlier reasoning, given to the template as reasoning_content"),
}

OLLAMA_OPTIONS: Table = {
    **{
        name: (SUPPORTED, "")
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "top_k",
            "repeat_penalty",
            "repeat_last_n",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "num_predict",
            "num_ctx",
            "stop",
        )
    },
    "num_keep": (IGNORE, "no context shifting: generation stops at the context limit"),
    "penalize_newline": (IGNORE, "deprecated in Ollama, which ignores it too"),
    **{
        name: (IGNORE, "hardware placement: MLX decides")
        for name in (
            "numa",
            "num_batch",
            "num_gpu",
            "main_gpu",
            "low_vram",
            "f16_kv",
            "use_mmap",
            "use_mlock",
            "num_thread",
            "vocab_only",
            "logits_all",
            "embedding_only",
        )
    },
    "typical_p": (REJECT, "locally typical sampling is not implemented"),
    "tfs_z": (REJECT, "tail-free sampling is not implemented"),
    "mirostat": (REJECT, "mirostat sampling is not implemented"),
    "mirostat_tau": (IGNORE, "only used by mirostat, which is rejected"),
    "mirostat_eta": (IGNORE, "only used by mirostat, which is rejected"),
}

OPENAI_CHAT: Table = {
    "model": _MODEL,
    "messages": (SUPPORTED, "roles system, developer, user, assistant, tool"),
    **_openai_request(max_completion_tokens=(SUPPORTED, "")),
    "safety_identifier": (IGNORE, "no per-user accounting"),
    "prompt_cache_key": (IGNORE, "the prefix cache matches every prompt by its tokens"),
    "metadata": (IGNORE, "stored nowhere (store is false)"),
    "service_tier": (IGNORE, "one tier"),
    "store": (REJECT, "completions are not stored"),
    "logit_bias": (REJECT, "not implemented"),
    "audio": (REJECT, "text only"),
    "modalities": (REJECT, "text only"),
    "prediction": (REJECT, "predicted outputs are not implemented"),
    "web_search_options": (REJECT, "no web search"),
    "verbosity": (REJECT, "not implemented"),
    "response_format": (SUPPORTED, "text, json_object, json_schema: constrained decoding"),
    "grammar": _GRAMMAR,
    "tools": (SUPPORTED, _TOOLS),
    "tool_choice": (
        SUPPORTED,
        "none, auto, required, a named function; required and named constrain decoding to "
        "the model's call syntax with the arguments' schema",
    ),
    "parallel_tool_calls": (
        SUPPORTED,
        "false: at most one call is returned; required/named make exactly one",
    ),
    "functions": (REJECT, "deprecated: use tools"),
    "function_call": (REJECT, "deprecated: use tool_choice"),
    "logprobs": (SUPPORTED, ""),
    "top_logprobs": (SUPPORTED, "0-20, with logprobs"),
    "reasoning_effort": (
        SUPPORTED,
        "passed to templates that read it; none turns thinking off where the template can; "
        "other values 400",
    ),
}

OPENAI_MESSAGE: Table = {
    "role": (SUPPORTED, ""),
    "content": (SUPPORTED, "a string, or text parts; image/audio/file parts are 400"),
    "name": (IGNORE, "the chat templates have no participant names"),
    "refusal": (IGNORE, "history only"),
    "tool_calls": (SUPPORTED, "assistant calls (ids required), rendered by the template"),
    "tool_call_id": (SUPPORTED, "required on tool messages; must answer an earlier call"),
    "reasoning_content": (SUPPORTED, "earlier reasoning, given to the template"),
    "function_call": (REJECT, "deprecated: use tool_calls"),
    "audio": (REJECT, "text only"),
}

OPENAI_COMPLETIONS: Table = {
    "model": _MODEL,
    "prompt": (SUPPORTED, "a string (or a list of one)"),
    **_openai_request(),
    "best_of": (REJECT, "only 1"),
    "echo": (REJECT, "not implemented"),
    "suffix": (REJECT, "fill-in-the-middle is not implemented"),
    "logit_bias": (REJECT, "not implemented"),
    "logprobs": (SUPPORTED, "0-5"),
    "grammar": _GRAMMAR,
}

# The neutral values of REJECT fields (besides absent and null): sending these is accepted.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "images": ([],),
    "suffix": ("",),
    "template": ("",),
    "context": ([],),
    "typical_p": (1, 1.0),
    "tfs_z": (1, 1.0),
    "mirostat": (0,),
    "store": (False,),
    "logit_bias": ({},),
    "modalities": (["text"],),
    "best_of": (1,),
    "echo": (False,),
    "verbosity": ("medium",),
    "truncate": (False,),
    "shift": (False,),
    # Clients send these empty when the caller gave none.
    "functions": ([],),
}

OLLAMA_ROLES = ("system", "user", "assistant", "tool")
OPENAI_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_fields(body: dict, table: Table, where: str = "") -> None:
    """400 naming the first field of `body` that `table` does not know, or that it rejects
    with a value other than its neutral ones."""
    for name, value in body.items():
        label = f"{where}{name}"
        entry = table.get(name)
        if entry is None:
            raise BadRequest(f"unknown field {label!r}: not part of this API", param=label)
        state, why = entry
        if state == REJECT and value is not None and value not in NEUTRAL.get(name, ()):
            if name == "images":
                raise images_error(label)
            raise BadRequest(f"{label} is not supported: {why}", param=label)


async def read_request(table: Table) -> tuple[Runtime, dict]:
    """A generation route's start: the runtime, and the JSON body once the model is ready and
    `table` knows every field of it."""
    if (rec := timeline.recorder) is not None:
        rec.add("request")
    rt = runtime()
    body = await read_json()
    require_ready(rt)
    check_fields(body, table)
    return rt, body


def check_chat_messages(
    messages: Any, table: Table, roles: tuple[str, ...], name: str = "messages"
) -> list[dict]:
    """`messages` as a list of objects whose fields `table` knows and whose roles are `roles`."""
    messages = check_messages(messages, name)
    for i, m in enumerate(messages):
        check_fields(m, table, f"{name}[{i}].")
    check_roles(messages, roles, name)
    return messages


def images_error(label: str) -> BadRequest:
    return BadRequest(
        f"{label}: the loaded model has no vision tower and cannot read images", param=label
    )


def check_roles(messages: list[dict], roles: tuple[str, ...], name: str = "messages") -> None:
    for i, m in enumerate(messages):
        if m["role"] not in roles:
            raise BadRequest(
                f"{name}[{i}].role must be one of {', '.join(roles)}, got {m['role']!r}",
                param=f"{name}[{i}].role",
            )


# -- keep_alive, as Ollama's api.Duration parses it ------------------------------------------

FOREVER = math.inf
_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5
    "μs": 1e-6,  # U+03BC
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("300ms", "-1.5h", "2h45m"), as time.ParseDuration
    reads it; ValueError otherwise."""
    s = text
    sign = 1.0
    if s[:1] in ("-", "+"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total = 0.0
    while s:
        m = _PART.match(s)
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {text!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {text!r}")
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {unit!r} in duration {text!r}")
        total += float(f"{whole or 0}.{frac or 0}") * _UNITS[unit]
        s = s[m.end() :]
    return sign * total


def keep_alive_seconds(body: dict) -> float | None:
    """`keep_alive` in seconds (math.inf = forever), None when absent; 400 on garbage.
    Numbers are seconds (truncated to whole ones); strings are Go durations; negative of
    either is forever."""
    value = body.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(
            f"keep_alive must be a duration string or a number of seconds, got "
            f"{json.dumps(value)[:60]}",
            param="keep_alive",
        )
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as e:
            raise BadRequest(f"keep_alive: {e}", param="keep_alive") from None
    else:
        if not math.isfinite(value):
            raise BadRequest("keep_alive must be finite", param="keep_alive")
        seconds = float(int(value))
        if value < 0:
            seconds = -1.0
    return FOREVER if seconds < 0 else seconds


# -- the README's table ----------------------------------------------------------------------

TABLES: dict[str, Table] = {
    "Ollama `/api/generate`": OLLAMA_GENERATE,
    "Ollama `/api/chat`": OLLAMA_CHAT,
    "Ollama `messages[]`": OLLAMA_MESSAGE,
    "Ollama `options`": OLLAMA_OPTIONS,
    "OpenAI `/v1/chat/completions`": OPENAI_CHAT,
    "OpenAI `messages[]`": OPENAI_MESSAGE,
    "OpenAI `/v1/completions`": OPENAI_COMPLETIONS,
}
_STATE_WORDS = {
    SUPPORTED: "supported",
    IGNORE: "accepted, ignored",
    REJECT: "400 naming it",
}


def markdown_table() -> str:
    """The README's request-field table, one row per field of every table above."""
    rows = ["| where | field | handling | note |", "|---|---|---|---|"]
    for where, table in TABLES.items():
        for name, (state, why) in table.items():
            note = why
            if state == REJECT:
                neutral = ", ".join(json.dumps(v) for v in NEUTRAL.get(name, ()))
                note = f"{why}; accepted: absent, null" + (f", {neutral}" if neutral else "")
            rows.append(f"| {where} | `{name}` | {_STATE_WORDS[state]} | {note} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
