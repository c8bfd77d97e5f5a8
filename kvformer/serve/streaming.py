"""A submitted request seen from the web side: its outputs as they come, as one JSON answer
or as server-sent events.

The engine thread pushes each ``Output`` onto the request's asyncio queue with
``call_soon_threadsafe``; the handler awaits them. A client that goes away (mid-stream,
or while it waits for a plain answer) aborts its request, which frees its blocks at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections import deque
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
    """A submitted request of ``len(params)`` choices (one engine sequence each, on the
    same prompt): their outputs arrive, tagged with the choice's index, in one queue."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: list[SamplingParams]):
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.pending: deque[tuple[int, Output]] = deque()
        self.ready = asyncio.Event()
        self.rids: list[int] = []
        self.open = set(range(len(params)))
        try:
            for i, p in enumerate(params):
                self.rids.append(engine.submit(prompt_ids, p, functools.partial(self._sink, i)))
        except BaseException:
            self.abort()
            raise

    def _sink(self, index: int, out: Output) -> None:  # engine thread
        self.loop.call_soon_threadsafe(self._put, index, out)

    def _put(self, index: int, out: Output) -> None:
        self.pending.append((index, out))
        self.ready.set()

    @property
    def done(self) -> bool:
        return not self.open

    async def get(self) -> tuple[int, Output]:
        """The next output (a choice's index and what it made), merged with the outputs of
        the same choice right behind it."""
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        index, out = self.pending.popleft()
        while not out.finished and self.pending and self.pending[0][0] == index:
            out.merge(self.pending.popleft()[1])
        if out.finished:
            self.open.discard(index)
        return index, out

    async def get_watching(self, request: Request) -> tuple[int, Output]:
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
        for index in list(self.open):
            if index < len(self.rids):
                self.engine.abort(self.rids[index])
        self.open.clear()


class ClientGone(Exception):
    pass


async def collect(stream: RequestStream, first: tuple[int, Output], request: Request,
                  retry_after: int, n: int) -> list[Output]:
    """Every output of a non-streamed request, merged per choice (aborted if the client
    leaves)."""
    merged = [Output() for _ in range(n)]
    merged[first[0]].merge(first[1])
    try:
        while not stream.done:
            index, out = await stream.get_watching(request)
            merged[index].merge(out)
    finally:
        stream.abort()
    for out in merged:
        if out.error is not None:
            raise engine_error(out.error, retry_after)
    return merged


def sse_response(stream: RequestStream, first: tuple[int, Output],
                 chunks: Callable[[int, Output, bool], list[dict]]) -> StreamingResponse:
    """Server-sent events: ``chunks(index, output, last)`` gives the JSON chunks for each
    output (``last``: every choice has finished), then ``data: [DONE]``."""
    async def events() -> AsyncIterator[str]:
        index, out = first
        try:
            while True:
                if out.error is not None:
                    err = engine_error(out.error, 1)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                for chunk in chunks(index, out, stream.done):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                if stream.done:
                    break
                index, out = await stream.get()
            yield "data: [DONE]\n\n"
        finally:
            stream.abort()  # a client that went away frees its blocks here

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
