"""Tool calls and the reasoning split for both chat APIs: request fields in, message fields out.

A chat request becomes a ``ChatPlan``: the prompt rendered through the model's own template
(``tools=``, assistant ``tool_calls`` and ``tool`` messages as Hugging Face renders them, or a
generic instruction when the template knows no tools), the grammar a ``required`` or named
``tool_choice`` imposes (the family's call syntax around the arguments' JSON schema, so even a
small model makes a valid call), and an ``OutputSplitter`` per reply
(``kvgrove.tokenize.calls``) that turns the decoded text into reasoning, content and calls.

Fields, as the README table lists them:

- OpenAI: ``tools``, ``tool_choice`` (none, auto, required, ``{"type": "function",
  "function": {"name": ...}}``), ``parallel_tool_calls`` (false: at most one call is returned;
  constrained choices make exactly one either way), ``reasoning_effort`` (honoured where the
  template reads it; ``none`` turns thinking off where the template supports that; otherwise
  400), messages' ``tool_calls``, ``tool_call_id``, ``reasoning_content``.
- Ollama: ``tools``, ``think`` (true, false, or an effort string where the template reads one),
  messages' ``tool_calls``, ``tool_name``, ``thinking``.
"""

from __future__ import annotations

import json
import re
import uuid
import weakref
from typing import Any

import attrs

from kvgrove.grammar import GrammarError, check_grammar, json_schema_grammar, lark_grammar
from kvgrove.http.common import BadRequest
from kvgrove.tokenize.calls import (
    CallSyntax,
    OutputSplitter,
    Split,
    call_syntax,
    starts_in_reasoning,
    think_markers,
)

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_specials: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def special_vocab(tokenizer: Any) -> dict[str, int]:
    """The tokenizer's special tokens by their text (what marker detection reads), cached."""
    cached = _specials.get(tokenizer)
    if cached is None:
        cached = {
            tokenizer.backend.id_to_piece(i): i
            for i in range(tokenizer.vocab_size)
            if tokenizer.is_special(i)
        }
        _specials[tokenizer] = cached
    return cached


def capabilities(tokenizer: Any) -> list[str]:
    """What /api/show reports: tools for every model (a template that knows none gets the
    generic instruction), thinking where the template or vocabulary knows ``<think>``."""
    think = think_markers(tokenizer.chat_template, special_vocab(tokenizer))
    return ["completion", "tools", *(["thinking"] if think else [])]


# -- request fields ----------------------------------------------------------------------------


@attrs.frozen
class Tool:
    name: str
    schema: dict  # the arguments' JSON schema
    spec: dict  # as the template sees it: {"type": "function", "function": {...}}


