"""``POST /v1/responses``: OpenAI's Responses API over the chat path.

The body is translated into a ``ChatRequest`` and runs as ``/v1/chat/completions`` does
(``routes.submit_chat``: the chat template, the model's tool-call syntax, the grammar of a
forced call or of ``text.format``). ``input`` is a string or a list of items: messages
(roles ``user``, ``assistant``, ``system``, ``developer``; ``input_text`` / ``output_text``
parts), ``function_call`` and ``function_call_output``; ``instructions`` is a system
message in front. The answer's ``output`` is a ``message`` item (``output_text``) and one
``function_call`` item per call; ``status`` is ``incomplete`` (``max_output_tokens``) when
the limit cut the text. ``stream: true`` sends the Responses events (``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` / ``.done``, ``response.function_call_arguments.delta`` /
``.done``, ``response.content_part.done``, ``response.output_item.done``, then
``response.completed`` or ``response.incomplete``).

``previous_response_id`` continues a conversation this server answered: the
``MAX_STORED`` most recent responses (unless sent with ``store: false``) are kept in
memory, each as its conversation in chat form (without its ``instructions``, which, as
OpenAI's, do not carry over); they are gone when the server restarts.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from kvformer.serve.engine import Output
from kvformer.serve.routes import (
    Server,
    answer_of,
    cut_error,
    joined_text,
    refuse_unhonoured,
    stream_parts,
    submit_chat,
)
from kvformer.serve.schemas import APIError, ChatRequest, ResponsesRequest, parse_body
from kvformer.serve.streaming import collect, sse_response
from kvformer.serve.tools import CutCallError

MAX_STORED = 256  # responses kept for previous_response_id

class Store:
    """The conversations of the latest responses, by id (oldest dropped first)."""

    def __init__(self, size: int = MAX_STORED):
        self.size = size
        self.items: OrderedDict[str, list[dict]] = OrderedDict()

    def get(self, rid: str) -> list[dict]:
        if rid not in self.items:
            raise APIError(400, f"previous_response_id {rid!r} is unknown: this server keeps "
                                f"its {self.size} latest responses until it restarts",
                           param="previous_response_id", code="invalid_value")
        self.items.move_to_end(rid)
        return self.items[rid]

    def put(self, rid: str, messages: list[dict]) -> None:
        self.items[rid] = messages
        while len(self.items) > self.size:
            self.items.popitem(last=False)


async def responses(srv: Server, store: Store, request: Request
                    ) -> dict | StreamingResponse:
    """POST /v1/responses; ``store`` holds the responses a later one may continue."""
    srv.check_auth(request)
    req: ResponsesRequest = parse_body(ResponsesRequest, await srv.read_json(request))
    srv.check_model(req.model)
    refuse_unhonoured(req, "responses")
    history = list(store.get(req.previous_response_id)) if req.previous_response_id else []
    conversation = history + input_messages(req.input)
    body = chat_body(req, conversation)
    chat = parse_body(ChatRequest, body)
    plan, params, stream, first = await submit_chat(srv, request, chat, req.max_output_tokens)
    head = {"id": f"resp_{uuid.uuid4().hex}", "object": "response",
            "created_at": int(time.time()), "model": srv.model_name,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "previous_response_id": req.previous_response_id,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "text": req.text or {"format": {"type": "text"}}, "truncation": "disabled",
            "store": req.store is not False, "metadata": req.metadata or {},
            "error": None}

    def finish(out: Output, text: str, calls: list[dict], output: list[dict]) -> dict:
        """The whole response; remembers its conversation."""
        if req.store is not False:
            reply: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                reply["tool_calls"] = calls
            store.put(head["id"], conversation + [reply])
        cut = out.finish_reason == "length" and not calls
        return dict(head, status="incomplete" if cut else "completed",
                    incomplete_details={"reason": "max_output_tokens"} if cut else None,
                    output=output, usage=usage(out))

    if req.stream:
        events = _Events(head, plan, finish, params[0].grammar is not None)
        return sse_response(stream, first, events, named=True, error_body=events.error)
    out = (await collect(stream, first, request, srv.retry_after, 1))[0]
    text, calls = answer_of(out, plan, params[0].grammar is not None)
    text = text or ""
    status = "incomplete" if out.finish_reason == "length" and not calls else "completed"
    output = [message_item(f"msg_{uuid.uuid4().hex}", text, status)] \
        if text or not calls else []
    output += [call_item(c) for c in calls]
    return finish(out, text, calls, output)


class _Events:
    """The Responses events for each output: the text in one message item, each tool call
    a function_call item of its own."""

    def __init__(self, head: dict, plan, finish, constrained: bool):
        self.head, self.finish = head, finish
        self.parser = plan.parser(constrained) if plan else None
        self.total = Output()
        self.seq = 0
        self.output: list[dict] = []
        self.message_id: str | None = None  # the open message item's
        self.text = ""  # its text so far
        self.calls: list[dict] = []

    def event(self, kind: str, **fields: Any) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def error(self, exc: APIError) -> dict:
        return self.event("error", code=exc.code, message=exc.message, param=exc.param)

    def __call__(self, _index: int, out: Output, _last: bool) -> list[dict]:
        self.total.merge(out)
        events: list[dict] = []
        if self.seq == 0:
            start = dict(self.head, status="in_progress", incomplete_details=None,
                         output=[], usage=None)
            events.append(self.event("response.created", response=start))
            events.append(self.event("response.in_progress", response=start))
        try:
            text, calls = stream_parts(self.parser, out)
        except CutCallError as exc:  # the stream ends with the error
            return events + [self.error(cut_error(exc))]
        if text:
            self._open_message(events)
            self.text += text
            events.append(self.event("response.output_text.delta", **self._where(),
                                     content_index=0, delta=text, logprobs=[]))
        for call in calls:
            self._close_message(events, "completed")
            self.calls.append(call)
            item = call_item(call)
            index = len(self.output)
            self.output.append(item)
            where = {"item_id": item["id"], "output_index": index}
            events.append(self.event("response.output_item.added", output_index=index,
                                     item=dict(item, arguments="", status="in_progress")))
            events.append(self.event("response.function_call_arguments.delta", **where,
                                     delta=item["arguments"]))
            events.append(self.event("response.function_call_arguments.done", **where,
                                     arguments=item["arguments"], name=item["name"]))
            events.append(self.event("response.output_item.done", output_index=index,
                                     item=item))
        if out.finished:
            cut = self.total.finish_reason == "length" and not self.calls
            if not self.output and self.message_id is None:  # nothing said: an empty message
                self._open_message(events)
            self._close_message(events, "incomplete" if cut else "completed")
            final = self.finish(self.total, self._all_text(), self.calls, self.output)
            kind = "response.incomplete" if cut else "response.completed"
            events.append(self.event(kind, response=final))
        return events

    def _where(self) -> dict:
        return {"item_id": self.message_id, "output_index": len(self.output)}

    def _all_text(self) -> str:
        return "".join(p["text"] for item in self.output if item["type"] == "message"
                       for p in item["content"])

    def _open_message(self, events: list[dict]) -> None:
        if self.message_id is not None:
            return
        self.message_id, self.text = f"msg_{uuid.uuid4().hex}", ""
        item = dict(message_item(self.message_id, "", "in_progress"), content=[])
        events.append(self.event("response.output_item.added", output_index=len(self.output),
                                 item=item))
        events.append(self.event("response.content_part.added", **self._where(),
                                 content_index=0, part=text_part("")))

    def _close_message(self, events: list[dict], status: str) -> None:
        if self.message_id is None:
            return
        where = self._where()
        events.append(self.event("response.output_text.done", **where, content_index=0,
                                 text=self.text, logprobs=[]))
        events.append(self.event("response.content_part.done", **where, content_index=0,
                                 part=text_part(self.text)))
        item = message_item(self.message_id, self.text, status)
        events.append(self.event("response.output_item.done", output_index=len(self.output),
                                 item=item))
        self.output.append(item)
        self.message_id = None


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [text_part(text)]}


def call_item(call: dict) -> dict:
    """An OpenAI chat tool call (``tools.parse_answer``'s) as a function_call item."""
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"),
            "call_id": call["id"], "name": call["function"]["name"],
            "arguments": call["function"]["arguments"], "status": "completed"}


