"""The HTTP front: an OpenAI-compatible API over the batching engine (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(plain JSON, or ``stream: true`` as server-sent events), ``GET /health``,
``GET /metrics`` (Prometheus text format), and a chat page at ``GET /`` with the engine's
state as JSON at ``GET /status`` (``serve/ui.py``).

Handlers never run torch: they tokenize, hand the request to the engine thread and await
its outputs, which the engine pushes onto an asyncio queue with ``call_soon_threadsafe``.
Every failure answers with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}`` and the server carries on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import lru_cache
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ChatTemplateError, ContextOverflowError
from . import ui
from .engine import (
    Engine,
    EngineClosedError,
    Histogram,
    Output,
    QueueFullError,
    QueueTimeoutError,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger("kvformer.serve")

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON is a very long prompt
MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics",
          "/", "/status")


# ---------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _engine_error(exc: Exception, retry_after: int) -> APIError:
    if isinstance(exc, (QueueFullError, QueueTimeoutError)):
        return APIError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), "server_error", code="service_unavailable")
    log.error("request failed: %r", exc)
    return APIError(500, f"the model failed on this request: {exc}", "server_error",
                    code="internal_error")


# ---------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # strict: "5" is not an integer and 1.5 is not one either; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = None


class _Common(_Body):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool | None = None  # extension: keep going past the end-of-text token
    best_of: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def _parse(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                            f"{type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ""
        for part in err["loc"]:  # ('messages', 0, 'role'); union members show up as 'str'
            if isinstance(part, int):
                param += f"[{part}]"
            elif part.isidentifier() and part not in ("str", "int", "float", "bool"):
                param += f".{part}" if param else part
        param = param or None
        raise APIError(422, f"{param or 'body'}: {err['msg']}"
                            + (f" (got {err['input']!r})" if "input" in err
                               and not isinstance(err["input"], (dict, list)) else ""),
                       param=param, code="invalid_type") from None


# ---------------------------------------------------------------------------- one request
class _Stream:
    """A submitted request: the engine's outputs arrive on an asyncio queue."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.done = False
        self.rid = engine.submit(prompt_ids, params, self._sink)

    def _sink(self, out: Output) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def get(self) -> Output:
        """The next output, merged with any others already waiting."""
        out = await self.queue.get()
        while not out.finished and not self.queue.empty():
            nxt = self.queue.get_nowait()
            out.text += nxt.text
            out.token_ids += nxt.token_ids
            if nxt.logprobs:
                out.logprobs = (out.logprobs or []) + nxt.logprobs
            out.finish_reason, out.error = nxt.finish_reason, nxt.error
            out.prompt_tokens, out.completion_tokens = nxt.prompt_tokens, nxt.completion_tokens
        self.done = out.finished
        return out

    async def get_watching(self, request: Request) -> Output:
        """``get``, but give up (and abort) when the client disconnects meanwhile."""
        task = asyncio.ensure_future(self.get())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise _ClientGone()
        finally:
            if not task.done():
                task.cancel()

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.rid)


class _ClientGone(Exception):
    pass


