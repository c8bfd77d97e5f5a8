"""The generation endpoints, ``POST /v1/completions`` and ``POST /v1/chat/completions``, and
``Server``, what every handler shares (the engine, the key, the checks).

Each endpoint turns its body into a prompt (token ids) and ``SamplingParams``, submits it,
and answers with one JSON object or a stream of server-sent events, in OpenAI's formats.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from kvformer.errors import ChatTemplateError, ContextOverflowError
from kvformer.formats.tokenizer.tokenizer import byte_alphabet
from kvformer.serve.engine import Engine, Output, SamplingParams, TokenLogprob
from kvformer.serve.grammar import Grammar, GrammarError, Grammars
from kvformer.serve.scheduler import EngineClosedError, QueueFullError
from kvformer.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    _Common,
    parse_body,
)
from kvformer.serve.streaming import (
    ChunkJSON,
    RequestStream,
    collect,
    engine_error,
    json_str,
    sse_response,
)
from kvformer.serve.tools import (
    CutCallError,
    ToolPlan,
    call_grammar,
    parse_answer,
    prompt_inputs,
    tool_plan,
)

MAX_STOP_STRINGS = 16
MAX_TOP_K = 2**31 - 1
MAX_LOGPROBS = 20
MAX_CHOICES = 16  # n


class Server:
    """State shared by the handlers."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None,
                 max_body: int, retry_after: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body, self.retry_after = max_body, retry_after
        self.tokenizer = engine.tokenizer
        self.grammars = Grammars(engine.tokenizer, engine.model.cfg.vocab_size)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "kvformer", "max_model_len": self.engine.max_seq_len}

    # ---- checks
    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
            token = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer "
                                "<key>' (or 'x-api-key: <key>')", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")

    async def read_json(self, request: Request) -> Any:
        declared = request.headers.get("content-length")
        too_big = APIError(413, f"the request body is larger than {self.max_body} bytes",
                           code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise too_big
        try:
            if len(body) > 1 << 16:  # a large body is parsed off the event loop
                return await asyncio.to_thread(json.loads, body)
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})",
                           code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body's JSON is nested too deeply",
                           code="invalid_json") from None

    def check_prompt(self, prompt_ids: list[int], max_tokens: int | None,
                     prompt_param: str) -> int:
        """The engine's prompt checks as API errors; returns max_tokens (None: the rest of
        the context)."""
        try:
            return self.engine.check_prompt(prompt_ids, max_tokens)
        except ContextOverflowError as exc:
            raise APIError(400, str(exc), param=prompt_param,
                           code="context_length_exceeded") from None
        except ValueError as exc:
            raise APIError(400, str(exc), param=prompt_param, code="invalid_value") from None

    async def submit(self, request: Request, prompt_ids: list[int],
                     params: list[SamplingParams]) -> tuple[RequestStream, tuple[int, Output]]:
        """Queue the request's choices and wait for the first output (or an error)."""
        try:
            stream = RequestStream(self.engine, prompt_ids, params)
        except (QueueFullError, EngineClosedError) as exc:
            raise engine_error(exc, self.retry_after) from None
        try:
            first = await stream.get_watching(request)
        except BaseException:
            stream.abort()
            raise
        if first[1].error is not None:
            stream.abort()
            raise engine_error(first[1].error, self.retry_after)
        return stream, first

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ---- token strings for logprobs
    @lru_cache(maxsize=65536)  # noqa: B019 - one Server per process, ids are small ints
    def token_str(self, token_id: int) -> tuple[str, list[int]]:
        tok = self.tokenizer
        text = tok.decode([token_id]) if tok is not None else str(token_id)
        raw = _token_bytes(tok, token_id)
        if raw is None:
            return text, list(text.encode("utf-8"))
        if "\ufffd" in text:  # part of a character: spell its bytes, as OpenAI does
            try:
                bytes(raw).decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, raw


def _token_bytes(tok, token_id: int) -> list[int] | None:
    """The raw bytes of a byte-level BPE token (a partial character has no text)."""
    if tok is None or not hasattr(tok, "id_to_token"):
        return None
    spelling = tok.id_to_token(token_id)
    table = {c: b for b, c in enumerate(byte_alphabet())}
    if spelling is None or not all(c in table for c in spelling):
        return None
    return [table[c] for c in spelling]


