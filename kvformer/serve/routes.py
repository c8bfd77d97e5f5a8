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
from functools import lru_cache
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import ChatTemplateError, ContextOverflowError
from .engine import Engine, Output, SamplingParams, TokenLogprob
from .scheduler import EngineClosedError, QueueFullError
from .schemas import APIError, ChatRequest, CompletionRequest, _Common, parse_body
from .streaming import RequestStream, collect, engine_error, sse_response

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20


class Server:
    """State shared by the handlers."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None,
                 max_body: int, retry_after: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body, self.retry_after = max_body, retry_after
        self.tokenizer = engine.tokenizer
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
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer "
                                "<key>'", code="invalid_api_key",
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
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})",
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
                     params: SamplingParams) -> tuple[RequestStream, Output]:
        """Queue the request and wait for its first output (or its error)."""
        try:
            stream = RequestStream(self.engine, prompt_ids, params)
        except (QueueFullError, EngineClosedError) as exc:
            raise engine_error(exc, self.retry_after) from None
        try:
            first = await stream.get_watching(request)
        except BaseException:
            stream.abort()
            raise
        if first.error is not None:
            raise engine_error(first.error, self.retry_after)
        return stream, first

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
    from ..tokenizer import byte_alphabet

    spelling = tok.id_to_token(token_id)
    table = {c: b for b, c in enumerate(byte_alphabet())}
    if spelling is None or not all(c in table for c in spelling):
        return None
    return [table[c] for c in spelling]


def sampling_params(req: _Common, max_tokens: int | None,
                    logprobs: int | None) -> SamplingParams:
    """The request's sampling settings, checked; ``max_tokens`` None means the rest of the
    context (``Server.check_prompt`` settles it)."""
    if req.n not in (None, 1):
        raise APIError(400, f"n={req.n} is not supported: this server makes one choice "
                            "per request (n=1)", param="n", code="unsupported_value")
    if req.best_of not in (None, 1):
        raise APIError(400, "best_of is not supported", param="best_of",
                       code="unsupported_value")
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens={max_tokens} must be at least 1",
                       param="max_tokens", code="invalid_value")
    temperature = 1.0 if req.temperature is None else req.temperature
    checks = (("temperature", temperature, math.isfinite(temperature) and
               0 <= temperature <= 2, "a number between 0 and 2"),
              ("top_p", req.top_p, req.top_p is None or 0 < req.top_p <= 1,
               "a number in (0, 1]"),
              ("top_k", req.top_k, req.top_k is None or req.top_k >= 1
               or req.top_k == -1, "an integer >= 1 (or -1 for all)"))
    for name, value, ok, what in checks:
        if not ok:
            raise APIError(400, f"{name}={value!r} is invalid: use {what}", param=name,
                           code="invalid_value")
    stop = req.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop",
                       code="invalid_value")
    seed = req.seed
    if seed is not None:
        seed %= 2**63
    return SamplingParams(
        max_tokens=max_tokens or 0, temperature=float(temperature),
        top_p=None if req.top_p in (None, 1) else float(req.top_p),
        top_k=None if req.top_k in (None, -1) else req.top_k, seed=seed,
        stop=tuple(s for s in stops if s), logprobs=logprobs,
        ignore_eos=bool(req.ignore_eos))


async def completions(srv: Server, request: Request) -> dict | StreamingResponse:
    """POST /v1/completions."""
    srv.check_auth(request)
    req: CompletionRequest = parse_body(CompletionRequest, await srv.read_json(request))
    srv.check_model(req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo",
                       code="unsupported_value")
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix",
                       code="unsupported_value")
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
        ids = srv.tokenizer.encode(prompt)
    else:
        ids = list(prompt)
    lp = req.logprobs
    if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}",
                       param="logprobs", code="invalid_value")
    params = sampling_params(req, req.max_tokens, lp)
    params.max_tokens = srv.check_prompt(ids, req.max_tokens, "prompt")
    stream, first = await srv.submit(request, ids, params)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created,
            "model": srv.model_name}
    want_usage = bool(req.stream_options and req.stream_options.include_usage)

    def choice(out: Output, offset: int) -> dict:
        return {"index": 0, "text": out.text,
                "logprobs": _legacy_logprobs(srv, out.logprobs, offset)
                if lp is not None else None,
                "finish_reason": out.finish_reason}

    if req.stream:
        def chunks(out: Output, state: dict) -> list[dict]:
            res = []
            if out.text or out.token_ids or out.finished:
                c = dict(head, choices=[choice(out, state["offset"])])
                state["offset"] += len(out.text)
                if want_usage:
                    c["usage"] = None
                res.append(c)
            if out.finished and want_usage:
                res.append(dict(head, choices=[], usage=_usage(out)))
            return res
        return sse_response(stream, first, chunks)

    out = await collect(stream, first, request, srv.retry_after)
    return dict(head, choices=[choice(out, 0)], usage=_usage(out))

async def chat(srv: Server, request: Request) -> dict | StreamingResponse:
    """POST /v1/chat/completions."""
    srv.check_auth(request)
    req: ChatRequest = parse_body(ChatRequest, await srv.read_json(request))
    srv.check_model(req.model)
    if srv.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat")
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
        messages.append({"role": m.role, "content": content or ""})
    if not messages:
        raise APIError(400, "messages is empty: give at least one message",
                       param="messages", code="invalid_value")
    try:
        # off the event loop (a template is untrusted code, stopped after 1 s), and with what
        # the messages say encoded as text: only the template's markup makes control tokens
        ids = await asyncio.to_thread(srv.tokenizer.encode_chat, messages,
                                      add_generation_prompt=True)
    except (ChatTemplateError, ValueError) as exc:
        raise APIError(400, f"the chat template rejected the messages: {exc}",
                       param="messages") from None
    top = req.top_logprobs
    if top is not None and not (req.logprobs and 0 <= top <= MAX_LOGPROBS):
        raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, with "
                            "logprobs: true", param="top_logprobs", code="invalid_value")
    lp = (top or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = sampling_params(req, max_tokens, lp)
    params.max_tokens = srv.check_prompt(ids, max_tokens, "messages")
    stream, first = await srv.submit(request, ids, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "object": "chat.completion.chunk" if req.stream
            else "chat.completion", "created": created, "model": srv.model_name,
            "system_fingerprint": None}
    want_usage = bool(req.stream_options and req.stream_options.include_usage)

    def logprobs(out: Output) -> dict | None:
        if lp is None:
            return None
        return {"content": _chat_logprobs(srv, out.logprobs), "refusal": None}

    if req.stream:
        def chunks(out: Output, state: dict) -> list[dict]:
            res = []

            def add(delta: dict, finish: str | None, with_lp: bool) -> None:
                c = dict(head, choices=[{"index": 0, "delta": delta,
                                         "logprobs": logprobs(out) if with_lp else None,
                                         "finish_reason": finish}])
                if want_usage:
                    c["usage"] = None
                res.append(c)

            if not state.get("role"):
                state["role"] = True
                add({"role": "assistant", "content": ""}, None, False)
            if out.text or out.logprobs:
                add({"content": out.text}, None, True)
            if out.finished:
                add({}, out.finish_reason, False)
                if want_usage:
                    res.append(dict(head, choices=[], usage=_usage(out)))
            return res
        return sse_response(stream, first, chunks)

    out = await collect(stream, first, request, srv.retry_after)
    message = {"role": "assistant", "content": out.text, "refusal": None}
    return dict(head, choices=[{"index": 0, "message": message, "logprobs": logprobs(out),
                                "finish_reason": out.finish_reason}], usage=_usage(out))


def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


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
