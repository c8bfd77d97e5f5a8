"""Tool calling: a request's ``tools`` into the prompt, the model's tool calls out of its
text, and the grammar that makes a call happen.

Models are trained on one of a few tool-call syntaxes (``ToolSyntax``):

- JSON in tags, one call per pair (Hermes, Qwen 2.5/3 templates)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

- one pair of tags around a JSON list of calls (SmolLM2)::

      <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>

- the whole answer one JSON object, ``parameters`` for the arguments (Llama 3.1+)::

      {"name": "get_weather", "parameters": {"city": "Paris"}}

A template that renders ``tools`` itself gets them as its ``tools`` variable, and the
conversation as OpenAI sends it (assistant ``tool_calls`` with their arguments as objects,
``role: "tool"`` results); its syntax is read from the template (``<tool_call>`` tags, or
Llama 3's ``<|python_tag|>`` / ``ipython`` role). A template that ignores ``tools``
(SmolLM2-135M's GGUF, or ChatML when a model ships none) gets them as a system message in
SmolLM2's trained form, and the history rewritten into it (calls as ``<tool_call>`` text,
results as user turns in ``<tool_response>`` tags).

The answer is parsed in any of the three forms (``ToolCallParser``, which also serves the
stream): text outside the calls is the message's ``content``. ``tool_choice: "required"``
or a named function make the grammar (``call_grammar``) force the syntax with arguments
valid under the function's JSON schema; with ``response_format`` too, ``auto`` is
constrained to calls or the format's JSON. A constrained call cut by the token limit is
returned as far as it got (``cut_calls``), never as markup in the content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from kvformer.formats.tokenizer.template import CHATML_TEMPLATE, template_variables
from kvformer.serve.grammar import JSON_LAYOUT, closed_schema
from kvformer.serve.schemas import APIError, ChatRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names


@dataclass(frozen=True)
class ToolSyntax:
    name: str
    tagged: bool  # calls inside <tool_call> ... </tool_call>
    as_list: bool  # one pair of tags around a JSON list of calls
    arguments: str  # the key of the arguments: "arguments" or "parameters"


HERMES = ToolSyntax("hermes", True, False, "arguments")
SMOLLM2 = ToolSyntax("smollm2", True, True, "arguments")
LLAMA3 = ToolSyntax("llama3", False, False, "parameters")


def template_syntax(template: str | None) -> ToolSyntax | None:
    """The tool-call syntax of a chat template that renders ``tools``; None if it does not."""
    template = template or CHATML_TEMPLATE
    if "tools" not in template_variables(template):
        return None
    if OPEN in template:
        return HERMES
    if PYTHON_TAG in template or "ipython" in template:
        return LLAMA3
    return HERMES


@dataclass
class ToolPlan:
    """What a request asks of tools: the functions, and whether (and which) one must be
    called: ``choice`` is "auto", "required" or a function's name."""

    functions: list[dict]
    choice: str
    parallel: bool
    syntax: ToolSyntax
    in_template: bool

    @property
    def names(self) -> set[str]:
        return {f["name"] for f in self.functions}

    @property
    def allowed(self) -> set[str]:
        """The functions an answer may call."""
        return self.names if self.choice in ("auto", "required") else {self.choice}

    def parser(self, constrained: bool) -> ToolCallParser:
        """A parser of this plan's answers; ``constrained``: they follow ``call_grammar``."""
        return ToolCallParser(self.names, self.parallel,
                              self.allowed if constrained else None, self.choice != "auto")