# ---------------------------------------------------------------------------- fields
# Fields of OpenAI's request schemas that would change the output and that kvformer does
# not honour, with the values that change nothing (and are therefore accepted): anything
# else is a 400 naming the field. Fields outside OpenAI's schema are ignored.
def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


REFUSED: dict[str, dict[str, Callable[[Any], bool]]] = {
    "chat": {
        "audio": _empty,
        "modalities": lambda v: _empty(v) or v == ["text"],
        "prediction": _empty,
        "reasoning_effort": _empty,
        "verbosity": _empty,
        "web_search_options": _empty,
        "functions": _empty,
        "function_call": lambda v: _empty(v) or v in ("none", "auto"),
    },
    "completions": {
        "suffix": _empty,
    },
    "responses": {
        "background": lambda v: not v,
        "conversation": _empty,
        "prompt": _empty,
        "top_logprobs": lambda v: not v,
        "reasoning": lambda v: _empty(v) or (isinstance(v, dict)
                                             and all(x is None for x in v.values())),
    },
}


def refuse_unhonoured(req: _Common, endpoint: str) -> None:
    given = dict(req.model_extra or {})
    given.update({k: getattr(req, k) for k in type(req).model_fields})
    for name, harmless in REFUSED[endpoint].items():
        if name in given and not harmless(given[name]):
            raise APIError(400, f"{name} is not supported by this server (got "
                                f"{_short(given[name])}); leave it out", param=name,
                           code="unsupported_value")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _invalid(name: str, value: Any, what: str) -> APIError:
    return APIError(400, f"{name}={_short(value)} is invalid: use {what}", param=name,
                    code="invalid_value")


def sampling_params(srv: Server, req: _Common, max_tokens: int | None,
                    logprobs: int | None, grammar: Grammar | None = None
                    ) -> list[SamplingParams]:
    """The request's sampling settings, checked, one per choice (``n``); ``max_tokens``
    None means the rest of the context (``Server.check_prompt`` settles it). ``grammar``:
    what every choice's text must match."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_CHOICES:
        raise _invalid("n", n, f"an integer from 1 to {MAX_CHOICES}")
    if req.best_of not in (None, 1, n):
        raise APIError(400, f"best_of={req.best_of} is not supported: give n choices and "
                            "pick among them (best_of may only equal n)", param="best_of",
                       code="unsupported_value")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens} must be at least 1",
                       param="max_tokens", code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    presence = req.presence_penalty or 0.0
    frequency = req.frequency_penalty or 0.0
    repetition = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    checks = (("temperature", temperature, math.isfinite(temperature) and
               0 <= temperature <= 2, "a number between 0 and 2"),
              ("top_p", req.top_p, req.top_p is None or 0 < req.top_p <= 1,
               "a number in (0, 1]"),
              ("top_k", req.top_k, req.top_k is None or 1 <= req.top_k <= MAX_TOP_K
               or req.top_k == -1, f"an integer from 1 to {MAX_TOP_K} (or -1 for all)"),
              ("min_p", req.min_p, req.min_p is None or 0 <= req.min_p <= 1,
               "a number between 0 and 1"),
              ("presence_penalty", presence, -2 <= presence <= 2, "a number between -2 and 2"),
              ("frequency_penalty", frequency, -2 <= frequency <= 2,
               "a number between -2 and 2"),
              ("repetition_penalty", repetition, math.isfinite(repetition) and repetition > 0,
               "a number > 0 (1 is off)"))
    for name, value, ok, what in checks:
        if not ok:
            raise _invalid(name, value, what)
    stop = req.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop",
                       code="invalid_value")
    bias = _logit_bias(req.logit_bias, srv.engine.model.cfg.vocab_size)
    out = []
    for i in range(n):
        seed = None if req.seed is None else (req.seed + i) % 2**63  # choice i: seed + i
        out.append(SamplingParams(
            max_tokens=max_tokens or 1, temperature=float(temperature),
            top_p=None if req.top_p in (None, 1) else float(req.top_p),
            top_k=None if req.top_k in (None, -1) else req.top_k,
            min_p=req.min_p or None, presence_penalty=float(presence),
            frequency_penalty=float(frequency), repetition_penalty=float(repetition),
            logit_bias=bias, seed=seed, stop=tuple(s for s in stops if s),
            logprobs=logprobs, ignore_eos=bool(req.ignore_eos), grammar=grammar))
    return out


def response_schema(value: Any) -> dict | None:
    """``response_format``'s JSON schema (``{"type": "object"}`` for ``json_object``; None
    for plain text)."""
    if _empty(value) or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema, a "
                                "JSON Schema object", param="response_format",
                           code="invalid_value")
        return spec["schema"]
    raise APIError(400, f"response_format={_short(value)} is not supported: use type "
                        "'text', 'json_object' or 'json_schema'", param="response_format",
                   code="unsupported_value")


def response_grammar(srv: Server, value: Any) -> Grammar | None:
    """``response_format`` as a grammar (None for plain text). Runs on a worker thread:
    the first call builds the vocabulary's table, a schema takes milliseconds to compile."""
    schema = response_schema(value)
    if schema is None:
        return None
    try:
        return srv.grammars.json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, f"response_format: {exc}", param="response_format",
                       code="invalid_value") from None


