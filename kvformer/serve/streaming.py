"""A submitted request seen from the web side: its outputs as they come, as one JSON answer
or as server-sent events.

The engine thread pushes each ``Output`` onto the request's asyncio queue with
``call_soon_threadsafe``; the handler awaits them. A client that goes away (mid-stream,
or while it waits for a plain answer) aborts its request, which frees its blocks at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from .engine import Engine, Output, SamplingParams
from .scheduler import EngineClosedError, QueueFullError, QueueTimeoutError
from .schemas import APIError

log = logging.getLogger("kvformer.serve")


def engine_error(exc: Exception, retry_after: int) -> APIError:
    if isinstance(exc, (QueueFullError, QueueTimeoutError)):
        return APIError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), "server_error", code="service_unavailable")
    log.error("request failed: %r", exc)
    return APIError(500, f"the model failed on this request: {exc}", "server_error",
                    code="internal_error")


class RequestStream:
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
            out.merge(self.queue.get_nowait())
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
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.rid)


class ClientGone(Exception):
    pass


async def collect(stream: RequestStream, first: Output, request: Request,
                   retry_after: int) -> Output:
    """Every output of a non-streamed request, merged (aborted if the client leaves)."""
    merged = first
    try:
        while not merged.finished:
            merged.merge(await stream.get_watching(request))
    finally:
        stream.abort()
    if merged.error is not None:
        raise engine_error(merged.error, retry_after)
    return merged


def sse_response(stream: RequestStream, first: Output,
                  chunks: Callable[[Output, dict], list[dict]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        state: dict = {"offset": 0}
        out = first
        try:
            while True:
                if out.error is not None:
                    err = engine_error(out.error, 1)
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
