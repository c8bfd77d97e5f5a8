"""The chat page that ``kvformer serve`` serves at ``/``, and the JSON it reads about the engine.

The page is three static files in ``kvformer/serve/static`` (HTML, CSS, JavaScript; no build
step, nothing fetched from elsewhere, so it works offline). It talks to the server only
through the public API: ``/v1/chat/completions`` streamed as server-sent events (a stop
button aborts the fetch; the server sees the client leave and frees the sequence), and
``GET /status`` for the engine panel. With ``--api-key`` the page asks for the key and sends
it as a bearer token; the key stays in the browser tab's memory.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from kvformer.formats import sampling_defaults

STATIC = Path(__file__).with_name("static")
FILES = {"chat.js": "text/javascript", "chat.css": "text/css"}
# The page runs its own script and style only: no inline script, nothing from other origins.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Cache-Control": "no-cache"}


def engine_status(engine, model_name: str) -> dict:
    """What the page's engine panel shows: the batch, the queue, the KV pool (the engine's
    ``gauges()``) and the model's attention layout (a plain dict, also for tests and
    scripts)."""
    cfg = engine.model.cfg
    g = engine.gauges()
    return {
        "model": model_name,
        "architecture": {
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
            "head_dim": cfg.head_dim, "attention": cfg.attention_kind,
            "group_size": cfg.group_size, "max_seq_len": cfg.max_seq_len,
        },
        # the page starts from these (the model's own settings, else llama.cpp's)
        "sampling": sampling_defaults.resolve(getattr(engine.model, "sampling_defaults", None)),
        "max_tokens": getattr(engine, "max_tokens", None),  # the server's ceiling, if any
        "kv_bytes_per_token": g["kv_bytes_per_token"],
        "kv_dtype": g["kv_dtype"],
        "active_sequences": g["active_sequences"],
        "queued": g["queue_length"],
        "kv_blocks": {"used": g["kv_blocks_used"], "free": g["kv_blocks_free"],
                      "total": g["kv_blocks_total"], "block_size": g["kv_block_size"],
                      "cached": g["kv_blocks_cached"]},
    }


def mount(app: FastAPI, engine, model_name: str, check_auth) -> None:
    """Add ``GET /`` (the page), ``GET /static/{chat.js,chat.css}`` and ``GET /status`` to
    ``app``. ``check_auth(request)`` raises the server's 401 when a key is set and missing."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in FILES:  # a fixed list: no paths, no directory listing
            return JSONResponse({"error": {"message": f"no static file {name!r}",
                                           "type": "invalid_request_error", "param": None,
                                           "code": "not_found"}}, status_code=404)
        return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)

    @app.get("/status")
    async def status(request: Request):
        check_auth(request)
        return engine_status(engine, model_name)
