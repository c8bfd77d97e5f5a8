"""The HTTP front: an OpenAI-compatible API over the batching engine (FastAPI).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(plain JSON, or ``stream: true`` as server-sent events), ``GET /health`` and
``GET /metrics`` (Prometheus text format).

Handlers never run torch: they tokenize, hand the request to the engine thread and await
its outputs (``streaming``). Every failure answers with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` (``schemas.APIError``) and the server
carries on. This module builds the app and holds what the handlers share (``Server``);
``routes`` has the generation endpoints, ``schemas`` the request bodies, ``http`` the
socket and the background server.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import routes
from .engine import Engine
from .http import BackgroundServer, CountRequests, bind_socket
from .metrics import render_metrics
from .routes import Server
from .schemas import APIError
from .streaming import ClientGone

__all__ = ["BackgroundServer", "Server", "bind_socket", "create_app"]

log = logging.getLogger("kvformer.serve")

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB of JSON is a very long prompt


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
    _add_error_handlers(app)
    app.add_middleware(CountRequests, metrics=engine.metrics)

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok" if engine.alive else "engine stopped"},
                            status_code=200 if engine.alive else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        srv.check_auth(request)
        return Response(render_metrics(engine),
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

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await routes.tokenize(srv, request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await routes.detokenize(srv, request)

    return app


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