def usage(out: Output) -> dict:
    return {"input_tokens": out.prompt_tokens,
            "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.prompt_tokens + out.completion_tokens}


# ---------------------------------------------------------------------------- the request
def chat_body(req: ResponsesRequest, conversation: list[dict]) -> dict:
    """The request as the body of a /v1/chat/completions request."""
    messages = list(conversation)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
    body: dict[str, Any] = {"messages": messages, "stream": False}
    for name, value in (("temperature", req.temperature), ("top_p", req.top_p),
                        ("parallel_tool_calls", req.parallel_tool_calls)):
        if value is not None:
            body[name] = value
    if req.tools:
        body["tools"] = [_function(t, f"tools[{i}]") for i, t in enumerate(req.tools)]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice)
    fmt = (req.text or {}).get("format")
    if fmt is not None:
        body["response_format"] = _response_format(fmt)
    return body


def input_messages(given: str | list[dict]) -> list[dict]:
    """``input`` as chat messages: consecutive function calls join one assistant message."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    out: list[dict] = []
    for i, item in enumerate(given):
        param = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{param}.role must be 'user', 'assistant', 'system' or "
                                    f"'developer', got {role!r}", param=f"{param}.role",
                               code="invalid_value")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _text_of(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{param}.{key} must be a string",
                                   param=f"{param}.{key}", code="invalid_value")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{param}.call_id must be a string",
                               param=f"{param}.call_id", code="invalid_value")
            out.append({"role": "tool", "tool_call_id": item["call_id"],
                        "content": _text_of(item.get("output"), f"{param}.output")})
        elif kind == "reasoning":
            continue  # another model's reasoning: not part of the conversation's text
        else:
            raise APIError(400, f"{param}: items of type {kind!r} are not supported "
                                "(message, function_call, function_call_output)",
                           param=f"{param}.type", code="unsupported_value")
    if not out:
        raise APIError(400, "input has no messages", param="input", code="invalid_value")
    return out


def _text_of(value: Any, param: str) -> str:
    return joined_text(value, param, ("input_text", "output_text", "text"), "", "text parts")


def _function(tool: dict, param: str) -> dict:
    if tool.get("type") != "function":
        raise APIError(400, f"{param} has type {tool.get('type')!r}; only 'function' tools "
                            "are supported", param=f"{param}.type", code="unsupported_value")
    if not isinstance(tool.get("name"), str):
        raise APIError(400, f"{param} needs a name", param=f"{param}.name",
                       code="invalid_value")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict) -> Any:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                        "{'type': 'function', 'name': ...}", param="tool_choice",
                   code="invalid_value")


def _response_format(fmt: Any) -> dict:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema",
                "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"]}}
    raise APIError(400, "text.format must be {'type': 'text'}, {'type': 'json_object'} or "
                        "{'type': 'json_schema', 'name': ..., 'schema': {...}}",
                   param="text.format", code="invalid_value")