def _logit_bias(given: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as JSON object keys) -> a bias in [-100, 100]."""
    if not given:
        return None
    bias = {}
    for key, value in given.items():
        digits = key.strip()
        if not (digits.isascii() and digits.isdigit() and int(digits) < vocab):
            raise _invalid("logit_bias", {key: value},
                           f"token ids from 0 to {vocab - 1} as keys")
        if not (math.isfinite(value) and -100 <= value <= 100):
            raise _invalid("logit_bias", {key: value}, "biases between -100 and 100")
        bias[int(key)] = float(value)
    return bias


def _prepare(srv: Server, params: list[SamplingParams], ids: list[int],
             max_tokens: int | None, prompt_param: str) -> None:
    resolved = srv.check_prompt(ids, max_tokens, prompt_param)
    for p in params:
        p.max_tokens = resolved


# ---------------------------------------------------------------------------- completions
async def completions(srv: Server, request: Request) -> dict | StreamingResponse:
    """POST /v1/completions."""
    srv.check_auth(request)
    req: CompletionRequest = parse_body(CompletionRequest, await srv.read_json(request))
    srv.check_model(req.model)
    refuse_unhonoured(req, "completions")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "give one prompt per request (a string, a list with one "
                                "string, or a list of token ids)", param="prompt",
                           code="unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if srv.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids",
                           param="prompt")
        refuse_overlong(srv, prompt, "prompt")
        ids = await asyncio.to_thread(encode_text, srv, prompt, "prompt")  # off the loop
    else:
        ids = list(prompt)
    lp = req.logprobs
    if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}",
                       param="logprobs", code="invalid_value")
    if req.echo and lp is not None:
        raise APIError(400, "echo with logprobs is not supported (the prompt's "
                            "log-probabilities are not computed); drop one of them",
                       param="echo", code="unsupported_value")
    grammar = await asyncio.to_thread(response_grammar, srv, req.response_format)
    params = sampling_params(srv, req, req.max_tokens, lp, grammar)
    _prepare(srv, params, ids, req.max_tokens, "prompt")
    echo = ""
    if req.echo:
        echo = prompt if isinstance(prompt, str) else srv.decode(ids)
    stream, first = await srv.submit(request, ids, params)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": srv.model_name}

    def choice(index: int, out: Output, offset: int) -> dict:
        return {"index": index, "text": out.text,
                "logprobs": _legacy_logprobs(srv, out.logprobs, offset)
                if lp is not None else None,
                "finish_reason": out.finish_reason}

    if req.stream:
        want_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets = [0] * len(params)
        totals = [Output() for _ in params]
        chunk_json = ChunkJSON(head, usage_null=want_usage)

        def chunks(index: int, out: Output, last: bool) -> list[dict | str]:
            totals[index].merge(out)
            res: list[dict | str] = []
            if echo and offsets[index] == 0 and not out.text.startswith(echo):
                out.text = echo + out.text
            if out.text or out.token_ids or out.finished:
                if lp is None and not out.finished:  # the usual chunk, written directly
                    res.append(chunk_json(f'{{"index": {index}, "text": {json_str(out.text)}, '
                                          '"logprobs": null, "finish_reason": null}'))
                else:
                    res.append(chunk_json(choice(index, out, offsets[index])))
                offsets[index] += len(out.text)
            if last and want_usage:
                res.append(dict(head, choices=[], usage=_usage(totals)))
            return res
        return sse_response(stream, first, chunks)

    outs = await collect(stream, first, request, srv.retry_after, len(params))
    for out in outs:
        out.text = echo + out.text
    return dict(head, choices=[choice(i, out, 0) for i, out in enumerate(outs)],
                usage=_usage(outs))


# ---------------------------------------------------------------------------- chat
def chat_messages(req: ChatRequest) -> list[dict]:
    """The messages as the chat template takes them (text parts joined)."""
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            bad = [p.type for p in content if p.type != "text"]
            if bad:
                raise APIError(400, f"messages[{i}]: content parts of type {bad[0]!r} "
                                    "are not supported (text only)",
                               param=f"messages[{i}].content", code="unsupported_value")
            content = "".join(p.text or "" for p in content)
        message = {"role": m.role, "content": content or ""}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    if not messages:
        raise APIError(400, "messages is empty: give at least one message",
                       param="messages", code="invalid_value")
    return messages


def refuse_overlong(srv: Server, text: str, param: str) -> None:
    """A 400 for a prompt whose length alone proves it cannot fit the context: more
    characters than the context's tokens can stand for (`max_chars_per_token`), so that a
    megabyte of text is refused without tokenizing it."""
    per_token = srv.tokenizer.max_chars_per_token
    ctx = srv.engine.max_seq_len
    if per_token is not None and len(text) > ctx * per_token:
        raise APIError(400, f"{param} has {len(text):,} characters, more than the model's "
                            f"context of {ctx:,} tokens can hold (a token of this vocabulary "
                            f"stands for at most {per_token} characters); shorten it",
                       param=param, code="context_length_exceeded")


def encode_text(srv: Server, text: str, param: str, add_special_tokens: bool = True
                ) -> list[int]:
    """A prompt's token ids; text that is not valid Unicode (a lone surrogate such as
    "\\ud800", which JSON allows) is a 400."""
    try:
        return srv.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except ValueError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_value") from None


def chat_prompt(srv: Server, messages: list[dict], add_generation_prompt: bool = True,
                **extra: Any) -> list[int]:
    """The token ids of the messages through the model's chat template."""
    if srv.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat")
    try:
        # what the messages say is encoded as text: only the template's markup makes
        # control tokens; the template (untrusted code) is stopped after 1 s
        return srv.tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt,
                                         **extra)
    except (ChatTemplateError, ValueError) as exc:
        raise APIError(400, f"the chat template rejected the messages: {exc}",
                       param="messages") from None