def tool_plan(req: ChatRequest, template: str | None) -> ToolPlan | None:
    """The request's ``tools`` / ``tool_choice`` checked; None when no tool may be called
    (no tools, or ``tool_choice: "none"``)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools: give the functions in tools",
                           param="tool_choice", code="invalid_value")
        return None
    functions = []
    for i, tool in enumerate(req.tools):
        if tool.type != "function":
            raise APIError(400, f"tools[{i}] has type {tool.type!r}; only 'function' tools "
                                "are supported", param=f"tools[{i}].type",
                           code="unsupported_value")
        f = tool.function
        if not NAME.fullmatch(f.name):
            raise APIError(400, f"tools[{i}].function.name {f.name!r} must be 1-64 letters, "
                                "digits, '_' or '-'", param=f"tools[{i}].function.name",
                           code="invalid_value")
        spec = {"name": f.name}
        if f.description:
            spec["description"] = f.description
        spec["parameters"] = f.parameters if f.parameters is not None else {
            "type": "object", "properties": {}}
        functions.append(spec)
    if len({f["name"] for f in functions}) != len(functions):
        raise APIError(400, "two tools have the same name", param="tools",
                       code="invalid_value")
    if choice is None or choice in ("auto", "required", "none"):
        choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {f["name"] for f in functions}:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                           param="tool_choice", code="invalid_value")
        choice = name
    else:
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{'type': 'function', 'function': {'name': ...}}",
                       param="tool_choice", code="invalid_value")
    if choice == "none":
        return None
    syntax = template_syntax(template)
    return ToolPlan(functions, choice, req.parallel_tool_calls is not False,
                    syntax or SMOLLM2, syntax is not None)


# ---------------------------------------------------------------------------- the prompt
def prompt_inputs(messages: list[dict], plan: ToolPlan | None,
                  template: str | None) -> tuple[list[dict], dict]:
    """The messages (and the template's extra variables) that carry the tools and the
    conversation's earlier calls and results into this template."""
    if template_syntax(template) is not None:
        return [_for_template(m) for m in messages], (
            {"tools": [{"type": "function", "function": f} for f in plan.functions]}
            if plan is not None else {})
    out = [_written_out(m) for m in messages]
    if plan is not None:
        text = _tools_system_text(plan.functions)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, {}


def _arguments(text: Any) -> Any:
    """A call's arguments as the templates take them: the object, not its JSON text (the
    text itself when it is not JSON, or nests too deep to parse)."""
    if isinstance(text, str):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return text
    return text


def _for_template(m: dict) -> dict:
    if not m.get("tool_calls"):
        return m
    calls = [{"id": c.get("id"), "type": "function",
              "function": {"name": c["function"]["name"],
                           "arguments": _arguments(c["function"]["arguments"])}}
             for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}


def _written_out(m: dict) -> dict:
    """A message for a template that knows nothing of tools, in SmolLM2's trained form."""
    if m["role"] == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
    if m.get("tool_calls"):
        calls = [{"name": c["function"]["name"],
                  "arguments": _arguments(c["function"]["arguments"])} for c in m["tool_calls"]]
        text = f"{OPEN}{json.dumps(calls, ensure_ascii=False)}{CLOSE}"
        content = m.get("content") or ""
        return {"role": "assistant", "content": f"{content}\n{text}" if content else text}
    return {k: v for k, v in m.items() if k not in ("tool_call_id", "name")}


def _tools_system_text(functions: list[dict]) -> str:
    listed = json.dumps(functions, ensure_ascii=False)
    return ("You can call functions. Each one's name, purpose and JSON Schema of arguments "
            f"is in this list:\n<tools>{listed}</tools>\n"
            "To call one or more of them, answer with nothing but\n"
            f'{OPEN}[{{"name": "function name", "arguments": {{"argument": "value"}}}}]'
            f"{CLOSE}\nwith the real names and values. To answer without calling a "
            "function, write your answer as usual.")


# ---------------------------------------------------------------------------- the grammar
def call_grammar(plan: ToolPlan, answer: dict | None = None) -> str | None:
    """A Lark grammar (llguidance's dialect) of the answers the plan allows, in its syntax:
    for ``tool_choice`` "required" or a named function, calls only; for "auto" with
    ``answer`` (``response_format``'s JSON schema), calls or JSON valid under ``answer``;
    None for "auto" alone (the model writes what it likes)."""
    if plan.choice == "auto" and answer is None:
        return None
    call = json.dumps(_call_schema([f for f in plan.functions if f["name"] in plan.allowed],
                                   plan.syntax.arguments))
    syntax = plan.syntax
    if not syntax.tagged:
        calls = "calls: call\n"
    elif syntax.as_list:
        more = ' (", " call)*' if plan.parallel else ""
        calls = f'calls: "{OPEN}[" call{more} "]{CLOSE}"\n'
    else:
        more = ' ("\\n" block)*' if plan.parallel else ""
        calls = f'calls: block{more}\nblock: "{OPEN}\\n" call "\\n{CLOSE}"\n'
    if plan.choice != "auto":
        return f"start: calls\n{calls}call: %json {call}\n"
    answer = {"x-guidance": JSON_LAYOUT, **closed_schema(answer)}
    return (f"start: calls | answer\n{calls}call: %json {call}\n"
            f"answer: %json {json.dumps(answer)}\n")


def _call_schema(functions: list[dict], key: str) -> dict:
    """One call's JSON: {"name": one of the functions, key: its arguments}. The functions'
    ``$defs`` move to the root, where their ``$ref``s point."""
    defs: dict[str, Any] = {}
    options = []
    for f in functions:
        params = closed_schema(dict(f["parameters"]))
        for section in ("$defs", "definitions"):
            for name, value in (params.pop(section, None) or {}).items():
                if defs.get(name, value) != value:
                    raise APIError(400, f"two tools define {section}/{name} differently; "
                                        "rename one", param="tools", code="invalid_value")
                defs[name] = value
        options.append({"type": "object", "additionalProperties": False,
                        "properties": {"name": {"const": f["name"]}, key: params},
                        "required": ["name", key]})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema["$defs"] = defs
    schema["x-guidance"] = JSON_LAYOUT
    return schema


# ---------------------------------------------------------------------------- the answer
def _calls_in(body: str, names: set[str] | None) -> list[dict] | None:
    """The calls a JSON text holds (an object or a list of them), in OpenAI's form; None if
    it is not calls (or, with ``names``, calls a function not among them)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if names is not None and item["name"] not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        if not isinstance(args, dict):
            return None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": item["name"],
                                   "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls


class ToolCallParser:
    """Splits a model's answer, as it streams, into content and tool calls.

    ``feed(text)`` and ``close()`` return (content to send, calls completed). Text that
    could be the start of a ``<tool_call>`` tag is held back until it is known; a tagged
    call is sent whole when its closing tag arrives; an answer that opens with ``{`` (or
    ``<|python_tag|>``) is held to the end and is a call if it parses as one of the
    functions (Llama 3's form), content otherwise. Whitespace next to calls is dropped. A
    tag whose inside is not a call (or is never closed) stays in the content as text.

    ``allowed``: the answer follows ``call_grammar``, which allows calls to these
    functions: a call the token limit cut (``close(cut=True)``) is then a call as far as it
    got, never text; ``forced``: the answer is calls only."""

    def __init__(self, names: set[str], parallel: bool = True,
                 allowed: set[str] | None = None, forced: bool = False):
        self.names, self.parallel = names, parallel
        self.allowed, self.forced = allowed, forced
        self.buf, self.mode = "", "start"  # start | text | call | json
        self.space = ""  # whitespace held back: dropped if a call follows
        self.calls: list[dict] = []
        self.content = ""  # everything sent as content so far

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.buf += text
        out: list[str] = []
        calls: list[dict] = []
        while True:
            if self.mode == "start":
                head = self.buf.lstrip()
                if not head or _could_start(head, (PYTHON_TAG, OPEN)):
                    break
                if head.startswith(("{", PYTHON_TAG)):
                    self.mode = "json"
                    break
                self.mode = "text"
            elif self.mode == "text":
                i = self.buf.find(OPEN)
                if i < 0:
                    keep = _held_tail(self.buf, OPEN)
                    self._text(self.buf[:len(self.buf) - keep], out)
                    self.buf = self.buf[len(self.buf) - keep:]
                    break
                self._text(self.buf[:i], out)
                self.buf, self.mode = self.buf[i:], "call"
            elif self.mode == "call":
                j = self._close_at()
                if j < 0:
                    break
                block, self.buf = self.buf[:j + len(CLOSE)], self.buf[j + len(CLOSE):]
                found = _calls_in(block[len(OPEN):-len(CLOSE)], None)
                if found is None:
                    self._text(block, out)
                else:
                    calls += self._take(found)
                    self.space = ""
                self.mode = "text"
            else:  # json: the whole answer decides
                break
        return "".join(out), calls

    def close(self, cut: bool = False) -> tuple[str, list[dict]]:
        """The rest of the answer; ``cut``: the token limit ended it (raises
        ``CutCallError`` if a constrained call was cut before its function was known)."""
        out: list[str] = []
        calls: list[dict] = []
        held = self.buf.strip()
        call_cut = cut and self.allowed is not None and (
            self.mode == "call" or (self.mode == "json" and self.forced)
            or (held and not self.content and _could_start(held, (OPEN, PYTHON_TAG))))
        if call_cut:
            body = held
            for head in (OPEN, PYTHON_TAG):
                body = "" if head.startswith(body) else body
                body = body[len(head):] if body.startswith(head) else body
            found = cut_calls(body, self.allowed)
            if found is None and self.calls:  # an earlier block's calls are whole
                found = []
            if found is None:
                raise CutCallError("the token limit (max_tokens, or the context) ended the "
                                   "answer inside a tool call before its function was named;"
                                   " raise max_tokens")
            calls = self._take(found)
        elif self.mode == "json":
            body = self.buf.strip()
            body = body[len(PYTHON_TAG):] if body.startswith(PYTHON_TAG) else body
            found = _calls_in(body, self.names)
            if found:
                calls = self._take(found)
            else:
                self._text(self.buf, out)
        elif self.buf:
            self._text(self.buf, out)
        self.buf = ""
        if not self.calls and self.space:  # no call after all: the text as it was
            out.append(self.space)
            self.content += self.space
        self.space = ""
        return "".join(out), calls

    def _close_at(self) -> int:
        """Where the call block's closing tag starts (-1: not yet). In a constrained answer
        it is looked for after the block's JSON, whose strings may hold the tag."""
        if self.allowed is None:
            return self.buf.find(CLOSE)
        inside = self.buf[len(OPEN):]
        start = len(self.buf) - len(inside.lstrip())
        end = _json_end(self.buf[start:])
        return -1 if end is None else self.buf.find(CLOSE, start + end)

    def _text(self, text: str, out: list[str]) -> None:
        """Send text, holding back its trailing whitespace until more text follows (it
        is dropped if a call does); after a call, leading whitespace is dropped too."""
        if self.calls and not self.content:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self.space += text
            return
        piece = self.space + body
        out.append(piece)
        self.content += piece
        self.space = text[len(body):]

    def _take(self, found: list[dict]) -> list[dict]:
        if not self.parallel:
            found = found[:max(0, 1 - len(self.calls))]
        self.calls += found
        return found


class CutCallError(ValueError):
    """A constrained tool call cut by the token limit before its function was named."""


def cut_calls(text: str, allowed: set[str]) -> list[dict] | None:
    """The calls of a constrained answer's last tool call block (after ``<tool_call>``, or
    the whole answer in Llama 3's form) that the token limit cut: the complete calls, then
    the cut one as far as it got, its ``arguments`` the JSON text so far. The grammar wrote
    each call as ``{"name": "...", "<arguments key>": ...}`` (``JSON_LAYOUT``), so the
    cut call's name is known once what was written of it fits one allowed function only;
    None before that."""
    text = text.lstrip()
    text = text[1:] if text.startswith("[") else text
    calls: list[dict] = []
    while True:
        text = text.lstrip(", \n")
        end = _json_end(text)
        if end is None:
            break
        found = _calls_in(text[:end], allowed)
        if found is None:
            return None
        calls += found
        text = text[end:]
    if calls and not text.strip(" ]\n" + CLOSE):  # cut after the last call, in the markup
        return calls
    last = _cut_call(text, allowed)
    return calls + [last] if last is not None else calls or None


def _cut_call(text: str, allowed: set[str]) -> dict | None:
    head = '{"name": "'
    if len(text) <= len(head):
        if not head.startswith(text):
            return None
        name, quote, rest = "", "", ""
    elif text.startswith(head):
        name, quote, rest = text[len(head):].partition('"')
    else:
        return None
    fits = [f for f in sorted(allowed) if (f == name if quote else f.startswith(name))]
    if len(fits) != 1:
        return None
    arguments = ""
    for key in ("arguments", "parameters"):
        if rest.startswith(f', "{key}": '):
            arguments = rest[len(key) + 6:]
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": fits[0], "arguments": arguments}}


def _json_end(text: str) -> int | None:
    """Where the JSON object or list at the start of ``text`` ends; None if it is not
    complete."""
    if not text.startswith(("{", "[")):
        return None
    depth, in_string, escaped = 0, False, False
    for i, c in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _could_start(text: str, markers: tuple[str, ...]) -> bool:
    """``text`` is a proper beginning of one of the markers (more may complete it)."""
    return any(len(text) < len(m) and m.startswith(text) for m in markers)


def _held_tail(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could begin ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def parse_answer(text: str, plan: ToolPlan, constrained: bool = False,
                 cut: bool = False) -> tuple[str | None, list[dict]]:
    """A whole answer as (content, tool calls): what the stream would have sent.
    ``constrained``: the answer followed ``call_grammar``; ``cut``: the token limit ended
    it."""
    parser = plan.parser(constrained)
    content, calls = parser.feed(text)
    more, last = parser.close(cut)
    content += more
    calls += last
    return (content or None) if calls else text, calls