class _CountRequests:
    """ASGI middleware counting responses by path and status (for /metrics)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope.get("path", "")
            self.metrics.count_http(path if path in ROUTES else "other", status[0])


# ---------------------------------------------------------------------------- the app
class Server:
    """State shared by the handlers."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None,
                 max_body: int, retry_after: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body, self.retry_after = max_body, retry_after
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())

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

    # ---- sampling settings common to both endpoints
    def params(self, req: _Common, max_tokens: int | None, n_prompt: int,
               logprobs: int | None, prompt_param: str) -> SamplingParams:
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n} is not supported: this server makes one choice "
                                "per request (n=1)", param="n", code="unsupported_value")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of",
                           code="unsupported_value")
        if max_tokens is None:
            max_tokens = self.engine.max_seq_len - n_prompt
            if max_tokens < 1:
                raise APIError(400, f"the prompt has {n_prompt} tokens and leaves no room in "
                                    f"this model's context of {self.engine.max_seq_len}",
                               param=prompt_param, code="context_length_exceeded")
        elif max_tokens < 1:
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
            max_tokens=max_tokens, temperature=float(temperature),
            top_p=None if req.top_p in (None, 1) else float(req.top_p),
            top_k=None if req.top_k in (None, -1) else req.top_k, seed=seed,
            stop=tuple(s for s in stops if s), logprobs=logprobs,
            ignore_eos=bool(req.ignore_eos))

    async def submit(self, request: Request, prompt_ids: list[int], params: SamplingParams,
                     prompt_param: str) -> tuple[_Stream, Output]:
        """Queue the request and wait for its first output (or its error)."""
        try:
            stream = _Stream(self.engine, prompt_ids, params)
        except ContextOverflowError as exc:
            raise APIError(400, str(exc), param=prompt_param,
                           code="context_length_exceeded") from None
        except (QueueFullError, EngineClosedError) as exc:
            raise _engine_error(exc, self.retry_after) from None
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        try:
            first = await stream.get_watching(request)
        except BaseException:
            stream.abort()
            raise
        if first.error is not None:
            raise _engine_error(first.error, self.retry_after)
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