async def chat(srv: Server, request: Request) -> dict | StreamingResponse:
    """POST /v1/chat/completions."""
    srv.check_auth(request)
    req: ChatRequest = parse_body(ChatRequest, await srv.read_json(request))
    srv.check_model(req.model)
    refuse_unhonoured(req, "chat")
    top = req.top_logprobs
    if top is not None and not (req.logprobs and 0 <= top <= MAX_LOGPROBS):
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, with "
                            "logprobs: true", param="top_logprobs", code="invalid_value")
    lp = (top or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    plan, params, stream, first = await submit_chat(srv, request, req, max_tokens, lp)
    grammar = params[0].grammar
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if req.stream else "chat.completion",
            "created": int(time.time()), "model": srv.model_name, "system_fingerprint": None}

    def logprobs(out: Output) -> dict | None:
        if lp is None:
            return None
        return {"content": _chat_logprobs(srv, out.logprobs), "refusal": None}

    if req.stream:
        want_usage = bool(req.stream_options and req.stream_options.include_usage)
        started: set[int] = set()
        totals = [Output() for _ in params]
        parsers = [plan.parser(grammar is not None) if plan else None for _ in params]
        n_calls = [0] * len(params)
        chunk_json = ChunkJSON(head, usage_null=want_usage)

        def chunks(index: int, out: Output, last: bool) -> list[dict | str]:
            totals[index].merge(out)
            res: list[dict | str] = []
            try:
                text, calls = stream_parts(parsers[index], out)
            except CutCallError as exc:
                res.append(cut_error(exc).body())
                return res

            def add(delta: dict, finish: str | None, with_lp: bool) -> None:
                res.append(chunk_json({"index": index, "delta": delta,
                                       "logprobs": logprobs(out) if with_lp else None,
                                       "finish_reason": finish}))

            if index not in started:
                started.add(index)
                add({"role": "assistant", "content": ""}, None, False)
            if text and lp is None:  # the usual chunk, written directly
                res.append(chunk_json(f'{{"index": {index}, "delta": {{"content": '
                                      f'{json_str(text)}}}, "logprobs": null, '
                                      '"finish_reason": null}'))
            elif text or out.logprobs:
                add({"content": text}, None, True)
            for call in calls:  # each call whole, in one chunk
                add({"tool_calls": [{"index": n_calls[index], **call}]}, None, False)
                n_calls[index] += 1
            if out.finished:
                add({}, finish_reason(out, n_calls[index]), False)
            if last and want_usage:
                res.append(dict(head, choices=[], usage=_usage(totals)))
            return res
        return sse_response(stream, first, chunks)

    outs = await collect(stream, first, request, srv.retry_after, len(params))
    choices = []
    for i, out in enumerate(outs):
        content, calls = answer_of(out, plan, grammar is not None)
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": i, "message": message, "logprobs": logprobs(out),
                        "finish_reason": finish_reason(out, len(calls))})
    return dict(head, choices=choices, usage=_usage(outs))


