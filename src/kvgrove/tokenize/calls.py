"""A model's tool-call syntax and reasoning markers, and its output split into reasoning, content
and tool calls as it streams.

- ``call_syntax(template, vocab)`` picks the family's call syntax the way mlx-lm's server does
  (``mlx_lm.tokenizer_utils._infer_tool_parser`` reads the chat template, then the vocabulary)
  and reuses that family's parser from ``mlx_lm.tool_parsers`` unchanged. Llama 3.1, whose
  template asks for a bare ``{"name": ..., "parameters": ...}`` object, has no mlx-lm parser:
  ``LLAMA3_JSON`` reads it. A template naming no syntax gets ``GENERIC``: the server describes
  the tools in a system message and asks for ``<tool_call>{json}</tool_call>`` (json_tools).
- ``think_markers(template, vocab)``: ``("<think>", "</think>")`` for templates that know them.
- ``OutputSplitter`` takes the decoded text piece by piece and returns what is safe to show:
  reasoning, content and complete calls. Text that may be the start of a marker is held back
  until it is known not to be one, so call markup never reaches the content, streamed or not.
  A call whose text the family's parser refuses (cut short by the token limit, or malformed)
  comes out as content: the model's words are never dropped.

No trio here: a sync core the HTTP layer drives.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class CallSyntax:
    family: str  # mlx-lm's tool_parsers module, or "llama3_json"
    start: str  # the text opening a call; "" = a call is the whole reply (llama3_json)
    end: str  # the text closing it; "" = the call runs to the end of the reply (mistral)
    parse: Callable[[str, Any], Any] = attrs.field(eq=False, repr=False)
    generic: bool = False  # the template knows no tools: the server instructs the model


def mlx_syntax(name: str, *, generic: bool = False) -> CallSyntax:
    module = importlib.import_module(f"mlx_lm.tool_parsers.{name}")
    return CallSyntax(
        name, module.tool_call_start, module.tool_call_end, module.parse_tool_call, generic
    )


_PYTHON_TAG = "<|python_tag|>"


def _parse_llama3_json(text: str, tools: Any = None) -> list[dict[str, Any]]:
    """``{"name": ..., "parameters": {...}}`` (Llama 3.1's JSON calls), optionally after
    ``<|python_tag|>``, one or more separated by whitespace or ``;``."""
    text = text.strip().removeprefix(_PYTHON_TAG).strip()
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        arguments = (
            value.get("parameters", value.get("arguments")) if isinstance(value, dict) else 0
        )
        if not isinstance(value.get("name"), str) or not isinstance(arguments, dict):
            raise ValueError(f"not a tool call: {text[:80]!r}")
        calls.append({"name": value["name"], "arguments": arguments})
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    if not calls:
        raise ValueError("no tool call")
    return calls


LLAMA3_JSON = CallSyntax("llama3_json", "", "", _parse_llama3_json)
GENERIC = mlx_syntax("json_tools", generic=True)


class _TemplateView:
    """What mlx-lm's ``_infer_tool_parser`` reads from a tokenizer."""

    def __init__(self, template: str | None, vocab: dict[str, int]) -> None:
        self.chat_template = template
        self._vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self._vocab


def call_syntax(template: str | None, vocab: dict[str, int]) -> CallSyntax:
    """The family's call syntax, chosen from the template (then the vocabulary) as mlx-lm's
    server chooses its parser; ``GENERIC`` when the template names none."""
    from mlx_lm.tokenizer_utils import _infer_tool_parser

    name = _infer_tool_parser(_TemplateView(template, vocab))
    if name is not None:
        return mlx_syntax(name)
    if template and '"parameters": ' in template and "tools" in template:
        return LLAMA3_JSON
    return GENERIC


THINK = ("<think>", "</think>")


def think_markers(template: str | None, vocab: dict[str, int]) -> tuple[str, str] | None:
    if (template and THINK[1] in template) or THINK[1] in vocab:
        return THINK
    return None


def starts_in_reasoning(prompt: str, think: tuple[str, str] | None) -> bool:
    """True when the rendered prompt leaves a reasoning block open (the template wrote
    ``<think>`` for the model), so the reply begins inside it."""
    return think is not None and prompt.rfind(think[0]) > prompt.rfind(think[1])


@attrs.define
class Split:
    """What a piece of output holds once its markers are read."""

    reasoning: str = ""
    content: str = ""
    calls: list[dict[str, Any]] = attrs.Factory(list)  # {"name": str, "arguments": ..., "id"?}
    # The text of a streamed call (see ``OutputSplitter.live_call``) its parser then refused.
    unparsed: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


_REASONING, _CONTENT, _CALL = "reasoning", "content", "call"


class OutputSplitter:
    """One reply's splitter. ``feed(text)`` each decoded piece, then ``finish()`` once.

    ``syntax`` None: calls are not parsed (no tools, or ``tool_choice`` none). ``think`` None:
    no reasoning markers. ``reasoning``: the reply begins inside a reasoning block.
    """

    def __init__(
        self,
        *,
        syntax: CallSyntax | None,
        tools: list | None,
        think: tuple[str, str] | None,
        reasoning: bool = False,
    ) -> None:
        self._syntax = syntax
        self._tools = tools
        self._think = think
        self._mode = _REASONING if (reasoning and think) else _CONTENT
        self._buf = ""
        self._seen_content = False  # non-space content shown (a llama3 call must come first)
        self._strip_newlines = False  # right after a reasoning block
        self.called = False  # a call came out
        self._announced = False  # the open call was shown while it streamed

    def feed(self, text: str) -> Split:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> Split:
        return self._drain(final=True)

    def _markers(self) -> list[str]:
        out = []
        if self._think:
            out.append(self._think[0])
        if self._syntax is not None and self._syntax.start:
            out.append(self._syntax.start)
        return out

    def _drain(self, *, final: bool) -> Split:
        out = Split()
        while True:
            if self._mode == _REASONING:
                end = self._think[1]
                i = self._buf.find(end)
                if i >= 0:
                    out.reasoning += self._buf[:i]
                    self._buf = self._buf[i + len(end) :]
                    self._mode, self._strip_newlines = _CONTENT, True
                    continue
                keep = 0 if final else _held(self._buf, end)
                out.reasoning += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            if self._mode == _CONTENT:
                if self._strip_newlines:
                    self._buf = self._buf.lstrip("\n")
                    if not self._buf and not final:
                        return out
                    self._strip_newlines = False
                if self._bare_call_starts(final):
                    self._mode = _CALL
                    self._buf = self._buf.lstrip()
                    continue
                if self._bare_call_undecided(final):
                    return out
                found = [(self._buf.find(m), m) for m in self._markers()]
                found = [(i, m) for i, m in found if i >= 0]
                if found:
                    i, marker = min(found)
                    self._show(out, self._buf[:i])
                    self._buf = self._buf[i + len(marker) :]
                    self._mode = _REASONING if self._think and marker == self._think[0] else _CALL
                    continue
                keep = (
                    0 if final else max((_held(self._buf, m) for m in self._markers()), default=0)
                )
                self._show(out, self._buf[: len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep :]
                return out
            # a call
            end = self._syntax.end
            i = self._buf.find(end) if end else -1
            if i >= 0:
                body, self._buf = self._buf[:i], self._buf[i + len(end) :]
                self._call(out, body, closed=True)
                self._mode = _CONTENT
                continue
            if not final:
                return out
            body, self._buf = self._buf, ""
            self._call(out, body, closed=False)
            return out

    def _bare_call_starts(self, final: bool) -> bool:
        """A llama3_json reply that opens with a JSON object (or ``<|python_tag|>``) is a call."""
        if self._syntax is None or self._syntax.start or self._seen_content:
            return False
        head = self._buf.lstrip()
        return head.startswith("{") or head.startswith(_PYTHON_TAG)

    def _bare_call_undecided(self, final: bool) -> bool:
        if final or self._syntax is None or self._syntax.start or self._seen_content:
            return False
        head = self._buf.lstrip()
        return head == "" or _PYTHON_TAG.startswith(head)

    def _show(self, out: Split, text: str) -> None:
        if text:
            out.content += text
            self._seen_content = self._seen_content or bool(text.strip())

    def live_call(self) -> tuple[str, str] | None:
        """While a call streams, in families that write ``{"name": ..., "arguments": {...}``
        (json_tools, llama3_json): its name and the text of its arguments so far."""
        if self._mode != _CALL or self._syntax.family not in _JSON_HEADED:
            return None
        m = _HEADER.match(self._buf)
        if m is None:
            return None
        try:
            name = json.loads(m.group(1))
        except ValueError:
            return None
        return name, json_object_prefix(self._buf[m.end() :])[0]

    def announce(self) -> None:
        """The open call was shown while it streamed: if its parser refuses it, its text goes
        to ``Split.unparsed`` instead of the content."""
        self._announced = True

    def _call(self, out: Split, body: str, *, closed: bool) -> None:
        syntax = self._syntax
        announced, self._announced = self._announced, False
        try:
            parsed = syntax.parse(body, self._tools)
            calls = parsed if isinstance(parsed, list) else [parsed]
            calls = [_checked(c) for c in calls]
        except Exception:
            # Not a call the family's parser can read: the model's words stay, as content.
            text = syntax.start + body + (syntax.end if closed else "")
            if announced:
                out.unparsed += text
            else:
                self._show(out, text)
            return
        if len(calls) == 1 and syntax.family in _JSON_HEADED:
            m = _HEADER.match(body)
            raw, whole = json_object_prefix(body[m.end() :]) if m else ("", False)
            if whole and json.loads(raw) == calls[0]["arguments"]:
                calls[0]["raw_arguments"] = raw  # what streamed, for the last fragment
        out.calls.extend(calls)
        self.called = True


_JSON_HEADED = ("json_tools", "llama3_json")
_HEADER = re.compile(
    r'\s*(?:<\|python_tag\|>\s*)?\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*'
    r'"(?:arguments|parameters)"\s*:\s*'
)


def json_object_prefix(text: str) -> tuple[str, bool]:
    """The start of ``text`` that belongs to the JSON object it opens with, and whether that
    object closed there. ("", False) when ``text`` does not open with an object."""
    if not text.startswith("{"):
        return "", False
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[: i + 1], True
    return text, False


def _checked(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise ValueError(f"not a tool call: {call!r}")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments are not an object: {arguments!r}")
    out = {"name": call["name"], "arguments": arguments}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out
