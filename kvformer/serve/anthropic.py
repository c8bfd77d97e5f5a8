"""``POST /v1/messages``: Anthropic's Messages API over the chat path.

The body is translated into a ``ChatRequest`` (``system`` first, ``tool_use`` blocks as the
assistant's tool calls, ``tool_result`` blocks as tool messages, ``tools`` /
``tool_choice`` as function tools) and runs as ``/v1/chat/completions`` does: the model's
chat template, its tool-call syntax, the grammar of a forced call (``routes.submit_chat``).
The answer is a message of ``text`` and ``tool_use`` blocks with Anthropic's
``stop_reason`` (``end_turn``, ``max_tokens``, ``stop_sequence`` with the sequence, or
``tool_use``) and ``usage``; ``output_config.format`` (a JSON Schema) forces the text as
``response_format`` does (``input_tokens`` not counting the prompt's tokens read from the
prefix cache, which are ``cache_read_input_tokens``); ``stream: true`` sends Anthropic's
events (``message_start``, ``content_block_start`` / ``_delta`` / ``_stop``,
``message_delta``, ``message_stop``). Errors have Anthropic's body, ``{"type": "error",
"error": {"type", "message"}}``; the key may come as ``x-api-key`` or as a Bearer token.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvformer.serve.engine import Output
from kvformer.serve.routes import (
    Server,
    answer_of,
    cut_error,
    joined_text,
    stream_parts,
    submit_chat,
)
from kvformer.serve.schemas import (
    AnthropicRequest,
    APIError,
    ChatRequest,
    parse_body,
)
from kvformer.serve.streaming import collect, sse_response
from kvformer.serve.tools import CutCallError

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error"}


def error_body(exc: APIError) -> dict:
    kind = ERROR_TYPES.get(exc.status, "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


async def messages(srv: Server, request: Request) -> Any:
    """POST /v1/messages; every error in Anthropic's shape."""
    try:
        return await _messages(srv, request)
    except APIError as exc:
        return JSONResponse(error_body(exc), status_code=exc.status, headers=exc.headers)


async def _messages(srv: Server, request: Request) -> dict | StreamingResponse:
    srv.check_auth(request)
    req: AnthropicRequest = parse_body(AnthropicRequest, await srv.read_json(request))
    srv.check_model(req.model)
    if req.thinking and req.thinking.get("type") != "disabled":
        raise APIError(400, "thinking is not supported by this server; leave it out",
                       param="thinking", code="unsupported_value")
    if req.max_tokens < 1:
        raise APIError(400, f"max_tokens={req.max_tokens} must be at least 1",
                       param="max_tokens", code="invalid_value")
    chat = parse_body(ChatRequest, chat_body(req))
    plan, params, stream, first = await submit_chat(srv, request, chat, req.max_tokens)
    stops = list(req.stop_sequences or [])
    head = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
            "model": srv.model_name}

    def stop_reason(out: Output, tool_calls: bool) -> tuple[str, str | None]:
        if tool_calls:
            return "tool_use", None
        if out.finish_reason == "length":
            return "max_tokens", None
        matched = matched_stop(srv, out, stops)
        return ("stop_sequence", matched) if matched is not None else ("end_turn", None)

    if req.stream:
        events = _Events(head, plan, stop_reason, stream.prompt_tokens,
                         params[0].grammar is not None)
        return sse_response(stream, first, events, named=True, error_body=error_body)
    out = (await collect(stream, first, request, srv.retry_after, 1))[0]
    text, calls = answer_of(out, plan, params[0].grammar is not None)
    content = [{"type": "text", "text": text}] if text or not calls else []
    content += [tool_use(c) for c in calls]
    reason, sequence = stop_reason(out, bool(calls))
    return dict(head, content=content, stop_reason=reason, stop_sequence=sequence,
                usage=usage(out))


class _Events:
    """The stream's events for each output: text deltas in one text block, each tool call
    a ``tool_use`` block of its own (its arguments in one ``input_json_delta``)."""

    def __init__(self, head: dict, plan, stop_reason, prompt_tokens: int, constrained: bool):
        self.head, self.stop_reason, self.prompt_tokens = head, stop_reason, prompt_tokens
        self.parser = plan.parser(constrained) if plan else None
        self.total = Output()
        self.started = False
        self.block: str | None = None  # the open block's type
        self.index = -1  # the open (or last) block's index
        self.calls = 0

    def __call__(self, _index: int, out: Output, _last: bool) -> list[dict]:
        self.total.merge(out)
        events: list[dict] = []
        if not self.started:
            self.started = True
            events.append({"type": "message_start", "message": dict(
                self.head, content=[], stop_reason=None, stop_sequence=None,
                usage={"input_tokens": self.prompt_tokens, "output_tokens": 0})})
        try:
            text, calls = stream_parts(self.parser, out)
        except CutCallError as exc:  # the stream ends with the error
            return events + [error_body(cut_error(exc))]
        if text:
            self._open("text", {"type": "text", "text": ""}, events)
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "text_delta", "text": text}})
        for call in calls:
            block = tool_use(call)
            self._open("tool_use", dict(block, input={}), events)
            events.append({"type": "content_block_delta", "index": self.index,
                           "delta": {"type": "input_json_delta",
                                     "partial_json": call["function"]["arguments"]}})
            self.block = None  # a call is whole: the next one is a block of its own
            events.append({"type": "content_block_stop", "index": self.index})
            self.calls += 1
        if out.finished:
            if self.index < 0:  # nothing at all was said: an empty text block
                self._open("text", {"type": "text", "text": ""}, events)
            self._close(events)
            reason, sequence = self.stop_reason(self.total, self.calls > 0)
            events.append({"type": "message_delta",
                           "delta": {"stop_reason": reason, "stop_sequence": sequence},
                           "usage": usage(self.total)})
            events.append({"type": "message_stop"})
        return events

    def _open(self, kind: str, block: dict, events: list[dict]) -> None:
        if self.block == kind and kind == "text":
            return
        self._close(events)
        self.index += 1
        self.block = kind
        events.append({"type": "content_block_start", "index": self.index,
                       "content_block": block})

    def _close(self, events: list[dict]) -> None:
        if self.block is not None:
            events.append({"type": "content_block_stop", "index": self.index})
            self.block = None