async def submit_chat(srv: Server, request: Request, req: ChatRequest, max_tokens: int | None,
                      lp: int | None = None) -> tuple[ToolPlan | None, list[SamplingParams],
                                                      RequestStream, tuple[int, Output]]:
    """A chat request queued: its tools, the choices' settings, its stream and first output.
    The chat endpoint's path, shared by /v1/responses and /v1/messages (which translate
    their bodies into a ``ChatRequest``)."""
    plan, messages, extra = await asyncio.to_thread(chat_inputs, srv, req)  # parses JSON
    # off the event loop: the server keeps answering while a template renders
    ids = await asyncio.to_thread(chat_prompt, srv, messages, **extra)
    grammar = await asyncio.to_thread(chat_grammar, srv, req.response_format, plan)
    params = sampling_params(srv, req, max_tokens, lp, grammar)
    _prepare(srv, params, ids, max_tokens, "messages")
    stream, first = await srv.submit(request, ids, params)
    return plan, params, stream, first


def finish_reason(out: Output, n_calls: int) -> str | None:
    """"length" whenever the token limit cut the answer (calls or not), else
    "tool_calls" if it made calls."""
    if out.finish_reason == "length" or not n_calls:
        return out.finish_reason
    return "tool_calls"


def joined_text(value: Any, param: str, kinds: tuple[str, ...], sep: str, what: str) -> str:
    """A string, or a list of text parts (each ``{"type": one of kinds, "text": str}``)
    joined with ``sep``; anything else is a 400 naming ``param`` (``what``: the parts'
    name in the message, e.g. "text blocks"). The Messages and Responses APIs' content."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise APIError(400, f"{param} must be a string or a list of {what}",
                       param=param, code="invalid_value")
    parts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") not in kinds \
                or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            raise APIError(400, f"{param}[{j}]: {what} of type {kind!r} are not supported "
                                f"(this server reads text only: {', '.join(kinds)})",
                           param=f"{param}[{j}]", code="unsupported_value")
        parts.append(part["text"])
    return sep.join(parts)


def cut_error(exc: CutCallError) -> APIError:
    return APIError(400, str(exc), param="max_tokens", code="invalid_value")


def stream_parts(parser, out: Output) -> tuple[str, list[dict]]:
    """A streamed output's new text and the tool calls completed by it (``parser``: the
    request's ``ToolCallParser``, or None without tools); raises ``CutCallError`` when the
    limit cut a constrained call before its function was named."""
    if parser is None:
        return out.text, []
    text, calls = parser.feed(out.text)
    if out.finished:
        more, last = parser.close(out.finish_reason == "length")
        text, calls = text + more, calls + last
    return text, calls


def answer_of(out: Output, plan: ToolPlan | None, constrained: bool
              ) -> tuple[str | None, list[dict]]:
    """A whole answer's (content, tool calls); a constrained call the limit cut before its
    function was named is the 400 ``cut_error`` gives."""
    if plan is None:
        return out.text, []
    try:
        return parse_answer(out.text, plan, constrained, out.finish_reason == "length")
    except CutCallError as exc:
        raise cut_error(exc) from None


def chat_inputs(srv: Server, req: ChatRequest) -> tuple[ToolPlan | None, list[dict], dict]:
    """The request's tools (None: no tool may be called), and the messages and template
    variables that carry them and the conversation's earlier calls into the prompt."""
    template = srv.tokenizer.chat_template if srv.tokenizer is not None else None
    try:
        plan = tool_plan(req, template)
        messages, extra = prompt_inputs(chat_messages(req), plan, template)
    except ChatTemplateError as exc:
        raise APIError(400, f"the chat template is not usable: {exc}",
                       param="messages") from None
    return plan, messages, extra


