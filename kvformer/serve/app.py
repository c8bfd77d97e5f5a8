"""The HTTP front: an OpenAI-compatible API over the batching engine (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(plain JSON, or ``stream: true`` as server-sent events), ``POST /v1/embeddings``
(``embeddings``), ``POST /v1/responses`` (OpenAI's Responses API: ``responses``),
``POST /v1/messages`` (Anthropic's Messages API: ``anthropic``), ``GET /health``,
``GET /metrics`` (Prometheus text format), and a chat page at ``GET /`` with the engine's
state as JSON at ``GET /status`` (``serve/ui.py``).

Handlers never run torch: they tokenize, hand the request to the engine thread and await
its outputs (``streaming``). Every failure answers with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` (``schemas.APIError``; /v1/messages
answers in Anthropic's shape) and the server carries on. This module builds the app and
holds what the handlers share (``Server``); ``routes`` has the generation endpoints,
``schemas`` the request bodies, ``http`` the socket and the background server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvformer import __version__
from kvformer.serve import anthropic, embeddings, responses, routes, ui
from kvformer.serve.engine import Engine
from kvformer.serve.http import (
    LOOPBACK_HOSTS,
    BackgroundServer,
    CountRequests,
    Gate,
    bind_socket,
)
from kvformer.serve.metrics import render_metrics
from kvformer.serve.routes import Server
from kvformer.serve.schemas import (
    AnthropicRequest,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
)
from kvformer.serve.streaming import ClientGone

__all__ = ["BackgroundServer", "Server", "bind_socket", "create_app"]

log = logging.getLogger("kvformer.serve")

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON is a very long prompt


def create_app(engine: Engine, model_name: str = "default", *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, retry_after: int = 1,
               manage_engine: bool = True, cors_origins: Sequence[str] = (),
               allowed_hosts: Sequence[str] | None = None) -> FastAPI:
    """The FastAPI app. With ``manage_engine`` the app starts the engine thread when it
    starts up and stops it when it shuts down. Browsers on other origins may call the API
    only from ``cors_origins`` (none by default; ``["*"]`` for any). With ``allowed_hosts``
    and no ``api_key``, only requests whose Host header names one of them (or this machine:
    ``LOOPBACK_HOSTS``) are answered (403 otherwise)."""
    srv = Server(engine, model_name, api_key, max_body_bytes, retry_after)

    @asynccontextmanager
    async def lifespan(_app):
        if manage_engine:
            engine.start()
        yield
        if manage_engine:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    # /openapi.json for clients and API testers; no /docs pages (they load scripts from a CDN)
    app = FastAPI(title="kvformer", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    hosts = (None if allowed_hosts is None or api_key is not None
             else [*LOOPBACK_HOSTS, *allowed_hosts])
    app.state.server, app.state.engine = srv, engine
    app.state.gate = Gate(allowed_hosts=hosts)
    _add_error_handlers(app)
    app.add_middleware(CountRequests, metrics=engine.metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # any request header: the official SDKs send their own (openai's x-stainless-*,
        # anthropic's anthropic-version); what is checked is the origin, and the key.
        # No credentials (cookies): a key travels in a header, never ambiently
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           allow_credentials=False)
    # outermost: the gate sees every request first, and counts it until its response is out
    app.add_middleware(app.state.gate.middleware)

    ui.mount(app, engine, model_name, srv.check_auth)  # the chat page at /, and /status

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok" if engine.alive else "engine stopped"},
                            status_code=200 if engine.alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        srv.check_auth(request)
        return Response(render_metrics(engine.metrics, engine.gauges()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        return {"object": "list", "data": [srv.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        srv.check_auth(request)
        srv.check_model(name)
        return srv.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await routes.completions(srv, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await routes.chat(srv, request)

    @app.post("/v1/embeddings")
    async def embeddings_(request: Request):
        return await embeddings.embeddings(srv, request)

    stored = responses.Store()

    @app.post("/v1/responses")
    async def responses_(request: Request):
        return await responses.responses(srv, stored, request)

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await anthropic.messages(srv, request)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await routes.tokenize(srv, request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await routes.detokenize(srv, request)

    _document_bodies(app)
    return app


# The request bodies the POST routes parse themselves (to answer in OpenAI's error shape),
# written into /openapi.json so that clients and API testers see them.
BODIES = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
          "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
          "/v1/embeddings": EmbeddingRequest, "/v1/messages": AnthropicRequest,
          "/v1/responses": ResponsesRequest}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]},
                       "code": {"type": ["string", "null"]}}}}}


ANTHROPIC_ERROR_SCHEMA = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"],
        "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}}}


def _document_bodies(app: FastAPI) -> None:
    plain = app.openapi

    def openapi() -> dict:
        if getattr(app.state, "openapi_done", False):
            return app.openapi_schema
        spec = plain()
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorResponse"] = ERROR_SCHEMA
        error = {"description": "an error in OpenAI's shape", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, model in BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas[model.__name__] = body
            op = spec["paths"][path]["post"]
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
            if "stream" in model.model_fields:  # stream: true answers with server-sent events
                op["responses"]["200"]["content"]["text/event-stream"] = {"schema": {
                    "type": "object", "properties": {"event": {"type": "string"},
                                                     "data": {"type": "string"}}}}
        schemas["AnthropicErrorResponse"] = ANTHROPIC_ERROR_SCHEMA
        either = {"description": "an error in Anthropic's shape (OpenAI's from the gate: "
                                 "403, 415, 503 while draining)", "content": {
            "application/json": {"schema": {"anyOf": [
                {"$ref": "#/components/schemas/AnthropicErrorResponse"},
                {"$ref": "#/components/schemas/ErrorResponse"}]}}}}
        for path, ops in spec["paths"].items():
            for op in ops.values():
                op["responses"].pop("422", None)  # FastAPI's own shape; ours is below
                if path == "/v1/messages":  # the gate's refusals keep OpenAI's shape
                    op["responses"].update({"4XX": either, "5XX": either})
                else:
                    op["responses"].update({"4XX": error, "5XX": error})
        spec["paths"]["/health"]["get"]["responses"]["503"] = {
            "description": "the engine has stopped, or the server is draining",
            "content": {"application/json": {"schema": {"type": "object"}}}}
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema, app.state.openapi_done = spec, True
        return spec

    app.openapi = openapi


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape."""

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

    @app.exception_handler(ClientGone)
    async def _gone(_request, _exc):
        return Response(status_code=499)  # nobody is listening; nginx's code for it