def create_app(engine: Engine, model_name: str = "default", *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, retry_after: int = 1,
               manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. With ``manage_engine`` the app starts the engine thread when it
    starts up and stops it when it shuts down."""
    srv = Server(engine, model_name, api_key, max_body_bytes, retry_after)

    @asynccontextmanager
    async def lifespan(_app):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="kvformer", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = srv

    # ---- errors: always OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return APIError(422, str(exc.errors()[:1]), code="invalid_type").response()

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        return APIError(500, "internal server error", "server_error",
                        code="internal_error").response()

    @app.exception_handler(_ClientGone)
    async def _gone(_request, _exc):
        return Response(status_code=499)  # nobody is listening; nginx's code for it

    app.add_middleware(_CountRequests, metrics=engine.metrics)

    # ---- endpoints
    ui.mount(app, engine, model_name, srv.check_auth)  # the chat page at /, and /status

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok" if engine.alive else "engine stopped"},
                            status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        srv.check_auth(request)
        return Response(render_metrics(engine),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": srv.created,
                "owned_by": "kvformer", "max_model_len": engine.max_seq_len}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        srv.check_auth(request)
        srv.check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        srv.check_auth(request)
        req: CompletionRequest = _parse(CompletionRequest, await srv.read_json(request))
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
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        lp = req.logprobs
        if lp is not None and not 0 <= lp <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}",
                           param="logprobs", code="invalid_value")
        params = srv.params(req, req.max_tokens, len(ids), lp, "prompt")
        stream, first = await srv.submit(request, ids, params, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created,
                "model": model_name}
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
            return _sse_response(stream, first, chunks)

        out = await _collect(stream, first, request, srv.retry_after)
        return dict(head, choices=[choice(out, 0)], usage=_usage(out))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        srv.check_auth(request)
        req: ChatRequest = _parse(ChatRequest, await srv.read_json(request))
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
            text = srv.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ChatTemplateError, ValueError) as exc:
            raise APIError(400, f"the chat template rejected the messages: {exc}",
                           param="messages") from None
        ids = srv.tokenizer.encode(text, add_special_tokens=False)
        top = req.top_logprobs
        if top is not None and not (req.logprobs and 0 <= top <= MAX_LOGPROBS):
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}, with "
                                "logprobs: true", param="top_logprobs", code="invalid_value")
        lp = (top or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        params = srv.params(req, max_tokens, len(ids), lp, "messages")
        stream, first = await srv.submit(request, ids, params, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if req.stream
                else "chat.completion", "created": created, "model": model_name,
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
            return _sse_response(stream, first, chunks)

        out = await _collect(stream, first, request, srv.retry_after)
        message = {"role": "assistant", "content": out.text, "refusal": None}
        return dict(head, choices=[{"index": 0, "message": message, "logprobs": logprobs(out),
                                    "finish_reason": out.finish_reason}], usage=_usage(out))

    return app


# ---------------------------------------------------------------------------- responses
def _usage(out: Output) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


async def _collect(stream: _Stream, first: Output, request: Request,
                   retry_after: int) -> Output:
    """Every output of a non-streamed request, merged (aborted if the client leaves)."""
    merged = first
    try:
        while not merged.finished:
            nxt = await stream.get_watching(request)
            merged.text += nxt.text
            merged.token_ids += nxt.token_ids
            if nxt.logprobs:
                merged.logprobs = (merged.logprobs or []) + nxt.logprobs
            merged.finish_reason, merged.error = nxt.finish_reason, nxt.error
            merged.prompt_tokens = nxt.prompt_tokens
            merged.completion_tokens = nxt.completion_tokens
    finally:
        stream.abort()
    if merged.error is not None:
        raise _engine_error(merged.error, retry_after)
    return merged


def _sse_response(stream: _Stream, first: Output,
                  chunks: Callable[[Output, dict], list[dict]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        state: dict = {"offset": 0}
        out = first
        try:
            while True:
                if out.error is not None:
                    err = _engine_error(out.error, 1)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                for chunk in chunks(out, state):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if out.finished:
                    break
                out = await stream.get()
            yield "data: [DONE]\n\n"
        finally:
            stream.abort()  # a client that went away frees its blocks here

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


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


# ---------------------------------------------------------------------------- metrics
def _histogram(lines: list[str], name: str, help_: str, h: Histogram) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    total = 0
    for upper, n in zip(h.buckets, h.counts):
        total += n
        lines.append(f'{name}_bucket{{le="{upper:g}"}} {total}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
    lines.append(f"{name}_sum {h.sum:.6f}")
    lines.append(f"{name}_count {h.count}")


def render_metrics(engine: Engine) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    m = engine.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float)
                         else f"{name}{labels} {value}")

    def label(**kv: str) -> str:
        return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}"

    with m.lock:
        http = sorted(m.http.items())
        finished = sorted(m.finished.items())
        rejected = sorted(m.rejected.items())
        metric("kvformer_requests_total", "counter", "HTTP requests by path and status code.",
               [(label(path=p, code=c), n) for (p, c), n in http])
        metric("kvformer_requests_finished_total", "counter",
               "Generations ended, by reason (stop, length, abort, error).",
               [(label(reason=r), n) for r, n in finished])
        metric("kvformer_requests_rejected_total", "counter",
               "Requests answered 429 (queue_full, queue_timeout).",
               [(label(reason=r), n) for r, n in rejected])
        metric("kvformer_prompt_tokens_total", "counter", "Prompt tokens accepted.",
               [("", m.prompt_tokens)])
        metric("kvformer_completion_tokens_total", "counter", "Tokens generated.",
               [("", m.completion_tokens)])
        metric("kvformer_preemptions_total", "counter",
               "Sequences preempted for KV blocks (recomputed later).", [("", m.preemptions)])
        metric("kvformer_engine_steps_total", "counter", "Engine iterations that ran the model.",
               [("", m.steps)])
        _histogram(lines, "kvformer_time_to_first_token_seconds",
                   "From arrival to the first generated token.", m.ttft)
        _histogram(lines, "kvformer_inter_token_latency_seconds",
                   "Between consecutive tokens of one request.", m.itl)
    pool = engine.pool
    metric("kvformer_active_sequences", "gauge", "Sequences in the running batch.",
           [("", engine.num_running)])
    metric("kvformer_queue_length", "gauge", "Requests waiting to be admitted.",
           [("", engine.num_waiting)])
    metric("kvformer_kv_blocks_used", "gauge", "KV cache blocks in use.", [("", pool.num_used)])
    metric("kvformer_kv_blocks_free", "gauge", "KV cache blocks free.", [("", pool.num_free)])
    metric("kvformer_kv_blocks_total", "gauge", "KV cache blocks in the pool.",
           [("", pool.n_blocks)])
    metric("kvformer_kv_block_size", "gauge", "Token slots per KV block.",
           [("", pool.block_size)])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- running it
def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6); OSError with a readable message if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


class BackgroundServer:
    """uvicorn serving an app from a thread, on a free port by default (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