def chat_grammar(srv: Server, response_format: Any, plan: ToolPlan | None) -> Grammar | None:
    """The grammar of a chat request: its response_format's; with tools, the one that
    forces a tool call (tool_choice "required" or a named function), or with "auto" and a
    response_format, that allows calls or the format's JSON. On a worker thread."""
    grammar = response_grammar(srv, response_format)  # checked even where calls are forced
    if plan is None:
        return grammar
    source = call_grammar(plan, response_schema(response_format) if grammar else None)
    if source is None:
        return None
    try:
        return srv.grammars.lark(source, "the tools' parameters", "tools")
    except GrammarError as exc:
        raise APIError(400, f"tools: {exc}", param="tools", code="invalid_value") from None


# ---------------------------------------------------------------------------- tokens
async def tokenize(srv: Server, request: Request) -> dict:
    """POST /tokenize: ``{"prompt": str}`` or ``{"messages": [...]}`` -> token ids (vLLM's
    shape: ``tokens``, ``count``, ``max_model_len``)."""
    srv.check_auth(request)
    req: TokenizeRequest = parse_body(TokenizeRequest, await srv.read_json(request))
    srv.check_model(req.model)
    if srv.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt (a string) or messages (a chat)",
                       param="prompt", code="invalid_value")
    if req.prompt is not None:
        ids = await asyncio.to_thread(encode_text, srv, req.prompt, "prompt",
                                      add_special_tokens=req.add_special_tokens)
    else:
        _, msgs, extra = await asyncio.to_thread(
            chat_inputs, srv, ChatRequest.model_construct(messages=req.messages))
        ids = await asyncio.to_thread(chat_prompt, srv, msgs,
                                      add_generation_prompt=req.add_generation_prompt, **extra)
    return {"tokens": ids, "count": len(ids), "max_model_len": srv.engine.max_seq_len}


async def detokenize(srv: Server, request: Request) -> dict:
    """POST /detokenize: ``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
    srv.check_auth(request)
    req: DetokenizeRequest = parse_body(DetokenizeRequest, await srv.read_json(request))
    srv.check_model(req.model)
    if srv.tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    vocab = srv.engine.model.cfg.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens outside [0, {vocab}): {bad[:5]}", param="tokens",
                       code="invalid_value")
    return {"prompt": srv.decode(req.tokens)}


# ---------------------------------------------------------------------------- answers
def _usage(outs: list[Output]) -> dict:
    """The usage of a request: its prompt once, the completions of every choice."""
    prompt = outs[0].prompt_tokens
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": outs[0].cached_tokens}}


def _legacy_logprobs(srv: Server, lps: list[TokenLogprob] | None, offset: int) -> dict:
    """/v1/completions' format: parallel lists of tokens, logprobs, top alternatives."""
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps or []:
        text = srv.token_str(lp.token_id)[0]
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({srv.token_str(i)[0]: v for i, v in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def _chat_logprobs(srv: Server, lps: list[TokenLogprob] | None) -> list[dict]:
    """/v1/chat/completions' format: one entry per token with its top alternatives."""
    content = []
    for lp in lps or []:
        text, raw = srv.token_str(lp.token_id)
        top = []
        for i, v in lp.top:
            t, b = srv.token_str(i)
            top.append({"token": t, "logprob": v, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw,
                        "top_logprobs": top})
    return content