def usage(out: Output) -> dict:
    return {"input_tokens": out.prompt_tokens - out.cached_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": out.cached_tokens,
            "output_tokens": out.completion_tokens}


def tool_use(call: dict) -> dict:
    """An OpenAI tool call (``tools.parse_answer``'s) as a ``tool_use`` block."""
    return {"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"),
            "name": call["function"]["name"],
            "input": json.loads(call["function"]["arguments"])}


def matched_stop(srv: Server, out: Output, stops: list[str]) -> str | None:
    """Which stop sequence ended the text: the one that follows the text in the decoded
    tokens (the engine cut the text before it). None: the model ended its turn."""
    if out.finish_reason != "stop" or not stops:
        return None
    decoded = srv.decode(out.token_ids)
    rest = decoded[len(out.text):] if decoded.startswith(out.text) else ""
    found = [s for s in stops if s and rest.startswith(s)]
    return max(found, key=len) if found else None


# ---------------------------------------------------------------------------- the request
def chat_body(req: AnthropicRequest) -> dict:
    """The request as the body of a /v1/chat/completions request."""
    messages: list[dict] = []
    if req.system:
        messages.append({"role": "system", "content": _text_of(req.system, "system")})
    for i, m in enumerate(req.messages):
        if m.role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'user' or 'assistant', got "
                                f"{m.role!r}", param=f"messages[{i}].role",
                           code="invalid_value")
        messages += _chat_messages(m.role, m.content, f"messages[{i}]")
    body: dict[str, Any] = {"messages": messages, "stream": False}
    for name, value in (("temperature", req.temperature), ("top_p", req.top_p),
                        ("top_k", req.top_k), ("stop", req.stop_sequences)):
        if value is not None:
            body[name] = value
    if req.tools:
        body["tools"] = [_function(t, f"tools[{i}]") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"], parallel = _tool_choice(req.tool_choice)
        if not parallel:
            body["parallel_tool_calls"] = False
    fmt = (req.output_config or {}).get("format")  # its "effort" has nothing to change here
    if fmt is not None:
        if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"
                and isinstance(fmt.get("schema"), dict)):
            raise APIError(400, "output_config.format must be {'type': 'json_schema', "
                                "'schema': {...}}", param="output_config.format",
                           code="invalid_value")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt["schema"]}}
    return body


def _text_of(value: Any, param: str) -> str:
    return joined_text(value, param, ("text",), "\n", "text blocks")


def _chat_messages(role: str, content: str | list[dict], param: str) -> list[dict]:
    """One Anthropic message as chat messages: tool results become tool messages (in
    place), tool_use blocks the assistant's tool calls."""
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    out: list[dict] = []
    text: list[str] = []
    calls: list[dict] = []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("id"), str):
                raise APIError(400, f"{where}: a tool_use block needs id and name",
                               param=where, code="invalid_value")
            if not isinstance(block.get("input", {}), dict):
                raise APIError(400, f"{where}.input must be an object", param=f"{where}.input",
                               code="invalid_value")
            calls.append({"id": block["id"], "type": "function", "function": {
                "name": block["name"],
                "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise APIError(400, f"{where}: a tool_result block needs tool_use_id",
                               param=where, code="invalid_value")
            result = block.get("content") or ""
            result = _text_of(result, f"{where}.content")
            if block.get("is_error"):
                result = f"Error: {result}"
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                        "content": result})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # another model's reasoning: not part of the conversation's text
        else:
            raise APIError(400, f"{where}: blocks of type {kind!r} are not supported in a "
                                f"{role} message (text, tool_use from the assistant, "
                                "tool_result from the user)", param=f"{where}.type",
                           code="unsupported_value")
    if text or calls or not out:
        message: dict[str, Any] = {"role": role, "content": "".join(text)}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
    return out


def _function(tool: dict, param: str) -> dict:
    if tool.get("type") not in (None, "custom"):
        raise APIError(400, f"{param} has type {tool.get('type')!r}; only custom tools "
                            "(name, description, input_schema) are supported",
                       param=f"{param}.type", code="unsupported_value")
    if not isinstance(tool.get("name"), str):
        raise APIError(400, f"{param} needs a name", param=f"{param}.name",
                       code="invalid_value")
    schema = tool.get("input_schema")
    if schema is not None and not isinstance(schema, dict):
        raise APIError(400, f"{param}.input_schema must be a JSON Schema object",
                       param=f"{param}.input_schema", code="invalid_value")
    function = {"name": tool["name"], "parameters": schema or {"type": "object"}}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _tool_choice(choice: dict) -> tuple[Any, bool]:
    """Anthropic's tool_choice as OpenAI's, and whether parallel calls are allowed."""
    kind = choice.get("type")
    parallel = choice.get("disable_parallel_tool_use") is not True
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise APIError(400, "tool_choice must be {'type': 'auto' | 'any' | 'none'} or "
                        "{'type': 'tool', 'name': ...}", param="tool_choice",
                   code="invalid_value")