def parse_tools(value: Any, tokenizer: Any) -> list[Tool]:
    """``tools``: a list of ``{"type": "function", "function": {"name", "description",
    "parameters"}}``. Each schema is compiled by the grammar engine: a schema it rejects is a
    400 naming the tool and why."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("tools must be a list", param="tools")
    out: list[Tool] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise BadRequest(f"{where} must be an object", param=where)
        kind = tool.get("type", "function")
        if kind != "function":
            raise BadRequest(f"{where}.type must be 'function', got {kind!r}", param=where)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadRequest(f"{where}.function must be an object", param=f"{where}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise BadRequest(
                f"{where}.function.name must be 1-64 letters, digits, '_', '-' or '.', got "
                f"{json.dumps(name)[:60]}",
                param=f"{where}.function.name",
            )
        if any(t.name == name for t in out):
            raise BadRequest(
                f"{where}.function.name {name!r} is given twice", param=f"{where}.function.name"
            )
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest(
                f"{where}.function.description must be a string",
                param=f"{where}.function.description",
            )
        schema = fn.get("parameters")
        if schema is None:
            schema = {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise BadRequest(
                f"{where}.function.parameters must be a JSON schema object",
                param=f"{where}.function.parameters",
            )
        if schema.get("type", "object") != "object":
            raise BadRequest(
                f"{where}.function.parameters must describe an object (type 'object'), got "
                f"type {json.dumps(schema.get('type'))[:40]}",
                param=f"{where}.function.parameters",
            )
        try:
            check_grammar(json_schema_grammar(schema), tokenizer)
        except GrammarError as e:
            raise BadRequest(
                f"{where}.function.parameters: the grammar engine rejected the schema: {e}",
                param=f"{where}.function.parameters",
            ) from None
        clean = {k: v for k, v in fn.items() if v is not None}
        clean["parameters"] = schema
        out.append(Tool(name, schema, {"type": "function", "function": clean}))
    return out


def parse_tool_choice(value: Any, tools: list[Tool]) -> tuple[str, str | None]:
    """``tool_choice`` -> ("none" | "auto" | "required" | "named", the named function)."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("none", "auto", "required"):
        if value == "required" and not tools:
            raise BadRequest("tool_choice 'required' needs tools", param="tool_choice")
        return value, None
    if isinstance(value, dict) and value.get("type") == "function":
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise BadRequest(
                "tool_choice.function.name must be a string", param="tool_choice.function.name"
            )
        if not any(t.name == name for t in tools):
            known = ", ".join(t.name for t in tools) or "none"
            raise BadRequest(
                f"tool_choice names function {name!r}, which is not in tools (given: {known})",
                param="tool_choice.function.name",
            )
        return "named", name
    raise BadRequest(
        "tool_choice must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


# -- the conversation, as the template sees it -------------------------------------------------


def _call_id(family: str) -> str:
    """A fresh call id: Mistral's templates require 9 alphanumerics; others get call_<hex>."""
    if family == "mistral":
        return uuid.uuid4().hex[:9]
    return f"call_{uuid.uuid4().hex[:24]}"


def _history_id(family: str, i: int, j: int) -> str:
    """A stable id for an Ollama history call (Ollama's messages carry none), the same every
    turn so the rendered prefix — and the prefix cache's match — does not change."""
    return f"c{i:04d}{j:04d}" if family == "mistral" else f"call_{i}_{j}"


def _arguments(value: Any, where: str, *, api: str) -> dict:
    if api == "openai":
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a JSON string", param=where)
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise BadRequest(f"{where} is not valid JSON: {e}", param=where) from None
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be a JSON object", param=where)
    return value


def template_messages(messages: list[dict], *, api: str, syntax: CallSyntax) -> list[dict]:
    """The messages as Hugging Face templates read them: assistant ``tool_calls`` as
    ``[{"id", "type": "function", "function": {"name", "arguments": {...}}}]`` (only when there
    are some: Llama's template tests for the key), ``tool`` messages with ``tool_call_id`` and
    ``name``, earlier reasoning as ``reasoning_content``. A tool message must answer a call
    made before it (OpenAI: by ``tool_call_id``; Ollama: in order, or by ``tool_name``)."""
    out: list[dict] = []
    pending: list[tuple[str, str]] = []  # (id, name) of calls not yet answered
    ids: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m["role"]
        msg: dict[str, Any] = {"role": role, "content": m.get("content") or ""}
        if role == "assistant":
            reasoning = m.get("reasoning_content" if api == "openai" else "thinking")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise BadRequest(f"{where}: reasoning must be a string", param=where)
                if reasoning:
                    msg["reasoning_content"] = reasoning
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise BadRequest(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            rendered = []
            for j, call in enumerate(calls):
                cw = f"{where}.tool_calls[{j}]"
                fn = call.get("function") if isinstance(call, dict) else None
                if fn is not None and call.get("type", "function") != "function":
                    raise BadRequest(f"{cw}.type must be 'function'", param=f"{cw}.type")
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise BadRequest(
                        f"{cw} must be {{'function': {{'name', 'arguments'}}}}", param=cw
                    )
                args = _arguments(
                    fn.get("arguments", {} if api == "ollama" else "{}"),
                    f"{cw}.function.arguments",
                    api=api,
                )
                cid = call.get("id")
                if api == "openai" and (not isinstance(cid, str) or not cid):
                    raise BadRequest(f"{cw}.id is required", param=f"{cw}.id")
                if not isinstance(cid, str) or not cid:
                    cid = _history_id(syntax.family, i, j)
                if cid in ids:
                    raise BadRequest(f"{cw}.id {cid!r} is used twice", param=f"{cw}.id")
                ids[cid] = fn["name"]
                pending.append((cid, fn["name"]))
                rendered.append(
                    {
                        "id": cid,
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": args},
                    }
                )
            if rendered:
                msg["tool_calls"] = rendered
        elif role == "tool":
            if api == "openai":
                cid = m.get("tool_call_id")
                if not isinstance(cid, str) or not cid:
                    raise BadRequest(
                        f"{where}.tool_call_id is required for a tool message",
                        param=f"{where}.tool_call_id",
                    )
                if cid not in ids:
                    raise BadRequest(
                        f"{where}.tool_call_id {cid!r} answers no tool call made before it",
                        param=f"{where}.tool_call_id",
                    )
                name = ids[cid]
                pending = [p for p in pending if p[0] != cid]
            else:
                name = m.get("tool_name")
                if name is not None and not isinstance(name, str):
                    raise BadRequest(f"{where}.tool_name must be a string", param=where)
                match = next((p for p in pending if not name or p[1] == name), None)
                if match is not None:
                    pending.remove(match)
                    cid, name = match[0], name or match[1]
                else:  # a result without a recorded call (Ollama allows it)
                    cid = _history_id(syntax.family, i, 0)
                    name = name or ""
            msg["tool_call_id"] = cid
            if name:
                msg["name"] = name
        out.append(msg)
    return out


_GENERIC_INSTRUCTION = (
    "You can call these tools (JSON schemas of each function):\n<tools>\n{tools}\n</tools>\n\n"
    "To call a tool, answer with only this, once per call:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <arguments object>}}\n</tool_call>'
)


def generic_messages(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """For templates that know no tools: the tools described in the system message, calls and
    results written out as text (json_tools' ``<tool_call>`` syntax) in plain turns."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(
                "<tool_call>\n"
                + json.dumps(
                    {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                )
                + "\n</tool_call>"
                for c in m["tool_calls"]
            )
            text = (m["content"] + "\n" if m["content"] else "") + calls
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
            )
        else:
            out.append({k: v for k, v in m.items() if k != "reasoning_content"})
    if tools:
        listed = "\n".join(json.dumps(t.spec, ensure_ascii=False) for t in tools)
        instruction = _GENERIC_INSTRUCTION.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + instruction}
        else:
            out.insert(0, {"role": "system", "content": instruction})
    return out


# -- the grammar of a forced call --------------------------------------------------------------


def _literal(text: str, tokenizer: Any) -> str:
    """A Lark item for ``text``: the special token when it is one, else the string."""
    if text:
        ids = tokenizer.encode(text, parse_special=True)
        if len(ids) == 1 and tokenizer.is_special(ids[0]):
            return f"<[{ids[0]}]>"
    return json.dumps(text)


def forced_call_grammar(
    syntax: CallSyntax, tools: list[Tool], tokenizer: Any, *, close_reasoning: str | None
) -> str:
    """Lark for exactly one call of one of ``tools`` in the family's syntax, its arguments
    matching the tool's schema. 400 for families whose arguments are not written as JSON."""
    # family -> (text before the name, the arguments' key, text after the arguments)
    shapes = {
        "json_tools": ('\n{"name": ', "arguments", "}\n"),
        "mistral": ('[{"name": ', "arguments", "}]"),
        "llama3_json": ('{"name": ', "parameters", "}"),
    }
    if syntax.family not in shapes:
        raise BadRequest(
            f"tool_choice 'required' or a named function is not supported for this model's "
            f"tool-call syntax ({syntax.family}); use 'auto'",
            param="tool_choice",
        )
    before, key, after = shapes[syntax.family]
    rules, alts = [], []
    for k, tool in enumerate(tools):
        head = f"{before}{json.dumps(tool.name)}, {json.dumps(key)}: "
        alts.append(f"call_{k}")
        rules.append(f"call_{k}: {json.dumps(head)} args_{k} {json.dumps(after)}")
        # Compact JSON (as kvgrove.grammar writes it): a small model cannot wander off into
        # endless whitespace.
        compact = {"type": "object", **tool.schema, "x-guidance": {"whitespace_flexible": False}}
        rules.append(f"args_{k}: %json {json.dumps(compact)}")
    items = []
    if close_reasoning:
        items.append(json.dumps(close_reasoning + "\n\n"))
    if syntax.start:
        items.append(_literal(syntax.start, tokenizer))
    items.append("(" + " | ".join(alts) + ")")
    if syntax.end:
        items.append(_literal(syntax.end, tokenizer))
    return lark_grammar("start: " + " ".join(items) + "\n" + "\n".join(rules) + "\n")


# -- the plan ----------------------------------------------------------------------------------


@attrs.define
class ChatPlan:
    prompt: str
    syntax: CallSyntax | None  # None: calls are not parsed
    tools: list[Tool]
    think: tuple[str, str] | None
    reasoning: bool  # the reply begins inside a reasoning block
    grammar: str | None  # a forced call
    parallel: bool = True

    def splitter(self) -> OutputSplitter:
        return OutputSplitter(
            syntax=self.syntax,
            tools=[t.spec for t in self.tools] or None,
            think=self.think,
            reasoning=self.reasoning,
        )

    def split_all(self, text: str) -> Split:
        sp = self.splitter()
        first, rest = sp.feed(text), sp.finish()
        return Split(
            first.reasoning + rest.reasoning, first.content + rest.content, first.calls + rest.calls
        )

    def apply(self, params: Any, body: dict) -> Any:
        """``params`` with the forced call's grammar (400 when another constraint is asked)."""
        if self.grammar is None:
            return params
        if params.grammar is not None:
            other = next(
                (f for f in ("response_format", "format", "grammar") if body.get(f) is not None),
                "grammar",
            )
            raise BadRequest(
                f"tool_choice {json.dumps(body.get('tool_choice', 'required'))} constrains the "
                f"reply to a tool call and cannot be combined with {other}",
                param="tool_choice",
            )
        return attrs.evolve(params, grammar=self.grammar)


def _think_kwargs(
    template: str, think: tuple[str, str] | None, body: dict, *, api: str, forced: bool
) -> dict[str, Any]:
    """Template keywords for the request's thinking fields (``think`` / ``reasoning_effort``)."""
    supports_switch = "enable_thinking" in template
    reads_effort = "reasoning_effort" in template
    if api == "ollama":
        value, field = body.get("think"), "think"
    else:
        value, field = body.get("reasoning_effort"), "reasoning_effort"
    if value is None:
        return {"enable_thinking": False} if (forced and supports_switch) else {}
    if api == "ollama" and isinstance(value, bool):
        if value and think is None:
            raise BadRequest("think: the loaded model does not support thinking", param="think")
        return {"enable_thinking": value} if supports_switch else {}
    if not isinstance(value, str) or value not in ("none", "minimal", "low", "medium", "high"):
        what = "true, false, " if api == "ollama" else ""
        raise BadRequest(
            f"{field} must be {what}'low', 'medium' or 'high' (or 'minimal', 'none'), got "
            f"{json.dumps(value)[:40]}",
            param=field,
        )
    if reads_effort:
        return {"reasoning_effort": value}
    if value == "none":
        if supports_switch:
            return {"enable_thinking": False}
        if think is None:
            return {}
    raise BadRequest(
        f"{field} {value!r} cannot be honoured: the model's chat template has no reasoning-effort "
        "setting" + (" (only 'none', which turns thinking off)" if supports_switch else ""),
        param=field,
    )


def chat_plan(rt: Any, body: dict, messages: list[dict], *, api: str) -> ChatPlan:
    """Validate the request's tool and thinking fields and render its prompt."""
    from kvgrove.tokenize.chat import ChatTemplateError

    tok = rt.loaded.tokenizer
    template = tok.chat_template or ""
    vocab = special_vocab(tok)
    syntax = call_syntax(template, vocab)
    think = think_markers(template, vocab)
    tools = parse_tools(body.get("tools"), tok)
    if api == "openai":
        choice, named = parse_tool_choice(body.get("tool_choice"), tools)
        parallel = body.get("parallel_tool_calls")
        if parallel is not None and not isinstance(parallel, bool):
            raise BadRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    else:
        choice, named, parallel = ("auto" if tools else "none"), None, None
    forced = choice in ("required", "named")
    kwargs = _think_kwargs(template, think, body, api=api, forced=forced)
    shown = tools if choice != "none" else []
    convo = template_messages(messages, api=api, syntax=syntax)
    try:
        if syntax.generic:
            prompt = tok.apply_chat_template(generic_messages(convo, shown), **kwargs)
        else:
            specs = [t.spec for t in shown] or None
            prompt = tok.apply_chat_template(convo, tools=specs, **kwargs)
    except ChatTemplateError as e:
        raise BadRequest(str(e), param="messages") from None
    reasoning = starts_in_reasoning(prompt, think)
    grammar = None
    if forced:
        chosen = [t for t in tools if choice == "required" or t.name == named]
        grammar = forced_call_grammar(
            syntax, chosen, tok, close_reasoning=think[1] if reasoning else None
        )
        try:
            check_grammar(grammar, tok)
        except GrammarError as e:
            raise BadRequest(
                f"tools: the grammar engine rejected the call grammar: {e}", param="tools"
            ) from None
    return ChatPlan(
        prompt=prompt,
        syntax=syntax if choice != "none" else None,
        tools=tools,
        think=think,
        reasoning=reasoning,
        grammar=grammar,
        parallel=parallel is not False,
    )


def plain_plan(rt: Any, prompt: str) -> ChatPlan:
    """A raw prompt (Ollama generate with raw): no tools, only the reasoning split."""
    tok = rt.loaded.tokenizer
    think = think_markers(tok.chat_template, special_vocab(tok))
    return ChatPlan(prompt, None, [], think, starts_in_reasoning(prompt, think), None)


# -- replies -----------------------------------------------------------------------------------


@attrs.define
class CallIds:
    """Ids and stream indexes of one reply's calls."""

    family: str
    count: int = 0

    def next(self, call: dict) -> tuple[int, str]:
        index = self.count
        self.count += 1
        return index, call.get("id") or _call_id(self.family)


def openai_calls(calls: list[dict], ids: CallIds) -> list[dict]:
    return [
        {"id": ids.next(call)[1], "type": "function", "function": _openai_function(call)}
        for call in calls
    ]


def _openai_function(call: dict) -> dict:
    return {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}


def openai_call_deltas(calls: list[dict], ids: CallIds) -> list[dict]:
    """Complete calls as streamed ``delta.tool_calls``: per call, one delta with its index, id
    and name, then one with its arguments."""
    out = []
    for call in calls:
        index, cid = ids.next(call)
        head = {"name": call["name"], "arguments": ""}
        out.append(
            {"tool_calls": [{"index": index, "id": cid, "type": "function", "function": head}]}
        )
        out.append(_fragment(index, json.dumps(call["arguments"], ensure_ascii=False)))
    return out


def ollama_calls(calls: list[dict], ids: CallIds) -> list[dict]:
    out = []
    for call in calls:
        index, cid = ids.next(call)
        function = {"index": index, "name": call["name"], "arguments": call["arguments"]}
        out.append({"id": cid, "function": function})
    return out


class ReplyCalls:
    """Keeps ``parallel_tool_calls: false`` to one call per reply."""

    def __init__(self, plan: ChatPlan) -> None:
        self.ids = CallIds(plan.syntax.family if plan.syntax else "")
        self._limit = None if plan.parallel else 1
        self.made = 0

    def room(self) -> bool:
        return self._limit is None or self.made < self._limit

    def take(self, calls: list[dict]) -> list[dict]:
        if self._limit is not None:
            calls = calls[: max(0, self._limit - self.made)]
        self.made += len(calls)
        return calls


def ollama_fields(split: Split, reply: ReplyCalls, *, chat: bool) -> dict[str, Any]:
    """A reply (or a streamed piece of one) in Ollama's shape: ``message`` for chat,
    ``response`` for generate, with ``thinking`` and ``tool_calls`` when there are some."""
    calls = ollama_calls(reply.take(split.calls), reply.ids)
    content = split.content
    if calls and not content.strip():
        content = ""
    if not chat:
        out: dict[str, Any] = {"response": content}
        if split.reasoning:
            out["thinking"] = split.reasoning
        return out
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if split.reasoning:
        msg["thinking"] = split.reasoning
    if calls:
        msg["tool_calls"] = calls
    return {"message": msg}


def openai_message(split: Split, reply: ReplyCalls) -> dict[str, Any]:
    """A whole reply as OpenAI's ``message``: content (null when it is only calls),
    ``reasoning_content``, ``tool_calls``."""
    calls = openai_calls(reply.take(split.calls), reply.ids)
    content: str | None = split.content
    if calls and not content.strip():
        content = None
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if split.reasoning:
        msg["reasoning_content"] = split.reasoning
    if calls:
        msg["tool_calls"] = calls
    return msg


class OpenAIStream:
    """A streamed reply as OpenAI deltas: reasoning, content, then each call as one delta with
    its index, id and name and then its arguments in fragments. In families that write the
    name first (json_tools, llama3_json) a call is shown while the model writes it, its
    arguments' text sent as it grows; in the others, when it is complete."""

    def __init__(self, splitter: OutputSplitter, reply: ReplyCalls) -> None:
        self.splitter = splitter
        self.reply = reply
        self._live: tuple[int, str] | None = None  # (index, arguments' text sent)

    def deltas(self, split: Split) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if split.reasoning:
            out.append({"role": "assistant", "reasoning_content": split.reasoning})
        if split.content:
            out.append({"role": "assistant", "content": split.content})
        calls = self.reply.take(split.calls)
        if calls and self._live is not None:
            (index, sent), self._live = self._live, None
            first, calls = calls[0], calls[1:]
            raw = first.get("raw_arguments")
            if raw is None:
                raw = json.dumps(first["arguments"], ensure_ascii=False)
            if raw.startswith(sent) and raw != sent:
                out.append(_fragment(index, raw[len(sent) :]))
        out.extend(openai_call_deltas(calls, self.reply.ids))
        out.extend(self._stream_live())
        return out

    def _stream_live(self) -> list[dict[str, Any]]:
        live = self.splitter.live_call()
        if live is None:
            return []
        name, arguments = live
        out = []
        if self._live is None:
            if not self.reply.room():
                return []
            index, cid = self.reply.ids.next({})
            self.splitter.announce()
            self._live = (index, "")
            out.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": cid,
                            "type": "function",
                            "function": {"name": name, "arguments": ""},
                        }
                    ]
                }
            )
        index, sent = self._live
        if len(arguments) > len(sent):
            out.append(_fragment(index, arguments[len(sent) :]))
            self._live = (index, arguments)
        return out


def _fragment(index: int, text: str) -> dict[str, Any]:
    return {"tool_calls": [{"index": index, "function": {"arguments": text}}]}
